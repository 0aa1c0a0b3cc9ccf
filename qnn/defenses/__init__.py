"""Defense registry: how a training step computes its loss (plain QAT, QADT-R, PBAT, DWQ).

Each defense is a `Defense` subclass registered by name, with its settings in an `Options` dataclass
(`qnn.defenses.options`): `make_defense(name, args, cfg, model)` validates the settings, then builds it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.defenses.options import NoOptions
from qnn.errors import QNNError
from qnn.layers import ensure_calibrated_

_DEFENSES: dict[str, type] = {}


def register_defense(name: str):
    def deco(cls):
        _DEFENSES[name] = cls
        cls.name = name
        return cls

    return deco


def _load_all() -> None:
    from qnn.defenses import qadtr, baselines, masking  # noqa: F401, I001  (qadtr, then pbat and dwq, then masking)


def list_defenses() -> list[str]:
    _load_all()
    return sorted(_DEFENSES)


class Defense:
    """Base: plain QAT (cross-entropy at the step's bit-width)."""

    name = "none"
    Options = NoOptions

    def __init__(self, opts, cfg, model: nn.Module):
        self.opts, self.cfg = opts, cfg

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: int, step: int):
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def choose_bits(self, step: int, scheduled: int) -> int:
        return scheduled

    def after_step(self) -> None:
        pass

    def extra_parameters(self) -> list[torch.Tensor]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, st: dict) -> None:
        pass


register_defense("none")(Defense)


def make_defense(name: str, args: dict | None, cfg, model: nn.Module) -> Defense:
    if name not in list_defenses():
        raise QNNError(f"unknown defense '{name}'; choose from {', '.join(list_defenses())}")
    cls = _DEFENSES[name]
    return cls(cls.Options.from_args(args, name), cfg, model)


def option_table() -> dict[str, tuple[type, str, dict[str, object], tuple]]:
    """Every defense option by name: (type, help, {defense: default}, (lo, hi, lo_open)); options of the same name
    mean the same thing, with the same range, in every defense that has them."""
    _load_all()
    table: dict[str, tuple[type, str, dict, tuple]] = {}
    for name in _DEFENSES:  # registration order: QADT-R's options first
        for opt, (kind, help, default, rng) in _DEFENSES[name].Options.describe().items():
            table.setdefault(opt, (kind, help, {}, rng))[2][name] = default
    return table


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself when wrapped for data parallelism (DDP's .module), else the model."""
    return model.module if hasattr(model, "module") else model


def patched_count(n: int, frac: float) -> int:
    """How many images of an n-image batch carry a patch (they come first): at least one, so any share > 0 patches."""
    return min(n, max(1, int(round(n * frac))))


class FrozenEval:
    """Context: the (unwrapped) model in eval mode with parameters frozen, for crafting training-time attacks."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.m = unwrap(model)
        ensure_calibrated_(self.m, x)

    def __enter__(self) -> nn.Module:
        self.was = self.m.training
        self.req = [q.requires_grad for q in self.m.parameters()]
        self.m.eval()
        for q in self.m.parameters():
            q.requires_grad_(False)
        return self.m

    def __exit__(self, *exc) -> None:
        for q, r in zip(self.m.parameters(), self.req):
            q.requires_grad_(r)
        self.m.train(self.was)

"""What every defense is built on: the `Defense` base class (plain QAT), the registry it is registered in
(`register_defense`), and the helpers the defenses share (`unwrap`, `patched_count`, `FrozenEval`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.defenses.options import NoOptions
from qnn.layers import ensure_calibrated_
from qnn.registries import registrar

_DEFENSES: dict[str, type] = {}
register_defense = registrar(_DEFENSES)


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

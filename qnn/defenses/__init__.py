"""Defense registry: how a training step computes its loss (plain QAT, QADT-R, PBAT, DWQ)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.errors import QNNError

_DEFENSES: dict[str, type] = {}


def register_defense(name: str):
    def deco(cls):
        _DEFENSES[name] = cls
        cls.name = name
        return cls

    return deco


def list_defenses() -> list[str]:
    from qnn.defenses import methods  # noqa: F401  (registers qadtr/pbat/dwq)

    return sorted(_DEFENSES)


class Defense:
    """Base: plain QAT (cross-entropy at the step's bit-width)."""

    name = "none"
    #: the defense options this defense reads (anything else given is refused: a typo must not pass silently)
    options: tuple[str, ...] = ()

    def __init__(self, args: dict, cfg, model: nn.Module):
        self.args, self.cfg = dict(args), cfg

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


def make_defense(name: str, args: dict, cfg, model: nn.Module) -> Defense:
    if name not in list_defenses():
        raise QNNError(f"unknown defense '{name}'; choose from {', '.join(list_defenses())}")
    cls = _DEFENSES[name]
    unknown = sorted(set(args or {}) - set(cls.options))
    if unknown:
        raise QNNError(f"unknown option(s) for defense '{name}': {', '.join(unknown)}; "
                       f"known: {', '.join(cls.options) or 'none'}")
    return cls(args, cfg, model)

"""Defense registry: how a training step computes its loss (plain QAT, QADT-R, PBAT, DWQ).

Each defense is a `Defense` subclass (`qnn.defenses.base`) registered by name, with its settings in an `Options`
dataclass (`qnn.defenses.options`): `make_defense(name, args, cfg, model)` validates the settings, then builds it.
"""

from __future__ import annotations

import torch.nn as nn

# registration order, which option_table keeps: qadtr, then pbat and dwq, then masking
from qnn.defenses import qadtr, baselines, masking  # noqa: F401, I001
from qnn.defenses.base import _DEFENSES, Defense, FrozenEval, patched_count, register_defense, unwrap
from qnn.errors import QNNError

__all__ = ["Defense", "FrozenEval", "list_defenses", "make_defense", "option_table", "patched_count",
           "register_defense", "unwrap"]


def list_defenses() -> list[str]:
    return sorted(_DEFENSES)


def make_defense(name: str, args: dict | None, cfg, model: nn.Module) -> Defense:
    if name not in list_defenses():
        raise QNNError(f"unknown defense '{name}'; choose from {', '.join(list_defenses())}")
    cls = _DEFENSES[name]
    return cls(cls.Options.from_args(args, name), cfg, model)


def option_table() -> dict[str, tuple[type, str, dict[str, object], tuple]]:
    """Every defense option by name: (type, help, {defense: default}, (lo, hi, lo_open)); options of the same name
    mean the same thing, with the same range, in every defense that has them."""
    table: dict[str, tuple[type, str, dict, tuple]] = {}
    for name in _DEFENSES:  # registration order: QADT-R's options first
        for opt, (kind, help, default, rng) in _DEFENSES[name].Options.describe().items():
            table.setdefault(opt, (kind, help, {}, rng))[2][name] = default
    return table

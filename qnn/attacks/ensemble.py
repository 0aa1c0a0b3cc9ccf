"""The evaluation attack: the worst case over an ensemble of universal-patch attacks, as AutoAttack does for pixel
attacks.

A defense that disrupts one optimiser (gradient masking: GIR's stated purpose is to disrupt the attacker's
optimisation) reads well under that optimiser only. The maximum over attacks that differ in optimiser, step size and
restarts, plus the adaptive one that draws the bit-width per step over the defender's trained set (EOT over
precisions), does not. Every attack's ASR is reported beside the maximum, so that masking shows as a spread. All run
on the model in eval mode, through the straight-through path of the deployed integer arithmetic (`qnn.integer`).
Patches are crafted on one image set and scored on another (the caller passes disjoint sets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from qnn.attacks.patch import PatchConfig, evaluate_patch, optimize_universal_patch, predict
from qnn.errors import QNNError
from qnn.layers import precision
from qnn.options import check_options, option


def _named(name: str, v: str) -> None:
    if not v.strip():
        raise QNNError(f"an attack needs a {name}")


@dataclass(frozen=True)
class Attack:
    """One member of an ensemble (`iterations` None: the caller's count, as in `ensemble_asr`)."""

    name: str = option(help="the member's name in results", check=_named)
    optimizer: str = option("sign", "sign (signed gradient) or adam", choices=("sign", "adam"))
    step: float = option(0.05, "signed-gradient step or Adam learning rate (pixels in [0, 1])", lo=0.0, hi=1e3,
                         lo_open=True)
    restarts: int = option(1, "patches optimised in parallel, the best on the crafting set kept", lo=1)
    independent: bool = option(False, "each restart on the whole batch (cost x restarts), not on a share of it")
    eot_bits: bool = option(False, "adaptive: the model's bit-width drawn per step from its trained set")
    iterations: int | None = option(None, "optimisation steps (None: the caller's count)", lo=1)

    def __post_init__(self) -> None:
        check_options(self)


ENSEMBLE = (
    Attack("sign 0.05"),
    Attack("sign 0.01", step=0.01),
    Attack("adam 0.05", optimizer="adam", step=0.05),
    Attack("adam 0.01", optimizer="adam", step=0.01),
    Attack("sign 0.05 x4 restarts", restarts=4),
    Attack("adam 0.05 EOT bit-widths", optimizer="adam", step=0.05, eot_bits=True),
)


def attack_config(base: PatchConfig, attack: Attack, iterations: int | None, trained_bits: list[int] | None) -> PatchConfig:
    """`base` (the patch: size, shape, placement, seed...) with `attack`'s optimiser settings (and its own iteration
    count where it has one)."""
    eot = sorted(set(trained_bits)) if attack.eot_bits and trained_bits and len(set(trained_bits)) > 1 else None
    return dataclasses.replace(base, optimizer=attack.optimizer, step=attack.step, restarts=attack.restarts,
                               independent_restarts=attack.independent,
                               iterations=attack.iterations or iterations, eot_bits=eot)


def ensemble_asr(model: nn.Module, bits: int, craft: tuple[torch.Tensor, torch.Tensor],
                 score: tuple[torch.Tensor, torch.Tensor], base: PatchConfig, iterations: int,
                 trained_bits: list[int] | None = None, attacks: tuple[Attack, ...] = ENSEMBLE,
                 progress: bool = False, device: str = "cpu") -> dict:
    """The ASR (%) of each attack's universal patch at `bits`, crafted on `craft` and scored on `score`, and the
    maximum: {"asr_pct": max, "worst": attack name, "per_attack": {name: ASR}}. An EOT attack on a model trained at
    one bit-width is the plain attack, so it is skipped there."""
    per = {}
    with precision(model, bits):
        clean = predict(model, score[0], device=device)
        for a in attacks:
            cfg = attack_config(base, a, iterations, trained_bits)
            if a.eot_bits and cfg.eot_bits is None:
                continue
            patch, _ = optimize_universal_patch(model, *craft, cfg, progress=progress, device=device)
            per[a.name] = evaluate_patch(model, *score, patch, cfg, device=device, clean_pred=clean)["asr_pct"]
    worst = max(per, key=per.get)
    return {"asr_pct": per[worst], "worst": worst, "per_attack": per}

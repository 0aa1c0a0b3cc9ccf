"""The attacks `qnn attack --attack NAME` runs, as registered classes (`qnn list attacks`): each says what it is and
which settings it reads (its options are a config of `qnn.options` fields, so `qnn attack --help` lists them and they
are checked in one place), and scores one bit-width of the model it is given: the caller sets the precision.

Universal patches (`universal`, `lavan`) read the `PatchConfig`; `per_image` too (PGD inside each image's mask);
`fgsm` / `pgd` read `PixelOptions`. Every step they take is `qnn.attacks.patch.signed_step`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from qnn.attacks.patch import (PatchConfig, asr_metrics, evaluate_patch, optimize_universal_patch,
                               per_image_patch_attack, predict, save_patch)
from qnn.errors import QNNError
from qnn.options import check_options, option
from qnn.registries import registrar

_ATTACKS: dict[str, type["Attack"]] = {}
register_attack = registrar(_ATTACKS)


def list_attacks() -> list[str]:
    return list(_ATTACKS)


def get_attack(name: str) -> type["Attack"]:
    if name not in _ATTACKS:
        raise QNNError(f"unknown attack '{name}'; choose from {', '.join(_ATTACKS)}")
    return _ATTACKS[name]


@dataclass
class PixelOptions:
    """An L-inf pixel attack's settings (FGSM takes one step of `eps`)."""

    eps: float = option(8 / 255, "L-inf budget of fgsm / pgd (pixels in [0, 1])", lo=0.0, hi=1.0, lo_open=True)
    pgd_steps: int = option(10, "PGD steps", lo=1, hi=10_000)
    pgd_alpha: float = option(2 / 255, "PGD step size (pixels in [0, 1])", lo=0.0, hi=1.0, lo_open=True)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class Scored:
    """What an attack is run on: attack (crafting) images, evaluation images, the output folder."""

    x_attack: torch.Tensor
    y_attack: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    out: Path


class Attack:
    """Base: `run` scores the model at its current bit-width `bits` and returns the result of that bit-width."""

    name = ""
    summary = ""
    Options: type | None = None  # the settings beyond the patch's, a config of qnn.options fields
    reads: tuple[str, ...] = ()  # which of them it reads
    universal = False            # crafts one patch for every image (suites and transfer matrices take these only)

    def __init__(self, patch: PatchConfig, options=None):
        self.patch, self.options = patch, options

    def run(self, model: nn.Module, bits: int, data: Scored) -> dict:
        raise NotImplementedError

    @staticmethod
    def _asr(model, data: Scored, x_adv) -> dict:
        return asr_metrics(predict(model, data.x_eval).numpy(), predict(model, x_adv).numpy(), data.y_eval.numpy())


@register_attack("universal")
class Universal(Attack):
    summary = "one universal patch crafted on the attack images (Brown et al. 2017, EOT), scored on the eval images"
    universal = True

    def run(self, model, bits, data):
        patch, info = optimize_universal_patch(model, data.x_attack, data.y_attack, self.patch,
                                               progress=sys.stderr.isatty())
        save_patch(data.out / f"patch_{bits}b", patch, self.patch, info)
        return {**evaluate_patch(model, data.x_eval, data.y_eval, patch, self.patch), "craft": info}


@register_attack("lavan")
class LaVAN(Universal):
    summary = "a targeted universal patch (LaVAN, Karmon et al. 2018): every image pushed to --target-class"


@register_attack("per_image")
class PerImage(Attack):
    summary = "PGD inside a mask at a random place, one patch per image (PBAT's evaluation)"

    def run(self, model, bits, data):
        x_adv, _, _ = per_image_patch_attack(model, data.x_eval, data.y_eval, self.patch)
        return self._asr(model, data, x_adv)


@register_attack("fgsm")
class FGSM(Attack):
    summary = "one L-inf signed step of --eps on every pixel (the paper's Figure 1 comparison)"
    Options, reads = PixelOptions, ("eps",)

    def run(self, model, bits, data):
        from qnn.attacks.pixel import fgsm

        return self._asr(model, data, fgsm(model, data.x_eval, data.y_eval, self.options.eps))


@register_attack("pgd")
class PGD(Attack):
    summary = "L-inf PGD: --pgd-steps signed steps of --pgd-alpha inside --eps, from a random start"
    Options, reads = PixelOptions, ("eps", "pgd_steps", "pgd_alpha")

    def run(self, model, bits, data):
        from qnn.attacks.pixel import pgd_linf

        o = self.options
        return self._asr(model, data, pgd_linf(model, data.x_eval, data.y_eval, o.eps, o.pgd_alpha, o.pgd_steps))

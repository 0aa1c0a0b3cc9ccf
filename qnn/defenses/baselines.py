"""The baselines QADT-R is measured against: PBAT (patch adversarial training) and DWQ (Double-Win Quant)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.attacks.patch import PatchConfig, apply_patch, make_mask, random_locations, signed_step
from qnn.attacks.pixel import pgd_linf
from qnn.defenses.base import Defense, FrozenEval, patched_count, register_defense
from qnn.defenses.options import DefenseOptions
from qnn.options import option


@dataclass(frozen=True)
class PBATOptions(DefenseOptions):
    # each step is a forward and backward more per training step: PBAT's paper uses tens, a thousand is only cost
    iters: int = option(25, "signed-gradient steps per patch", lo=1, hi=1000)
    patch_step: float = option(0.1, "signed-gradient step of a patch (pixels in [0, 1])", lo=0, hi=1, lo_open=True)
    patch_size: int = option(8, "side of the training patches in pixels", lo=1)
    frac_patched: float = option(0.5, "share of each batch that is attacked, at least one image (the rest stays "
                                      "clean)", lo=0, hi=1, lo_open=True)


@register_defense("pbat")
class PBAT(Defense):
    """PBAT (Rao, Stutz, Schiele 2020): per-image patches at random locations, signed-gradient ascent, then train
    on them. Half of each batch is patched (ours: keeps clean accuracy comparable with QADT-R)."""

    Options = PBATOptions

    def __init__(self, opts: PBATOptions, cfg, model: nn.Module):
        super().__init__(opts, cfg, model)
        H = getattr(model, "in_size", None) or 32
        self.pcfg = PatchConfig(patch_shape=(opts.patch_size, opts.patch_size), iterations=opts.iters,
                                step=opts.patch_step, image_size=(H, H))

    def loss(self, model, x, y, bits, step):
        o = self.opts
        n_p = patched_count(len(x), o.frac_patched)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        mask = make_mask("square", o.patch_size, o.patch_size).to(x)
        loc = random_locations(n_p, x.shape[2], x.shape[3], o.patch_size, o.patch_size, gen)
        p = torch.rand(n_p, x.shape[1], o.patch_size, o.patch_size, generator=gen).to(x)
        with FrozenEval(model, x) as m:
            for _ in range(o.iters):
                p.requires_grad_(True)
                loss = F.cross_entropy(m(apply_patch(x[:n_p], p, mask, loc)), y[:n_p])
                g, = torch.autograd.grad(loss, p)
                p = signed_step(p.detach(), g, o.patch_step)
        xin = torch.cat([apply_patch(x[:n_p], p.detach(), mask, loc), x[n_p:]], 0)
        logits = model(xin)
        return F.cross_entropy(logits, y), logits


@dataclass(frozen=True)
class DWQOptions(DefenseOptions):
    eps: float = option(8 / 255, "L-inf radius of the PGD perturbation (pixels in [0, 1])", lo=0, hi=1)
    pgd_steps: int = option(3, "PGD steps", lo=1, hi=1000)
    alpha: float = option(2.5 * (8 / 255) / 3, "PGD step size (pixels in [0, 1])", lo=0, hi=1, lo_open=True)
    frac_patched: float = option(0.5, "share of each batch that is attacked, at least one image (the rest stays "
                                      "clean)", lo=0, hi=1, lo_open=True)


@register_defense("dwq")
class DWQ(Defense):
    """Double-Win Quant (Fu et al. 2021): random-precision training (switchable BN, the DBWT draw) + PGD (L-inf)
    adversarial training at the drawn precision. Half of each batch adversarial (ours)."""

    Options = DWQOptions

    def loss(self, model, x, y, bits, step):
        o = self.opts
        n_a = patched_count(len(x), o.frac_patched)
        with FrozenEval(model, x) as m:
            xa = pgd_linf(m, x[:n_a], y[:n_a], o.eps, o.alpha, o.pgd_steps, seed=self.cfg.seed + step)
        logits = model(torch.cat([xa, x[n_a:]], 0))
        return F.cross_entropy(logits, y), logits

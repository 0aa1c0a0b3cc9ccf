"""Pixel-level L-inf attacks (FGSM, PGD) per bit-width: the paper's Figure 1 comparison."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.attacks.patch import signed_step
from qnn.errors import QNNError


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, alpha: float = 2 / 255,
             steps: int = 10, random_start: bool = True, seed: int = 0) -> torch.Tensor:
    """Untargeted PGD in the L-inf ball (steps=1, alpha=eps, no random start = FGSM). Pixels stay in [0, 1]."""
    if eps < 0 or steps <= 0:
        raise QNNError(f"need eps >= 0 and steps > 0, got eps={eps}, steps={steps}")
    gen = torch.Generator().manual_seed(seed)
    xa = x.clone()
    if random_start:
        xa = (xa + (torch.rand(x.shape, generator=gen) * 2 - 1).to(x) * eps).clamp(0, 1)
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        g, = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            xa = signed_step(xa, g, alpha, x - eps, x + eps)
    return xa.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255) -> torch.Tensor:
    return pgd_linf(model, x, y, eps=eps, alpha=eps, steps=1, random_start=False)

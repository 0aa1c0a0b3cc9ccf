"""Analyses: input-gradient alignment between float and each bit-width, first-layer feature maps clean vs patched."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.layers import precision


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: int) -> torch.Tensor:
    model.eval()
    xr = x.clone().requires_grad_(True)
    with precision(model, bits):
        g, = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    return g.detach()


def gradient_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits_list: list[int],
                       ref_bits: int = 32) -> dict[str, dict[str, float]]:
    """Per bit-width: mean cosine similarity and MSE of input gradients against the float (ref) model."""
    g0 = input_gradients(model, x, y, ref_bits).flatten(1)
    out = {}
    for b in bits_list:
        g = input_gradients(model, x, y, b).flatten(1)
        out[str(b)] = {"cosine": float(F.cosine_similarity(g, g0, dim=1).mean()), "mse": float(((g - g0) ** 2).mean())}
    return out


def save_feature_maps(model: nn.Module, x_clean: torch.Tensor, x_patched: torch.Tensor, bits: int, path: str | Path,
                      n_layers: int = 3, n_channels: int = 6) -> Path:
    """PNG grid: for the stem and the first blocks, channel maps of one image, clean (top) vs patched (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    with torch.no_grad(), precision(model, bits):
        fc = model.features(x_clean[:1], upto=n_layers - 1)
        fp = model.features(x_patched[:1], upto=n_layers - 1)
    fig, axes = plt.subplots(2 * len(fc), n_channels + 1, figsize=(1.6 * (n_channels + 1), 3.2 * len(fc)))
    for li, (a, b) in enumerate(zip(fc, fp)):
        for row, (feat, img, name) in enumerate(((a, x_clean, "clean"), (b, x_patched, "patched"))):
            r = 2 * li + row
            axes[r, 0].imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[r, 0].set_title(f"L{li} {name}", fontsize=7)
            for c in range(n_channels):
                axes[r, c + 1].imshow(feat[0, c].numpy(), cmap="viridis")
            for ax in axes[r]:
                ax.axis("off")
    fig.suptitle(f"first-layer feature maps at {bits} bits", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path

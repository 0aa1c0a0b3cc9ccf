"""Training for masking defenses (`--defense masking`): PatchCleanser's Cutout-style fine-tuning.

Certification by masking (`qnn.certify`) classifies images with one or two masks of its mask set pasted; a model that
never saw such images misclassifies many of them, and then certifies few. So each masked training image gets masks
drawn from the very mask set `qnn certify` uses (PatchCleanser's set for `mask_patch_size` and `mask_positions`), two by
default (the two-mask images are the ones the certificate needs), pasted with the same fill (the input normalisation's
zero). The step's bit-width comes from the DBWT schedule as for every defense, so one switchable model learns masked
images at every precision it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qnn.certify import fill_pixels, mask_set
from qnn.defenses.base import Defense, patched_count, register_defense
from qnn.defenses.options import DefenseOptions
from qnn.options import option


@dataclass(frozen=True)
class MaskingOptions(DefenseOptions):
    mask_patch_size: int = option(6, "patch side the training mask set is made for (PatchCleanser's set; certify "
                                     "with the same --patch-size)", lo=1)
    mask_positions: int = option(6, "mask positions per axis of that set (certify with the same "
                                    "--mask-positions)", lo=2, hi=1024)
    masks_per_image: int = option(2, "masks from the set pasted on each masked image (their union); PatchCleanser "
                                     "fine-tunes with two", lo=1, hi=2)
    frac_masked: float = option(1.0, "share of each batch that is masked, at least one image (the rest stays "
                                     "clean)", lo=0, hi=1, lo_open=True)


@register_defense("masking")
class Masking(Defense):
    """Cross-entropy on images carrying `masks_per_image` masks drawn (with replacement) from the mask set."""

    Options = MaskingOptions

    def __init__(self, opts: MaskingOptions, cfg, model: nn.Module):
        super().__init__(opts, cfg, model)
        H = getattr(model, "in_size", None) or 32
        # validates the patch size and positions against the image (one line on error)
        self.ms = mask_set("patchcleanser", (H, H), opts.mask_patch_size, opts.mask_positions)
        self.masks = torch.from_numpy(self.ms.masks())
        self.fill = fill_pixels(model).view(1, -1, 1, 1)

    def loss(self, model, x, y, bits, step):
        o = self.opts
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        n_m = patched_count(len(x), o.frac_masked)
        k = torch.randint(len(self.masks), (n_m, o.masks_per_image), generator=gen)
        union = self.masks[k].any(1).to(x.device)  # (n_m, H, W); the same mask twice is one mask
        xm = torch.where(union[:, None], self.fill.to(x), x[:n_m])
        logits = model(torch.cat([xm, x[n_m:]], 0))
        return F.cross_entropy(logits, y), logits

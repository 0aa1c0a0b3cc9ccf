"""Patch and pixel attacks, ASR metrics, transfer matrices, analyses."""

from qnn.attacks.patch import (PatchConfig, apply_patch, asr_metrics, evaluate_patch, load_patch, make_mask,
                               optimize_universal_patch, per_image_patch_attack, save_patch)

__all__ = ["PatchConfig", "apply_patch", "asr_metrics", "evaluate_patch", "load_patch", "make_mask",
           "optimize_universal_patch", "per_image_patch_attack", "save_patch"]

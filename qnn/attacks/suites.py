"""Patch suites: the seen configuration (what defenses train against) and the unseen ones (other sizes, shapes,
placements), defined once in qnn/configs/suite_*.yaml for `qnn attack --suite` and the defense benchmarks."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from qnn.errors import QNNError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_suite(name: str) -> dict:
    """The suite `name` (seen, unseen) or the suite YAML at that path, its patch settings checked against
    PatchConfig's fields."""
    from qnn.attacks.patch import PatchConfig
    from qnn.config import load_yaml

    p = Path(name)
    if not p.is_file():
        p = CONFIGS / f"suite_{name}.yaml"
    if not p.is_file():
        raise QNNError(f"unknown suite '{name}': give seen, unseen or a YAML file")
    suite = load_yaml(p)
    known = {f.name for f in fields(PatchConfig)}
    pcs = suite.get("patches") if isinstance(suite, dict) else None
    if not isinstance(pcs, list) or not pcs or not all(isinstance(pc, dict) for pc in pcs):
        raise QNNError(f"{p}: 'patches' must be a non-empty list of patch settings")
    for pc in pcs:
        unknown = sorted(set(pc) - known)
        if unknown:
            raise QNNError(f"{p}: unknown patch setting(s) {unknown}; allowed: {sorted(known)}")
    return suite


def patch_settings(name: str) -> list[dict]:
    """The suite's patch settings as PatchConfig keyword arguments (YAML lists become tuples)."""
    return [{k: tuple(v) if isinstance(v, list) else v for k, v in pc.items()} for pc in load_suite(name)["patches"]]


def label(pc: dict) -> str:
    """'10x10 sq', '6.25% circ', '8x8 sq fixed': a short name of one patch configuration."""
    if pc.get("patch_frac") is not None:
        size = f"{100 * pc['patch_frac']:g}%"
    else:
        h, w = pc["patch_shape"]
        size = f"{h}x{w}"
    shape = {"square": "sq", "circle": "circ"}.get(pc.get("shape", "square"), pc.get("shape"))
    placement = pc.get("placement", "random")
    return f"{size} {shape}" + ("" if placement == "random" else f" {placement}")

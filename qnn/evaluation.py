"""Named evaluation protocols: which attacks, on which images, scored how. One definition that the defense table,
`qnn attack --protocol` and the benchmarks share, so "ASR" means one thing wherever it is printed.

A protocol is an ensemble of universal-patch attacks (`qnn.attacks.ensemble.Attack`), each with its own iteration
count, crafted on the first `n_craft` training images and scored on the last `n_score` test images at `placements`
random positions per image. The protocol's ASR is the maximum over its members; every member's ASR is kept beside
it, so that a defense that masks one optimiser shows as a spread. A member that draws the bit-width per step (EOT
over the defender's trained set) does not depend on the bit-width it is scored at: it is crafted once per (model,
patch configuration) and scored at every bit-width.

Scores are kept per image (how many of its placements the patch fooled), so that intervals can be bootstrapped over
images and members maximised on the same resample.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from qnn.attacks.ensemble import ENSEMBLE, Attack, attack_config
from qnn.attacks.patch import PatchConfig, apply_patch, make_mask, optimize_universal_patch, predict, random_locations
from qnn.errors import QNNError
from qnn.layers import precision
from qnn.options import check_options, option

#: bumped whenever a protocol's crafting or scoring changes meaning: results made under another version are re-run
PROTOCOL_VERSION = 2  # 2: a restart is chosen on the whole crafting set


def _members(name: str, v) -> None:
    if not v or not all(isinstance(m, Attack) for m in v):
        raise QNNError(f"{name} must be a non-empty tuple of qnn.attacks.ensemble.Attack")
    names = [m.name for m in v]
    if len(set(names)) != len(names):
        raise QNNError(f"{name}: attack names must differ, got {names}")


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: attack members and the images they use."""

    name: str = option(help="the protocol's name (qnn attack --protocol NAME)", cli=False)
    members: tuple[Attack, ...] = option(help="the attacks; the protocol's ASR is their maximum", check=_members,
                                         cli=False)
    n_craft: int = option(2000, "crafting images: the first n of the training set", lo=1)
    n_score: int = option(2000, "scored images: the last n of the test set", lo=1)
    placements: int = option(3, "random positions per scored image (at most 9: one digit per image in results)", lo=1,
                             hi=9)
    batch_size: int = option(64, "images per crafting step", lo=1)

    def __post_init__(self) -> None:
        check_options(self)

    def member(self, name: str) -> Attack:
        for m in self.members:
            if m.name == name:
                return m
        raise QNNError(f"protocol '{self.name}' has no attack '{name}'; it has {', '.join(a.name for a in self.members)}")

    def image_steps(self, member: Attack) -> int:
        """Images forwarded and back-propagated while crafting one patch of `member` (its cost)."""
        return member.iterations * self.batch_size * (member.restarts if member.independent else 1)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "version": PROTOCOL_VERSION}


PROTOCOLS = {
    # the defense table's CPU budget (issue #34): the members where the attack curve flattens and the adaptive one,
    # grown by the saturation witness (results/defense_equal_compute_witness.md): four independent Adam starts at 500
    # iterations (single Adam runs from different random patches read one model 8-11 points apart,
    # results/independent_attack_w4.md) and Adam at the small step, which reads QADT-R highest of the full ensemble
    "cpu": Protocol("cpu", (
        Attack("sign 0.05 x4 restarts", restarts=4, iterations=100),
        Attack("adam 0.05", optimizer="adam", step=0.05, iterations=200),
        Attack("adam 0.05 EOT bit-widths", optimizer="adam", step=0.05, eot_bits=True, iterations=500),
        Attack("adam 0.05 x4 starts", optimizer="adam", step=0.05, restarts=4, independent=True, iterations=500),
        Attack("adam 0.01", optimizer="adam", step=0.01, iterations=500),
    )),
    # every member of the evaluation ensemble at 500 iterations (the saturation witness; GPU tables)
    "full": Protocol("full", tuple(dataclasses.replace(a, iterations=500) for a in ENSEMBLE)),
    # a few seconds on CI: tiny models, synthetic data
    "smoke": Protocol("smoke", (
        Attack("sign 0.05 x2 restarts", restarts=2, iterations=4),
        Attack("adam 0.05", optimizer="adam", step=0.05, iterations=4),
        Attack("adam 0.05 EOT bit-widths", optimizer="adam", step=0.05, eot_bits=True, iterations=4),
    ), n_craft=64, n_score=64, placements=2, batch_size=16),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise QNNError(f"unknown evaluation protocol '{name}'; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def member_config(base: PatchConfig, member: Attack, protocol: Protocol, trained_bits: list[int]) -> PatchConfig:
    """The PatchConfig `member` crafts with: the patch of `base`, the protocol's batch, the member's optimiser."""
    cfg = attack_config(dataclasses.replace(base, batch_size=protocol.batch_size), member, member.iterations,
                        trained_bits)
    if member.eot_bits and cfg.eot_bits is None:
        raise QNNError(f"attack '{member.name}' needs a model trained at several bit-widths, got {trained_bits}")
    return cfg


def craft(model: nn.Module, bits: int, member: Attack, base: PatchConfig, craft_set: tuple[torch.Tensor, torch.Tensor],
          trained_bits: list[int], protocol: Protocol, device: str = "cpu") -> torch.Tensor:
    """`member`'s universal patch against `model` at `bits` (an EOT member draws over `trained_bits` instead)."""
    cfg = member_config(base, member, protocol, trained_bits)
    with precision(model, bits):
        patch, _ = optimize_universal_patch(model, *craft_set, cfg, device=device)
    return patch


def score_locations(n: int, cfg: PatchConfig, placements: int) -> list[torch.Tensor]:
    """The scored positions: `placements` random top-left corners per image, the same for every model and patch of
    one configuration (seeded from the protocol, not from the attack), so that scores pair across models."""
    gen = torch.Generator().manual_seed(7919)
    H, W = cfg.image_size
    ph, pw = cfg.patch_shape
    return [random_locations(n, H, W, ph, pw, gen) for _ in range(placements)]


@torch.no_grad()
def score(model: nn.Module, bits: int, patch: torch.Tensor, cfg: PatchConfig,
          score_set: tuple[torch.Tensor, torch.Tensor], placements: int, device: str = "cpu",
          clean_pred: torch.Tensor | None = None) -> np.ndarray:
    """Per scored image: -1 where the model at `bits` misclassifies it clean (it does not count for the ASR), else how
    many of its `placements` patched copies it misclassifies (untargeted)."""
    x, y = score_set
    mask = make_mask(cfg.shape, *cfg.patch_shape)
    fooled = torch.zeros(len(x), dtype=torch.long)
    with precision(model, bits):
        clean = predict(model, x, device=device) if clean_pred is None else clean_pred
        for loc in score_locations(len(x), cfg, placements):
            fooled += (predict(model, apply_patch(x, patch, mask, loc), device=device) != y).long()
    return np.where((clean == y).numpy(), fooled.numpy(), -1)


def asr_pct(fooled: np.ndarray, placements: int) -> float:
    """ASR % from `score`'s per-image counts: fooled (image, placement) pairs among the clean-correct images."""
    ok = fooled >= 0
    return 100.0 * float(fooled[ok].sum()) / (placements * max(int(ok.sum()), 1))


def encode_scores(fooled: np.ndarray) -> str:
    """Per-image counts as a compact string ('-' for a clean error, else the digit)."""
    if fooled.size and int(fooled.max()) > 9:
        raise QNNError("more than 9 placements cannot be encoded")
    return "".join("-" if v < 0 else str(int(v)) for v in fooled)


def decode_scores(s: str) -> np.ndarray:
    if not isinstance(s, str) or any(c not in "-0123456789" for c in s):
        raise QNNError("per-image scores must be a string of digits and '-'")
    return np.array([-1 if c == "-" else int(c) for c in s], dtype=np.int64)


def run_protocol(model: nn.Module, protocol: Protocol, bits_list: list[int], base: PatchConfig,
                 craft_set: tuple[torch.Tensor, torch.Tensor], score_set: tuple[torch.Tensor, torch.Tensor],
                 trained_bits: list[int], device: str = "cpu", on_patch=None, log=None) -> dict[str, dict]:
    """Every member of `protocol` against `model` at each bit-width, as the defense table scores a cell: crafted on
    `craft_set` (`craft`), scored on `score_set` at the protocol's placements (`score`). An EOT member is crafted once
    over `trained_bits` and scored at every bit-width; on a model trained at one bit-width it is the plain attack,
    so it is left out there.

    Returns {bits: {"asr_pct": the maximum over members, "worst": its member, "per_attack": {member: ASR %},
    "clean_acc_pct", "scores": {member: per-image counts (`encode_scores`)}}}. `on_patch(member, bits, patch)` sees
    every crafted patch (bits None: the EOT one); `log(line)` gets a line per member."""
    eot_ok = len(set(trained_bits)) > 1
    members = [m for m in protocol.members if eot_ok or not m.eot_bits]
    eot_patches: dict[str, torch.Tensor] = {}
    out: dict[str, dict] = {}
    for b in bits_list:
        with precision(model, b):
            clean = predict(model, score_set[0], device=device)
        per, scores = {}, {}
        for m in members:
            if m.eot_bits and m.name in eot_patches:
                patch = eot_patches[m.name]
            else:
                patch = craft(model, b, m, base, craft_set, trained_bits, protocol, device)
                if m.eot_bits:
                    eot_patches[m.name] = patch
                if on_patch is not None:
                    on_patch(m, None if m.eot_bits else b, patch)
            fooled = score(model, b, patch, base, score_set, protocol.placements, device, clean_pred=clean)
            per[m.name], scores[m.name] = asr_pct(fooled, protocol.placements), encode_scores(fooled)
            if log is not None:
                log(f"{b} bits, {m.name}: ASR {per[m.name]:.1f}%")
        worst = max(per, key=per.get)
        out[str(b)] = {"asr_pct": per[worst], "worst": worst, "per_attack": per,
                       "clean_acc_pct": 100.0 * float((clean == score_set[1]).float().mean()), "scores": scores}
    return out

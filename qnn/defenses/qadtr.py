"""QADT-R: quantization-aware defense training with randomization = A-QAPA + DBWT + GIR.

Our reconstruction (the paper's body is not public). The parts, each a unit of its own:
- `PatchPool` (A-QAPA's patches): universal patches per trained bit-width, kept across steps and moved by one
  signed-gradient ascent step per training step from the gradient the training loss' backward already computes
  ("free" adversarial training), so the pool keeps up with the model at no extra forward;
- `BitSampler` (A-QAPA's adaptive precision, folded into DBWT's draw): bit-widths where patches succeed are drawn more;
- `refine_in_patch`: a per-image signed step inside the pasted patch (what is specific to each image; the pool carries
  what is universal);
- `gir_penalty` (GIR): penalises agreement between the input gradients at two bit-widths, every `gir_every` steps on
  a sub-batch (its double backward is the expensive part).
Cost: half of each batch clean, half patched, in one forward, so CE(clean) + CE(patched) costs a plain QAT step, plus
the refine step and the occasional GIR: within 1.5x a plain QAT epoch (`bench/defense_cost.py`).
Settings screened and rejected are recorded in results/defense_notes.md, not kept as options.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.attacks.patch import PatchConfig, eot_warp, make_mask, signed_step
from qnn.defenses.base import Defense, FrozenEval, patched_count, register_defense, unwrap
from qnn.defenses.options import DefenseOptions
from qnn.options import option
from qnn.errors import QNNError
from qnn.layers import precision


def _sides(name: str, v: tuple[int, ...]) -> None:
    if any(s < 1 for s in v):  # the image's side bounds them too, checked when the defense meets the data
        raise QNNError(f"{name} must be positive patch sides, got {list(v)}")


@dataclass(frozen=True)
class QADTROptions(DefenseOptions):
    pool_size: int = option(2, "universal patches in each bit-width's A-QAPA pool", lo=1, hi=1024)
    patch_size: int = option(6, "side of the training patches in pixels", lo=1)
    patch_step: float = option(0.1, "signed-gradient step of a patch (pixels in [0, 1])", lo=0, hi=1, lo_open=True)
    sizes: tuple[int, ...] | None = option(
        None, "sides a pool patch is pasted at, one drawn per step (nearest resize, on the pixel grid), e.g. "
              "5,6,7,8; default patch_size-1..patch_size+2; '' = patch_size only", check=_sides)
    frac_patched: float = option(0.5, "share of each batch that is attacked, at least one image (the rest stays "
                                      "clean)", lo=0, hi=1, lo_open=True)
    # each inner step is a forward and backward more per step: beyond a few tens the epoch cost is what grows
    inner_steps: int = option(1, "per-image signed steps inside the pasted pool patch", lo=0, hi=50)
    inner_step: float = option(0.25, "size of those per-image steps (pixels in [0, 1])", lo=0, hi=1)
    adapt_alpha: float = option(0.5, "share of steps whose bit-width A-QAPA draws by patch success (the "
                                     "rest follow --schedule)", lo=0, hi=1)
    adapt_temp: float = option(0.1, "softmax temperature of that draw over the patched-error EMA per "
                                    "bit-width", lo=0, lo_open=True)
    lambda_gir: float = option(0.5, "weight of the GIR penalty", lo=0, hi=100)
    gir_every: int = option(16, "GIR (a double backward) every k steps", lo=1)
    gir_batch: int = option(32, "images in the GIR sub-batch (taken from the patched images: at most the batch "
                                "size times frac_patched; the default takes all when they are fewer)", lo=1)
    no_aqapa: bool = option(False, "ablation: fresh random patches instead of the A-QAPA pool, and the "
                                   "schedule's bit-widths")
    no_gir: bool = option(False, "ablation: no GIR penalty")

    def check_given(self, given: frozenset[str]) -> None:
        unused = {"no_gir": ("lambda_gir", "gir_every", "gir_batch"), "no_aqapa": ("pool_size", "patch_step",
                                                                                   "adapt_alpha", "adapt_temp")}
        for ablation, names in unused.items():
            clash = [n for n in names if n in given]
            if getattr(self, ablation) and clash:
                raise QNNError(f"defense option {ablation} turns off what {', '.join(clash)} set{'s' if len(clash) == 1 else ''}; "
                               f"give one or the other")


class PatchPool:
    """A-QAPA's universal patches: `size` patches of side `side` for each trained bit-width (universal patches
    transfer only partly between precisions). Each patched image draws its own patch, so every patch of the step's
    pool gets a gradient, and a signed-gradient step, at every step."""

    def __init__(self, bits: list[int], size: int, side: int, seed: int, channels: int = 3):
        self.bits = list(bits)
        g = torch.Generator().manual_seed(seed + 4242)
        self.patches = torch.rand(len(self.bits), size, channels, side, side, generator=g)

    def draw(self, bits: int, n: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pool of `bits` as a leaf that collects its gradient, the patch index of each of n images)."""
        k = torch.randint(self.patches.shape[1], (n,), generator=gen)
        return self.patches[self.bits.index(bits)].clone().to(device).requires_grad_(True), k

    def step(self, bits: int, grad: torch.Tensor, step_size: float) -> None:
        """One signed-gradient ascent step (patches with a zero gradient stay where they are)."""
        i = self.bits.index(bits)
        self.patches[i] = signed_step(self.patches[i], grad, step_size)

    def load(self, patches: torch.Tensor) -> None:
        if patches.shape != self.patches.shape:
            raise QNNError(f"defense state: patch pool of shape {tuple(patches.shape)} does not match this "
                           f"configuration's {tuple(self.patches.shape)}")
        self.patches = patches.clone()


class BitSampler:
    """A-QAPA's adaptive precision, folded into DBWT: with probability `alpha` a step's bit-width is drawn from
    softmax(EMA of the patched images' error / `temp`) over the trained bit-widths, so precisions where patches
    succeed train more; otherwise the schedule's bit-width stands."""

    def __init__(self, bits: list[int], alpha: float, temp: float, seed: int):
        self.bits, self.alpha, self.temp, self.seed = list(bits), alpha, temp, seed
        self.ema = {b: 0.5 for b in self.bits}

    def weights(self) -> list[float]:
        """The unnormalised preference of each trained bit-width (shifted by the largest EMA, so that no positive
        temperature overflows: the best bit-width weighs 1)."""
        top = max(self.ema.values())
        return [math.exp((self.ema[b] - top) / self.temp) for b in self.bits]

    def choose(self, step: int, scheduled: int) -> int:
        if len(self.bits) == 1:
            return scheduled
        rnd = random.Random(self.seed * 7_777 + step)
        if rnd.random() >= self.alpha:
            return scheduled
        return rnd.choices(self.bits, weights=self.weights())[0]

    def update(self, bits: int, error: float) -> None:
        self.ema[bits] = 0.9 * self.ema[bits] + 0.1 * error


def refine_in_patch(model: nn.Module, x, y, warped, m, steps: int, step_size: float) -> torch.Tensor:
    """Per-image signed-gradient steps inside the pasted patch (mask `m`), from the pool patch `warped`, at the
    model's bit-width with frozen weights. Returns the change to the patch pixels."""
    delta = torch.zeros_like(warped)
    if steps == 0 or len(x) == 0:
        return delta
    with FrozenEval(model, x) as fm:
        for _ in range(steps):
            p = (warped + delta).requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(fm(x * (1 - m) + p * m), y), p)
            delta = (signed_step(warped + delta, g, step_size) - warped).detach()
    return delta


def gir_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: int, other: int) -> torch.Tensor:
    """GIR: the mean positive cosine between the input gradients at `bits` and at `other` (differentiable; only
    agreement is penalised, anti-aligned gradients are fine). The model is left as it was."""
    grads = []
    for b in (bits, other):
        with precision(unwrap(model), b):
            xr = x.clone().requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(xr), y), xr, create_graph=True)
        grads.append(g.flatten(1))
    return F.relu(F.cosine_similarity(grads[0], grads[1], dim=1, eps=1e-12)).mean()


@register_defense("qadtr")
class QADTR(Defense):
    """QADT-R: see the module docstring."""

    Options = QADTROptions

    def __init__(self, opts: QADTROptions, cfg, model: nn.Module):
        super().__init__(opts, cfg, model)
        P = opts.patch_size
        H = W = getattr(model, "in_size", None) or 32
        self.sizes = list(range(max(1, P - 1), P + 3)) if opts.sizes is None else list(opts.sizes)
        if P > H or any(not (0 < v <= H) for v in self.sizes):
            raise QNNError(f"patch_size and sizes must be in 1..{H} (the image side), got {P} and {self.sizes}")
        self.image_size = (H, W)
        n_p, default_gir = patched_count(cfg.batch_size, opts.frac_patched), type(opts)().gir_batch
        if opts.gir_batch > n_p and opts.gir_batch != default_gir and not opts.no_gir:
            raise QNNError(f"defense option gir_batch={opts.gir_batch} is more than the {n_p} patched images of a "
                           f"batch (batch size {cfg.batch_size} x frac_patched {opts.frac_patched}); at most {n_p}")
        self.pcfg = PatchConfig(patch_shape=(P, P), image_size=(H, W))
        self.mask = make_mask("square", P, P)
        self.bits = list(cfg.bits)
        self.pool = PatchPool(self.bits, opts.pool_size, P, cfg.seed, getattr(model, "in_channels", 3))
        self.sampler = BitSampler(self.bits, opts.adapt_alpha, opts.adapt_temp, cfg.seed)
        self._pending: tuple[int, torch.Tensor] | None = None  # (bit-width, pasted pool) awaiting this step's gradient

    def choose_bits(self, step: int, scheduled: int) -> int:
        return scheduled if self.opts.no_aqapa else self.sampler.choose(step, scheduled)

    def loss(self, model, x, y, bits, step):
        o = self.opts
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        n_p = patched_count(len(x), o.frac_patched)
        if o.no_aqapa:  # ablation: a fresh random patch per step instead of the optimised pool
            patch = torch.rand(1, x.shape[1], o.patch_size, o.patch_size, generator=gen).to(x)
            k = torch.zeros(n_p, dtype=torch.long)
        else:
            patch, k = self.pool.draw(bits, n_p, gen, x.device)
        pasted, mask, pcfg = patch[k.to(x.device)], self.mask, self.pcfg
        if self.sizes:  # scale EOT on the pixel grid (warping with interpolation blurs the patch)
            side = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=gen))]
            if side != o.patch_size:
                pasted = F.interpolate(pasted, size=(side, side), mode="nearest")
                mask = make_mask("square", side, side)
                pcfg = PatchConfig(patch_shape=(side, side), image_size=self.image_size)
        warped, m = eot_warp(x[:n_p], pasted, mask.to(x), pcfg, gen)
        delta = refine_in_patch(model, x[:n_p], y[:n_p], warped.detach(), m.detach(), o.inner_steps, o.inner_step)
        xp = x[:n_p] * (1 - m) + (warped + delta) * m
        logits = model(torch.cat([xp, x[n_p:]], 0))
        loss = F.cross_entropy(logits, y)
        if patch.requires_grad:  # the pool's gradient comes from this same backward
            patch.retain_grad()
            self._pending = (bits, patch)
        with torch.no_grad():
            error = (logits[:n_p].argmax(1) != y[:n_p]).float().mean().item() if n_p else 0.0
        self.sampler.update(bits, error)
        if not o.no_gir and o.lambda_gir > 0 and len(self.bits) > 1 and step % o.gir_every == 0:
            others = [b for b in self.bits if b != bits]
            other = others[int(torch.randint(len(others), (1,), generator=gen))]
            loss = loss + o.lambda_gir * gir_penalty(model, xp[: o.gir_batch].detach(), y[: min(n_p, o.gir_batch)],
                                                     bits, other)
        return loss, logits

    def after_step(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and pending[1].grad is not None:
            self.pool.step(pending[0], pending[1].grad.detach().cpu(), self.opts.patch_step)

    def state_dict(self) -> dict:
        return {"pool": self.pool.patches, "asr_ema": {str(k): v for k, v in self.sampler.ema.items()}}

    def load_state_dict(self, st: dict) -> None:
        if not st:
            return
        if not isinstance(st, dict) or set(st) != {"pool", "asr_ema"}:
            raise QNNError("defense state: expected the keys pool and asr_ema")
        pool, ema = st["pool"], st["asr_ema"]
        if not isinstance(pool, torch.Tensor) or not pool.is_floating_point() or not bool(
                ((pool >= 0) & (pool <= 1)).all()):
            raise QNNError("defense state: the patch pool must be a tensor of pixels in [0, 1]")
        want = {str(b) for b in self.bits}
        if not isinstance(ema, dict) or set(ema) != want or not all(
                isinstance(v, float) and 0 <= v <= 1 for v in ema.values()):
            raise QNNError(f"defense state: asr_ema must map each trained bit-width ({', '.join(sorted(want))}) to an "
                           f"error rate in [0, 1]")
        self.pool.load(pool)
        self.sampler.ema = {int(k): v for k, v in ema.items()}

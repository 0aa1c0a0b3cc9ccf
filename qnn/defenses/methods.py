"""QADT-R (A-QAPA + DBWT + GIR) and the PBAT / DWQ baselines.

Our reconstruction (the paper's body is not public); each choice that is ours is named in one line and is a config
value in `defense_args`. Cost design: QADT-R trains on a batch that is half clean, half patched (one forward, so
CE(clean) + CE(patched) costs what plain QAT costs), updates its patch pool from the gradient that same backward
already computes ("free" adversarial training), and pays for GIR's double backward only every `gir_every` steps on
a sub-batch, to stay within 1.5x a plain QAT epoch.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.attacks.patch import PatchConfig, apply_patch, eot_warp, make_mask, random_locations
from qnn.attacks.pixel import pgd_linf
from qnn.defenses import Defense, register_defense
from qnn.errors import QNNError
from qnn.layers import BIT_CHOICES, bit_index, ensure_calibrated_, set_bit_width_


def tie_bn_affine_(model: nn.Module, source_bits: int) -> None:
    """Make every switchable BN of `model` share one (gamma, beta) across bit-widths, those of `source_bits`."""
    src = bit_index(source_bits)
    for mod in model.modules():
        bns = getattr(mod, "bns", None)
        if isinstance(bns, nn.ModuleList) and len(bns) == len(BIT_CHOICES):
            for i, bn in enumerate(bns):
                if i != src:
                    bn.weight, bn.bias = bns[src].weight, bns[src].bias


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself when wrapped for data parallelism (DDP's .module), else the model."""
    return model.module if hasattr(model, "module") else model


def _get(args: dict, key: str, default, cast=float):
    v = args.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or (cast is int and isinstance(v, float)):
        raise QNNError(f"defense option {key}={v!r} is not a {cast.__name__}")
    try:
        v = cast(v)
    except (TypeError, ValueError):
        raise QNNError(f"defense option {key}={v!r} is not a {cast.__name__}") from None
    if not math.isfinite(v):
        raise QNNError(f"defense option {key}={v!r} must be a finite number")
    return v


def _check_ranges(values: dict) -> None:
    """{option: (value, low, high)}; None = unbounded. One line naming the first option out of its range."""
    for name, (v, lo, hi) in values.items():
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise QNNError(f"defense option {name} must be {rng}, got {v}")


def _mixed_batch(x: torch.Tensor, frac_patched: float) -> int:
    return int(round(len(x) * frac_patched))


class _FrozenEval:
    """Context: the (unwrapped) model in eval mode with parameters frozen, for crafting training-time attacks."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.m = _unwrap(model)
        ensure_calibrated_(self.m, x)

    def __enter__(self) -> nn.Module:
        self.was = self.m.training
        self.req = [q.requires_grad for q in self.m.parameters()]
        self.m.eval()
        for q in self.m.parameters():
            q.requires_grad_(False)
        return self.m

    def __exit__(self, *exc) -> None:
        for q, r in zip(self.m.parameters(), self.req):
            q.requires_grad_(r)
        self.m.train(self.was)


@register_defense("qadtr")
class QADTR(Defense):
    """QADT-R: a persistent patch pool optimised inside the quantized model (A-QAPA), DBWT, GIR."""

    options = ("pool_size", "patch_size", "patch_step", "lambda_gir", "gir_every", "gir_batch", "gir_noise",
               "frac_patched", "adapt_alpha", "adapt_temp", "inner_steps", "inner_step", "aqapa_signal",
               "refresh_every", "scale_min", "scale_max", "rotation_max", "sizes", "pool_per_bit", "pool_groups", "pool_assign",
               "size_per_image", "refine_pool", "pool_init_iters", "pool_init_images", "pool_init_step", "pool_mix", "split_bits", "shared_bn_affine", "distill", "distill_temp", "no_aqapa", "no_gir")

    def __init__(self, args: dict, cfg, model: nn.Module):
        super().__init__(args, cfg, model)
        a = self.args
        self.pool_size = _get(a, "pool_size", 2, int)            # ours: 2 patches (more updates each than 4)
        self.patch_size = _get(a, "patch_size", 6, int)
        self.step_size = _get(a, "patch_step", 0.1)           # ours: signed-gradient step of the pool update
        self.lambda_gir = _get(a, "lambda_gir", 0.5)           # spec: sweep 0.1 / 0.5 / 1
        self.gir_every = _get(a, "gir_every", 16, int)         # ours: GIR's double backward every k steps (cost)
        self.gir_batch = _get(a, "gir_batch", 32, int)         # ours: GIR sub-batch size
        self.gir_noise = _get(a, "gir_noise", 0.0)             # ours: noise on the pool's gradient (training only)
        self.frac_patched = _get(a, "frac_patched", 0.5)       # ours: half the batch carries a pool patch
        self.adapt_alpha = _get(a, "adapt_alpha", 0.5)         # ours: mix of adaptive vs schedule bit-width draw
        self.adapt_temp = _get(a, "adapt_temp", 0.1)           # ours: softmax temperature over per-bit ASR EMA
        self.inner_steps = _get(a, "inner_steps", 1, int)      # ours: per-image signed steps on top of the pool patch
        self.inner_step = _get(a, "inner_step", 0.25)          # ours: their step size (one large step from the pool)
        self.aqapa_signal = str(a.get("aqapa_signal", "error"))  # ours: 'error' on patched images, or 'asr' (patch-induced)
        self.refresh_every = _get(a, "refresh_every", 0, int)  # ours: re-initialise the weakest patch every k steps
        # ours: EOT over location only by default, pasted on the pixel grid (scale/rotation EOT blurs the patch and
        # measured weaker against sharp test patches); scale_min/scale_max/rotation_max turn it on
        self.scale_min = _get(a, "scale_min", 1.0)
        self.scale_max = _get(a, "scale_max", 1.0)
        self.rotation_max = _get(a, "rotation_max", 0.0)
        # ours: A-QAPA's scale EOT on the pixel grid: each step pastes the pool patch resized (nearest, no blur) to a
        # side drawn from `sizes` (default 5..8 around the 6x6 patch: scale 0.83-1.33); "" = the patch's own size only
        sz = a.get("sizes", "5,6,7,8" if self.patch_size == 6 else "")
        try:
            self.sizes = [int(v) for v in (sz.split(",") if isinstance(sz, str) else sz) if str(v).strip()]
        except ValueError:
            raise QNNError(f"defense option sizes={sz!r} is not a comma-separated list of ints") from None
        # ours: one pool per trained bit-width (default; A-QAPA's patches are crafted at the step's bit-width, and
        # universal patches transfer only partly between bit-widths), or one pool shared by all bit-widths
        self.pool_per_bit = bool(a.get("pool_per_bit", True))
        # ours: `pool_groups` ("32+8,4,2") lets bit-widths whose patches transfer share a pool, so that a pool of
        # rarely drawn bit-widths gets the updates of all its members' steps; unset = pool_per_bit's grouping
        # (screened on the cpu budget: sharing made unseen ASR worse, results/defense_sweep_qadtr_pool_groups.md)
        self.pool_groups = self._parse_groups(a.get("pool_groups"), list(cfg.bits))
        # ours: 'image' (default) draws a pool patch per patched image, so every patch of the step's pool gets a
        # gradient, hence an update, at every step; 'batch' pastes one pool patch on all patched images of a step
        self.pool_assign = str(a.get("pool_assign", "image"))
        # ours: with `sizes`, each patched image draws its own side (True) or one side per step (False)
        self.size_per_image = bool(a.get("size_per_image", False))
        # ours: the refine pass's first input gradient (computed anyway, at the step's bit-width with frozen weights)
        # is carried back through the paste onto the pool patches, which take a signed step from it before training
        # uses them: two pool updates per training step instead of one, for the cost of the paste's backward
        self.refine_pool = bool(a.get("refine_pool", False))
        # ours: A-QAPA's warm start. Before the first step every pool (each of pool_groups) is optimised
        # `pool_init_iters` signed steps of `pool_init_step` on the first batch's first `pool_init_images` images,
        # at its bit-width with frozen weights, so that training meets real universal patches from its first step
        # (0 = the pool starts as noise). A one-off cost, inside the first epoch's time.
        self.pool_init_iters = _get(a, "pool_init_iters", 0, int)
        self.pool_init_images = _get(a, "pool_init_images", 64, int)
        self.pool_init_step = _get(a, "pool_init_step", 0.1)
        # ours: in-place distillation across bit-widths (as in switchable/any-precision networks): at a step drawn below
        # the widest trained bit-width, the clean images also learn the widest bit-width's soft predictions (computed
        # without gradient at that bit-width), weight `distill` (0 = off), temperature `distill_temp`; meant to make the
        # low-bit paths follow the full-precision one instead of pulling the shared weights their own way. Screened on
        # the cpu budget, seed 1 (results/defense_sweep_qadtr_distill.md): distill=1 was worse at 32/8/2 bits and
        # cost 1.4-2.6 points of clean accuracy at 32/8/4 bits, hence off by default. The teacher pass runs in training
        # mode, so it also moves the widest bit-width's BatchNorm statistics (on clean training images)
        self.distill = _get(a, "distill", 0.0)
        self.distill_temp = _get(a, "distill_temp", 1.0)
        if self.distill < 0 or self.distill_temp <= 0:
            raise QNNError(f"defense options need distill >= 0 and distill_temp > 0, got {self.distill}, {self.distill_temp}")
        if self.pool_init_iters < 0 or self.pool_init_images <= 0 or self.pool_init_step <= 0:
            raise QNNError("pool_init_iters must be >= 0, pool_init_images and pool_init_step > 0")
        self._pool_ready = self.pool_init_iters == 0
        # ours: PBAT's diversity inside A-QAPA. Each patched image starts, with probability `pool_mix`, from a fresh
        # uniform-noise patch instead of its pool patch (then takes the same per-image refine steps); 0 = every patched
        # image starts from the pool. Fresh patches give the pool no gradient and no score.
        self.pool_mix = _get(a, "pool_mix", 0.0)
        if not (0 <= self.pool_mix < 1):
            raise QNNError(f"pool_mix must be in [0, 1), got {self.pool_mix}")
        # ours: DBWT over sub-batches. Every step runs every trained bit-width, each on its share of the batch (the
        # shares follow A-QAPA's draw weights), and sums the losses before one backward: every pool, every switchable
        # BN and the shared weights get every bit-width's signal at every step, for a plain step's images
        # (screened on the cpu budget: no better than one bit-width per step, and 1.60x QAT against 1.36x in a 20-step
        # interleaved measure; results/defense_sweep_qadtr_split.md, results/defense_cost_split.md)
        self.split_bits = bool(a.get("split_bits", False))
        # ours: switchable BN keeps per-bit-width statistics (the spec) but one affine (gamma, beta) shared by all
        # bit-widths, so what a step at one bit-width learns in the affine holds at the others (ties the model's
        # BatchNorm parameters in place; the trained values start from the widest bit-width's). Screened on the cpu
        # budget: worse at 32 bits, no better elsewhere (results/defense_sweep_qadtr_bn.md)
        self.shared_bn_affine = bool(a.get("shared_bn_affine", False))
        if self.shared_bn_affine:
            tie_bn_affine_(model, max(cfg.bits))
        if self.pool_assign not in ("batch", "image"):
            raise QNNError(f"pool_assign must be 'batch' or 'image', got {self.pool_assign!r}")
        self.no_aqapa = bool(a.get("no_aqapa", False))
        self.no_gir = bool(a.get("no_gir", False))
        if self.aqapa_signal not in ("asr", "error"):
            raise QNNError(f"aqapa_signal must be 'asr' or 'error', got {self.aqapa_signal!r}")
        if self.inner_steps < 0:
            raise QNNError(f"inner_steps must be >= 0, got {self.inner_steps}")
        if self.pool_size <= 0:
            raise QNNError(f"patch pool size must be > 0, got {self.pool_size}")
        if self.lambda_gir < 0:
            raise QNNError(f"lambda_gir must be >= 0, got {self.lambda_gir}")
        if not (0 < self.frac_patched <= 1):
            raise QNNError(f"frac_patched must be in (0, 1], got {self.frac_patched}")
        _check_ranges({"patch_size": (self.patch_size, 1, None), "gir_every": (self.gir_every, 1, None),
                       "gir_batch": (self.gir_batch, 1, None), "patch_step": (self.step_size, 1e-12, None),
                       "gir_noise": (self.gir_noise, 0, None), "adapt_alpha": (self.adapt_alpha, 0, 1),
                       "adapt_temp": (self.adapt_temp, 1e-12, None), "inner_step": (self.inner_step, 0, None),
                       "refresh_every": (self.refresh_every, 0, None)})
        H = W = getattr(model, "in_size", None) or 32
        if any(not (0 < v <= H) for v in self.sizes):
            raise QNNError(f"sizes must be in 1..{H}, got {self.sizes}")
        self.image_size = (H, W)
        scale_max = min(self.scale_max, H / self.patch_size)
        self.pcfg = PatchConfig(patch_shape=(self.patch_size, self.patch_size), scale_min=min(self.scale_min, scale_max),
                                scale_max=scale_max, rotation_max=self.rotation_max, image_size=(H, W))
        self.mask = make_mask("square", self.patch_size, self.patch_size)
        g = torch.Generator().manual_seed(cfg.seed + 4242)
        self.bits = list(cfg.bits)
        n_pools = len(self.pool_groups)
        self.pool = torch.rand(n_pools, self.pool_size, 3, self.patch_size, self.patch_size, generator=g)
        self.asr_ema = {b: 0.5 for b in self.bits}
        self.patch_score = torch.zeros(n_pools, self.pool_size)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (pool index, pasted pool) awaiting this step's gradient

    def _parse_groups(self, spec, bits: list[int]) -> list[list[int]]:
        if spec is None or spec == "":
            return [[b] for b in bits] if self.pool_per_bit else [list(bits)]
        try:
            groups = [[int(v) for v in g.split("+")] for g in str(spec).split(",") if g.strip()]
        except ValueError:
            raise QNNError(f"pool_groups={spec!r} is not like '32+8,4,2' (bit-widths joined by '+', groups by ',')") from None
        flat = [b for g in groups for b in g]
        if sorted(flat) != sorted(bits):
            raise QNNError(f"pool_groups={spec!r} must name every trained bit-width {sorted(bits)} exactly once")
        return groups

    def _pool_index(self, bits: int) -> int:
        return next((i for i, g in enumerate(self.pool_groups) if bits in g), 0)

    # A-QAPA's adaptive bit-width sampling, folded into DBWT: bit-widths where patches succeed get drawn more.
    def choose_bits(self, step: int, scheduled: int) -> int:
        if self.no_aqapa or len(self.bits) == 1:
            return scheduled
        rnd = random.Random(self.cfg.seed * 7_777 + step)
        if rnd.random() >= self.adapt_alpha:
            return scheduled
        return rnd.choices(self.bits, weights=self._adaptive_weights())[0]

    def _adaptive_weights(self) -> list[float]:
        """A-QAPA's unnormalised preference per trained bit-width: exp(ASR EMA / temp)."""
        return [math.exp(self.asr_ema[b] / self.adapt_temp) for b in self.bits]

    def _draw_weights(self) -> list[float]:
        """A-QAPA's probability of each trained bit-width: adapt_alpha of softmax(ASR EMA / temp), the rest uniform."""
        K = len(self.bits)
        if self.no_aqapa or K == 1:
            return [1.0 / K] * K
        w = self._adaptive_weights()
        return [(1 - self.adapt_alpha) / K + self.adapt_alpha * v / sum(w) for v in w]

    def split_sizes(self, n: int) -> list[int]:
        """split_bits: images of an n-image batch per trained bit-width (largest remainder of n x draw weights)."""
        share = [n * p for p in self._draw_weights()]
        sizes = [int(v) for v in share]
        for i in sorted(range(len(share)), key=lambda i: share[i] - sizes[i], reverse=True)[: n - sum(sizes)]:
            sizes[i] += 1
        return sizes

    def loss(self, model, x, y, bits, step):
        if not self._pool_ready and not self.no_aqapa:
            self._init_pool(model, x, y, bits)
        self._pending = []
        if not self.split_bits or len(self.bits) == 1:
            return self._loss_at(model, x, y, bits, step, gir=True)
        base = _unwrap(model)
        total, outs, lo = 0.0, [], 0
        for b, nb in zip(self.bits, self.split_sizes(len(x))):
            if nb == 0:
                continue
            set_bit_width_(base, b)
            lb, logits = self._loss_at(model, x[lo:lo + nb], y[lo:lo + nb], b, step, gir=(b == bits))
            total = total + lb * (nb / len(x))
            outs.append(logits)
            lo += nb
        set_bit_width_(base, bits)
        return total, torch.cat(outs, 0)

    def _loss_at(self, model, x, y, bits, step, gir: bool):
        """The loss of one batch (or split_bits' sub-batch) at `bits` (the model already at `bits`)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + (1_009 * bits if self.split_bits else 0))
        pi = self._pool_index(bits)
        if self.refresh_every and step and step % self.refresh_every == 0 and not self.no_aqapa:
            # the patch that fools the model least starts again from noise (keeps the pool diverse)
            weak = int(self.patch_score[pi].argmin())
            self.pool[pi, weak] = torch.rand(self.pool[pi, weak].shape, generator=gen)
            self.patch_score[pi, weak] = self.patch_score[pi].mean()
        n_p = _mixed_batch(x, self.frac_patched)
        if self.pool_assign == "image" and not self.no_aqapa:
            k = torch.randint(self.pool_size, (n_p,), generator=gen)
        else:
            k = torch.randint(self.pool_size, (1,), generator=gen).expand(n_p)
        if self.no_aqapa:  # ablation: a fresh random patch per step instead of the optimised pool
            patch = torch.rand(1, 3, self.patch_size, self.patch_size, generator=gen).to(x)
            k = torch.zeros_like(k)
        else:
            patch = self.pool[pi].clone().to(x).requires_grad_(True)
        pasted, mask, pcfg = patch[k.to(x.device)], self.mask, self.pcfg
        from_pool = torch.ones(n_p, dtype=torch.bool)
        if self.pool_mix > 0 and not self.no_aqapa and n_p:
            from_pool = torch.rand(n_p, generator=gen) >= self.pool_mix
            noise = torch.rand(pasted.shape, generator=gen).to(x)
            pasted = torch.where(from_pool.to(x.device)[:, None, None, None], pasted, noise)
        if self.sizes and self.size_per_image and n_p:
            pasted, mask, pcfg = self._sized_per_image(pasted, gen)
        elif self.sizes:
            side = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=gen))]
            if side != self.patch_size:
                pasted = F.interpolate(pasted, size=(side, side), mode="nearest")
                mask = make_mask("square", side, side)
                pcfg = PatchConfig(patch_shape=(side, side), image_size=self.image_size)
        warped, m = eot_warp(x[:n_p], pasted, mask.to(x), pcfg, gen)
        delta, g0 = self.refine(model, x[:n_p], y[:n_p], warped.detach(), m.detach())
        if self.refine_pool and g0 is not None and patch.requires_grad:
            # A-QAPA's extra pool step (see refine_pool): d(attack loss)/d(pool) through the paste, then a signed step;
            # the per-image delta keeps its own start (this step's pool + delta, as refined)
            gp, = torch.autograd.grad(warped, patch, grad_outputs=g0, retain_graph=True)  # g0 is zero off the mask
            self._step_pool(pi, gp.detach().cpu())  # pool patches not pasted this step get a zero gradient: unchanged
        xp = x[:n_p] * (1 - m) + (warped + delta) * m
        xin = torch.cat([xp, x[n_p:]], 0)
        logits = model(xin)
        loss = F.cross_entropy(logits, y)
        top = max(self.bits)
        if self.distill > 0 and bits != top and n_p < len(y):
            base, T = _unwrap(model), self.distill_temp
            with torch.no_grad():
                set_bit_width_(base, top)
                teacher = base(x[n_p:])
                set_bit_width_(base, bits)
            kd = F.kl_div(F.log_softmax(logits[n_p:] / T, 1), F.log_softmax(teacher / T, 1), log_target=True,
                          reduction="batchmean") * T * T
            loss = loss + self.distill * kd * (len(y) - n_p) / len(y)
        if patch.requires_grad:
            # the pool gets d(loss)/d(patch) from the same backward: register a hook to capture it
            patch.retain_grad()
            self._pending.append((pi, patch))
        with torch.no_grad():
            wrong_i = (logits[:n_p].argmax(1) != y[:n_p]).float().cpu()
            wrong = wrong_i.mean().item() if n_p else 0.0
            # A-QAPA's per-bit signal: the patched half's error ('error', default) or, with aqapa_signal='asr', its
            # error above the clean half's at the same bit-width (an ASR estimate; measured to starve 2 bits)
            clean_wrong = (logits[n_p:].argmax(1) != y[n_p:]).float().mean().item() if n_p < len(y) else 0.0
            success = (max(0.0, wrong - clean_wrong) / max(1e-6, 1.0 - clean_wrong)) if self.aqapa_signal == "asr" else wrong
            self.asr_ema[bits] = 0.9 * self.asr_ema.get(bits, 0.5) + 0.1 * success
            for kk in k[from_pool].unique().tolist():  # each pasted pool patch: the error rate of its images
                self.patch_score[pi, kk] = 0.9 * self.patch_score[pi, kk] + 0.1 * wrong_i[(k == kk) & from_pool].mean()
        if gir and not self.no_gir and self.lambda_gir > 0 and len(self.bits) > 1 and step % self.gir_every == 0:
            loss = loss + self.lambda_gir * self.gir(model, xp[: self.gir_batch].detach(), y[: min(n_p, self.gir_batch)], bits, gen)
        return loss, logits

    def _init_pool(self, model, x, y, bits) -> None:
        """A-QAPA's warm start (see `pool_init_iters`): universal-patch steps for every pool, each at its own
        bit-width (a shared pool cycles through the trained bit-widths), images split evenly among the pool's patches."""
        base = _unwrap(model)
        gen = torch.Generator().manual_seed(self.cfg.seed * 31 + 17)
        n = min(len(x), self.pool_init_images)
        xs, ys = x[:n], y[:n]
        k = (torch.arange(n) % self.pool_size).to(x.device)
        plan = list(enumerate(self.pool_groups))
        for pi, blist in plan:
            pool = self.pool[pi].clone().to(x)
            for it in range(self.pool_init_iters):
                set_bit_width_(base, blist[it % len(blist)])
                with _FrozenEval(model, xs) as fm:
                    p = pool.requires_grad_(True)
                    warped, m = eot_warp(xs, p[k], self.mask.to(x), self.pcfg, gen)
                    g, = torch.autograd.grad(F.cross_entropy(fm(xs * (1 - m) + warped * m), ys), p)
                pool = (pool.detach() + self.pool_init_step * g.sign()).clamp(0, 1)
            self.pool[pi] = pool.cpu()
        set_bit_width_(base, bits)
        self._pool_ready = True

    def _sized_per_image(self, pasted: torch.Tensor, gen: torch.Generator):
        """Scale EOT per image: patch i resized (nearest) to its own side from `sizes`, at a random offset inside a
        canvas of the largest side, with a per-image mask (the canvas is then placed like any patch)."""
        n, big = len(pasted), max(self.sizes)
        sides = torch.tensor(self.sizes)[torch.randint(len(self.sizes), (n,), generator=gen)]
        off = (torch.rand(n, 2, generator=gen) * (big - sides + 1)[:, None]).long()
        canv, masks = [], []
        for i in range(n):
            s, (oy, ox) = int(sides[i]), off[i].tolist()
            p = F.interpolate(pasted[i:i + 1], size=(s, s), mode="nearest") if s != pasted.shape[-1] else pasted[i:i + 1]
            pad = (ox, big - s - ox, oy, big - s - oy)
            canv.append(F.pad(p, pad))
            masks.append(F.pad(torch.ones(1, 1, s, s), pad))
        return (torch.cat(canv), torch.cat(masks).to(pasted),
                PatchConfig(patch_shape=(big, big), image_size=self.image_size))

    def refine(self, model, x, y, warped, m) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image signed-gradient steps inside the (warped) patch, started from the pool's universal patch, at the
        drawn bit-width with frozen weights. Ours: the pool carries what is universal across images and steps, these
        few steps what is specific to each image (what PBAT's 25 steps buy, at a fraction of the cost). Returns the
        delta and the first step's input gradient (None without steps)."""
        delta, g0 = torch.zeros_like(warped), None
        if self.inner_steps == 0 or len(x) == 0:
            return delta, g0
        with _FrozenEval(model, x) as fm:
            for i in range(self.inner_steps):
                p = (warped + delta).requires_grad_(True)
                g, = torch.autograd.grad(F.cross_entropy(fm(x * (1 - m) + p * m), y), p)
                if i == 0:
                    g0 = g
                delta = ((warped + delta + self.inner_step * g.sign()).clamp(0, 1) - warped).detach()
        return delta, g0

    def gir(self, model, xp, y, bits, gen) -> torch.Tensor:
        """Penalty on positive cosine agreement of input gradients (inside the patch's pixels) at two bit-widths."""
        others = [b for b in self.bits if b != bits]
        b2 = others[int(torch.randint(len(others), (1,), generator=gen))]
        grads = []
        for b in (bits, b2):
            set_bit_width_(_unwrap(model), b)
            xr = xp.clone().requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(xr), y), xr, create_graph=True)
            grads.append(g.flatten(1))
        set_bit_width_(_unwrap(model), bits)
        cos = F.cosine_similarity(grads[0], grads[1], dim=1, eps=1e-12)
        return F.relu(cos).mean()  # ours: only agreement is penalised (anti-aligned gradients are fine)

    def after_step(self) -> None:
        pending, self._pending = self._pending, []
        for pi, patch in pending:
            if patch.grad is None:
                continue
            g = patch.grad.detach().cpu()  # (pool_size, 3, P, P): zero for pool patches not pasted this step
            if self.gir_noise > 0:
                used = (g != 0).flatten(1).any(1)
                g[used] = g[used] + self.gir_noise * g[used].abs().mean() * torch.randn_like(g[used])
            self._step_pool(pi, g)

    def _step_pool(self, pi: int, g: torch.Tensor) -> None:
        """One signed-gradient ascent step of pool `pi` (patches with a zero gradient stay where they are)."""
        self.pool[pi] = (self.pool[pi] + self.step_size * g.sign()).clamp(0, 1)

    def state_dict(self) -> dict:
        return {"pool": self.pool, "asr_ema": {str(k): v for k, v in self.asr_ema.items()}, "patch_score": self.patch_score,
                "pool_ready": self._pool_ready}

    def load_state_dict(self, st: dict) -> None:
        if st:
            pool, score = st["pool"].clone(), st["patch_score"].clone()
            if pool.dim() == 4:  # checkpoints from before per-bit pools: one shared pool
                pool, score = pool[None], score[None]
            if pool.shape != self.pool.shape:
                raise QNNError(f"defense state: patch pool of shape {tuple(pool.shape)} does not match this "
                               f"configuration's {tuple(self.pool.shape)}")
            self.pool, self.patch_score = pool, score
            self._pool_ready = bool(st.get("pool_ready", True))  # checkpoints from before the warm start: trained pool
            self.asr_ema = {int(k): v for k, v in st["asr_ema"].items()}


@register_defense("pbat")
class PBAT(Defense):
    """PBAT (Rao, Stutz, Schiele 2020): per-image patches at random locations, signed-gradient ascent, then train
    on them. Half of each batch is patched (ours: keeps clean accuracy comparable with QADT-R)."""

    options = ("iters", "patch_step", "patch_size", "frac_patched")

    def __init__(self, args: dict, cfg, model: nn.Module):
        super().__init__(args, cfg, model)
        self.iters = _get(self.args, "iters", 25, int)
        self.step_size = _get(self.args, "patch_step", 0.1)
        self.patch_size = _get(self.args, "patch_size", 8, int)
        self.frac_patched = _get(self.args, "frac_patched", 0.5)
        if self.iters <= 0:
            raise QNNError(f"PBAT iterations must be > 0, got {self.iters}")
        _check_ranges({"patch_step": (self.step_size, 1e-12, None), "frac_patched": (self.frac_patched, 1e-12, 1)})
        H = getattr(model, "in_size", None) or 32
        self.pcfg = PatchConfig(patch_shape=(self.patch_size, self.patch_size), iterations=self.iters,
                                step=self.step_size, image_size=(H, H))

    def loss(self, model, x, y, bits, step):
        n_p = _mixed_batch(x, self.frac_patched)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        mask = make_mask("square", self.patch_size, self.patch_size).to(x)
        loc = random_locations(n_p, x.shape[2], x.shape[3], self.patch_size, self.patch_size, gen)
        p = torch.rand(n_p, 3, self.patch_size, self.patch_size, generator=gen).to(x)
        with _FrozenEval(model, x) as m:
            for _ in range(self.iters):
                p.requires_grad_(True)
                loss = F.cross_entropy(m(apply_patch(x[:n_p], p, mask, loc)), y[:n_p])
                g, = torch.autograd.grad(loss, p)
                p = (p.detach() + self.step_size * g.sign()).clamp(0, 1)
        xin = torch.cat([apply_patch(x[:n_p], p.detach(), mask, loc), x[n_p:]], 0)
        logits = model(xin)
        return F.cross_entropy(logits, y), logits


@register_defense("dwq")
class DWQ(Defense):
    """Double-Win Quant (Fu et al. 2021): random-precision training (switchable BN, the DBWT draw) + PGD (L-inf)
    adversarial training at the drawn precision. Half of each batch adversarial (ours)."""

    options = ("eps", "pgd_steps", "alpha", "frac_patched")

    def __init__(self, args: dict, cfg, model: nn.Module):
        super().__init__(args, cfg, model)
        self.eps = _get(self.args, "eps", 8 / 255)
        self.pgd_steps = _get(self.args, "pgd_steps", 3, int)
        self.alpha = _get(self.args, "alpha", 2.5 * (8 / 255) / 3)
        self.frac_adv = _get(self.args, "frac_patched", 0.5)
        if self.eps < 0 or self.pgd_steps <= 0:
            raise QNNError("DWQ needs eps >= 0 and pgd_steps > 0")
        _check_ranges({"alpha": (self.alpha, 1e-12, None), "frac_patched": (self.frac_adv, 1e-12, 1)})

    def loss(self, model, x, y, bits, step):
        n_a = _mixed_batch(x, self.frac_adv)
        with _FrozenEval(model, x) as m:
            xa = pgd_linf(m, x[:n_a], y[:n_a], self.eps, self.alpha, self.pgd_steps, seed=self.cfg.seed + step)
        logits = model(torch.cat([xa, x[n_a:]], 0))
        return F.cross_entropy(logits, y), logits

"""Adversarial patches: universal (Brown et al. 2017, EOT), LaVAN-style targeted, per-image (PGD in a mask).

Knob names follow IBM ART where users know them (`scale_min`, `scale_max`, `rotation_max`, `patch_shape`,
`targeted`); the size can also be given as `patch_frac`, a fraction of the image area (CIFAR 6x6 = 3.5%).
Images are pixels in [0, 1]; patches live in the same space, so they are valid images and export-ready. A patch has
the images' channels (C = 3 RGB, 1 grayscale): (C, h, w).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.errors import QNNError
from qnn.layers import check_bits, precision
from qnn.options import check_options, option
from qnn.validate import MAX_SEED, check_int

SHAPES = ("square", "circle", "rect")
PLACEMENTS = ("random", "fixed", "optimized")


def _fraction(name: str, v: float) -> None:
    if not 0.0 < v < 1.0:
        raise QNNError(f"{name} must be in (0, 1), got {v}")


def _two_sides(name: str, v) -> tuple[int, int]:
    """(h, w): two positive integers."""
    try:
        h, w = (check_int(name, x) for x in v)
    except (TypeError, ValueError):
        raise QNNError(f"{name} must be two integers (h, w), got {v!r}") from None
    if h <= 0 or w <= 0:
        raise QNNError(f"{name} must be positive, got {h}x{w}")
    return h, w


@dataclass
class PatchConfig:
    """What patch, where, and how it is optimised."""

    patch_frac: float | None = option(None, "patch area as a fraction of the image (0.035 = 6x6 on CIFAR); "
                                      "overrides the patch size", lo=0.0, hi=1.0, lo_open=True, check=_fraction)
    patch_shape: tuple[int, int] | None = option((6, 6), "(h, w) in pixels", cli=False, check=_two_sides)
    shape: str = option("square", "patch shape", choices=SHAPES)
    aspect: float = option(2.0, "w / h of a rect patch given by --patch-frac", lo=0.0, hi=1e3, lo_open=True)
    placement: str = option("random", "where the patch goes on each image: random, fixed (bottom-right corner), "
                            "optimized (the worst of a grid)", choices=PLACEMENTS)
    scale_min: float = option(1.0, "EOT scale range while optimising, low (ART's name)", lo=0.0, lo_open=True)
    scale_max: float = option(1.0, "EOT scale range, high (the patch, scaled, must fit the image)", lo=0.0,
                              lo_open=True)
    rotation_max: float = option(0.0, "EOT rotation, degrees", lo=0.0, hi=180.0)
    targeted: bool = option(False, "aim for --target-class instead of any wrong class")
    target_class: int = option(0, "class a targeted patch aims for", lo=0)
    iterations: int = option(500, "optimisation steps", lo=1)
    step: float = option(0.05, "signed-gradient step or Adam learning rate", lo=0.0, hi=1e3, lo_open=True)
    optimizer: str = option("sign", "sign (signed gradient) or adam", choices=("sign", "adam"))
    eot_samples: int = option(1, "transformations per image per step", lo=1)
    restarts: int = option(1, "patches optimised in parallel, the best on the attack set kept", lo=1)
    independent_restarts: bool = option(False, "each restart on the whole batch (independent starts, cost x "
                                        "restarts), not on a 1/restarts share of it")
    batch_size: int = option(128, "images per optimisation step", lo=1, flag="--patch-batch")
    seed: int = option(0, "seed of the patch's start, its placements and the EOT draws", lo=0, hi=MAX_SEED,
                       cli=False)
    image_size: tuple[int, int] = option((32, 32), "(H, W) of the images, from the data", cli=False,
                                         check=_two_sides)
    num_classes: int = option(10, "the model's classes, from the model", lo=1, cli=False)
    eot_bits: list[int] | None = option(None, "adaptive: the model's bit-width drawn per step from this set",
                                        cli=False, check=check_bits)
    ensemble_bits: list[int] | None = option(None, "adaptive: the loss summed over these bit-widths every step",
                                             cli=False, check=check_bits)

    def __post_init__(self) -> None:
        check_options(self)
        H, W = self.image_size
        if self.patch_frac is not None:
            area = self.patch_frac * H * W
            if self.shape == "rect":
                h = max(1, round(math.sqrt(area / self.aspect)))
                self.patch_shape = (h, max(1, round(area / h)))
            else:
                s = max(1, round(math.sqrt(area)))
                self.patch_shape = (s, s)
        if self.patch_shape is None:
            raise QNNError("give patch_shape or patch_frac")
        ph, pw = self.patch_shape = _two_sides("patch_shape", self.patch_shape)
        if ph * self.scale_max > H or pw * self.scale_max > W or ph > H or pw > W:
            raise QNNError(f"patch {ph}x{pw} (scale_max {self.scale_max}) is larger than the {H}x{W} image")
        if self.scale_min > self.scale_max:
            raise QNNError(f"need scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        if self.targeted and not (0 <= self.target_class < self.num_classes):
            raise QNNError(f"target class {self.target_class} out of range 0..{self.num_classes - 1}")

    @property
    def frac(self) -> float:
        return float(make_mask(self.shape, *self.patch_shape).sum()) / (self.image_size[0] * self.image_size[1])

    def to_dict(self) -> dict:
        return asdict(self)


def default_patch_side() -> int:
    """The side of PatchConfig's default square patch: the --patch-size default of every command."""
    return PatchConfig.__dataclass_fields__["patch_shape"].default[0]


def make_mask(shape: str, h: int, w: int) -> torch.Tensor:
    """(1, h, w) float mask of the patch's support."""
    if shape in ("square", "rect"):
        return torch.ones(1, h, w)
    if shape == "circle":
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        r = min(h, w) / 2
        return (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) <= r * r + 1e-6).float()[None]
    raise QNNError(f"unknown patch shape '{shape}'; choose from {', '.join(SHAPES)}")


def fixed_locations(n: int, H: int, W: int, ph: int, pw: int) -> torch.Tensor:
    return torch.tensor([[H - ph, W - pw]] * n, dtype=torch.long)


def random_locations(n: int, H: int, W: int, ph: int, pw: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randint(0, H - ph + 1, (n,), generator=gen),
                        torch.randint(0, W - pw + 1, (n,), generator=gen)], 1)


def apply_patch(x: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Exact paste (no interpolation) of patch (C,h,w) or per-image (N,C,h,w) at integer top-left locations (N,2)."""
    n, C, H, W = x.shape
    if patch.shape[-3] != C:
        raise QNNError(f"patch has {patch.shape[-3]} channel(s), the images {C}")
    ph, pw = mask.shape[-2:]
    iy = loc[:, 0:1] + torch.arange(ph)[None]          # n,ph
    ix = loc[:, 1:2] + torch.arange(pw)[None]          # n,pw
    b = torch.arange(n)[:, None, None]
    canvas_m = torch.zeros(n, H, W, dtype=x.dtype, device=x.device)
    canvas_m[b, iy[:, :, None], ix[:, None, :]] = mask[0].to(x.dtype).expand(n, ph, pw)
    p = patch if patch.dim() == 4 else patch.expand(n, *patch.shape)
    canvas_p = torch.zeros(n, H, W, C, dtype=x.dtype, device=x.device)
    canvas_p = canvas_p.index_put((b, iy[:, :, None], ix[:, None, :]), p.permute(0, 2, 3, 1))
    m = canvas_m[:, None]
    return x * (1 - m) + canvas_p.permute(0, 3, 1, 2) * m


def apply_patch_eot(x: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, cfg: PatchConfig,
                    gen: torch.Generator) -> torch.Tensor:
    """Patch under random location, scale and rotation (EOT), differentiable w.r.t. the patch (grid_sample)."""
    n, _, H, W = x.shape
    ph, pw = mask.shape[-2:]
    if cfg.scale_min == cfg.scale_max == 1.0 and cfg.rotation_max == 0:
        return apply_patch(x, patch, mask, random_locations(n, H, W, ph, pw, gen))
    warped, m = eot_warp(x, patch, mask, cfg, gen)
    return x * (1 - m) + warped * m


def eot_warp(x: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, cfg: PatchConfig,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch (C,h,w) or per-image (N,C,h,w) warped onto image canvases under a random EOT transform: returns
    (warped patch (N,C,H,W), soft mask (N,1,H,W)); the patched image is x * (1 - mask) + warped * mask."""
    n, _, H, W = x.shape
    ph, pw = mask.shape[-2:]
    s = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * torch.rand(n, generator=gen)
    a = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(cfg.rotation_max)
    # room left for the (scaled, rotated) patch's bounding box
    bh = (ph * s * torch.cos(a).abs() + pw * s * torch.sin(a).abs()).clamp(max=H)
    bw = (pw * s * torch.cos(a).abs() + ph * s * torch.sin(a).abs()).clamp(max=W)
    cy = bh / 2 + torch.rand(n, generator=gen) * (H - bh)
    cx = bw / 2 + torch.rand(n, generator=gen) * (W - bw)
    if cfg.scale_min == cfg.scale_max == 1.0 and cfg.rotation_max == 0:
        # no scale or rotation: snap to the pixel grid, so the warp is an exact paste (no interpolation blur)
        cy, cx = torch.floor(cy - bh / 2) + bh / 2, torch.floor(cx - bw / 2) + bw / 2
    # output pixel (normalised) -> patch coords: inverse of (scale, rotate, translate)
    cos, sin = torch.cos(a), torch.sin(a)
    tx, ty = (2 * cx / W - 1), (2 * cy / H - 1)
    sx, sy = W / (pw * s), H / (ph * s)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, sin * sx * H / W
    theta[:, 1, 0], theta[:, 1, 1] = -sin * sy * W / H, cos * sy
    theta[:, 0, 2] = -(theta[:, 0, 0] * tx + theta[:, 0, 1] * ty)
    theta[:, 1, 2] = -(theta[:, 1, 0] * tx + theta[:, 1, 1] * ty)
    grid = F.affine_grid(theta.to(x.device), (n, 4, H, W), align_corners=False)
    pm = torch.cat([patch if patch.dim() == 4 else patch.expand(n, *patch.shape), mask.expand(n, 1, ph, pw).to(x)], 1)
    warped = F.grid_sample(pm, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    c = patch.shape[-3]
    return warped[:, :c], warped[:, c:c + 1]


def signed_step(x: torch.Tensor, grad: torch.Tensor, step: float, lo: torch.Tensor | None = None,
                hi: torch.Tensor | None = None) -> torch.Tensor:
    """The signed-gradient step every attack and defense here takes: x + step * sign(grad), inside [lo, hi] where
    given (an L-inf ball), then inside the pixel range [0, 1]. A negative step descends. A zero gradient stays put."""
    y = x + step * grad.sign()
    if lo is not None:
        y = torch.min(torch.max(y, lo), hi)
    return y.clamp(0, 1)


def _attack_loss(logits: torch.Tensor, y: torch.Tensor, cfg: PatchConfig) -> torch.Tensor:
    """Loss to MINIMISE: targeted -> CE to target; untargeted -> -CE to the true label."""
    if cfg.targeted:
        return F.cross_entropy(logits, torch.full_like(y, cfg.target_class), reduction="none")
    return -F.cross_entropy(logits, y, reduction="none")


def _model_loss(model: nn.Module, xp: torch.Tensor, y: torch.Tensor, cfg: PatchConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.ensemble_bits:
        total = 0
        for b in cfg.ensemble_bits:
            with precision(model, b):
                total = total + _attack_loss(model(xp), y, cfg)
        return total / len(cfg.ensemble_bits)
    drawn = cfg.eot_bits[int(torch.randint(len(cfg.eot_bits), (1,), generator=gen))] if cfg.eot_bits else None
    with precision(model, drawn):
        return _attack_loss(model(xp), y, cfg)


def optimize_universal_patch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PatchConfig,
                             progress: bool = False, device: str = "cpu",
                             snapshots: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict]:
    """Optimise one universal patch (best of `restarts`) on the attack set (x, y).

    Returns (patch (C,h,w) in [0,1], C the images' channels, info with per-restart ASR and images x EOT samples per
    second; with `snapshots`, info["snapshots"][i] holds the restarts' patches (R,C,h,w) after i iterations, for ASR
    curves).
    The model is used in eval mode at its current bit-width unless cfg.eot_bits / ensemble_bits say otherwise.
    """
    import time

    if len(x) == 0:
        raise QNNError("attack set is empty")
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    ph, pw = cfg.patch_shape
    R = cfg.restarts
    mask = make_mask(cfg.shape, ph, pw).to(device)
    patches = torch.rand(R, x.shape[1], ph, pw, generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([patches], lr=cfg.step) if cfg.optimizer == "adam" else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, desc=f"patch {ph}x{pw}", leave=False, dynamic_ncols=True)
    t0, n_evals, snaps = time.perf_counter(), 0, {}
    try:
        for it in range(cfg.iterations):
            if it in snapshots:
                snaps[it] = patches.detach().cpu().clone()
            idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
            copies = cfg.eot_samples * (R if cfg.independent_restarts else 1)
            xb = x[idx].to(device).repeat(copies, 1, 1, 1)
            yb = y[idx].to(device).repeat(copies)
            # independent restarts: copy r of the batch goes to restart r; shared: the batch is dealt out among them
            who = (torch.arange(len(xb)) // (len(xb) // R)) if cfg.independent_restarts else torch.arange(len(xb)) % R
            xp = apply_patch_eot(xb, patches[who], mask, cfg, gen)
            loss = _model_loss(model, xp, yb, cfg, gen).mean()
            g, = torch.autograd.grad(loss, patches)
            with torch.no_grad():
                if opt is None:
                    patches.copy_(signed_step(patches, g, -cfg.step))  # the loss is minimised
                else:
                    patches.grad = g
                    opt.step()
                    patches.clamp_(0, 1)
            n_evals += len(xb) * (len(cfg.ensemble_bits) if cfg.ensemble_bits else 1)
            if bar is not None:
                bar.update(1)
        if cfg.iterations in snapshots:
            snaps[cfg.iterations] = patches.detach().cpu().clone()
    finally:
        if bar is not None:
            bar.close()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    secs = time.perf_counter() - t0
    # keep the restart with the highest ASR on the whole attack set (random placement, fixed seed): single runs from
    # different starts read one model up to ~10 points apart, so a small selection set picks a weaker one by chance
    best, best_asr, asrs = 0, -1.0, []
    for r in range(R if R > 1 else 0):
        m = evaluate_patch(model, x, y, patches[r].detach(), cfg, device=device)
        asrs.append(m["asr_pct"])
        if m["asr_pct"] > best_asr:
            best, best_asr = r, m["asr_pct"]
    info = {"restart_asr_pct": asrs, "seconds": secs, "images_x_eot_per_s": n_evals / max(secs, 1e-9),
            "snapshots": snaps}
    return patches[best].detach().cpu(), info


def per_image_patch_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PatchConfig,
                           device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PGD inside a mask, one patch per image at a random location (PBAT's evaluation). Returns (x_adv, patches, loc)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    ph, pw = cfg.patch_shape
    mask = make_mask(cfg.shape, ph, pw).to(device)
    n, _, H, W = x.shape
    loc = random_locations(n, H, W, ph, pw, gen) if cfg.placement != "fixed" else fixed_locations(n, H, W, ph, pw)
    p = torch.rand(n, x.shape[1], ph, pw, generator=gen).to(device).requires_grad_(True)
    x, y = x.to(device), y.to(device)
    for _ in range(cfg.iterations):
        loss = _attack_loss(model(apply_patch(x, p, mask, loc)), y, cfg).sum()
        g, = torch.autograd.grad(loss, p)
        with torch.no_grad():
            p.copy_(signed_step(p, g, -cfg.step))
    p = p.detach()
    return apply_patch(x, p, mask, loc).detach(), p, loc


def placement_locations(model: nn.Module, x: torch.Tensor, y: torch.Tensor, patch: torch.Tensor, cfg: PatchConfig,
                        device: str = "cpu", grid: int = 4) -> torch.Tensor:
    """Per-image patch locations for evaluation: random (seeded), fixed corner, or optimised (worst of a grid)."""
    n, _, H, W = x.shape
    ph, pw = cfg.patch_shape
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    if cfg.placement == "fixed":
        return fixed_locations(n, H, W, ph, pw)
    if cfg.placement == "random":
        return random_locations(n, H, W, ph, pw, gen)
    mask = make_mask(cfg.shape, ph, pw)
    ys = torch.linspace(0, H - ph, grid).round().long()
    xs = torch.linspace(0, W - pw, grid).round().long()
    best_loss = torch.full((n,), float("inf"))
    best = fixed_locations(n, H, W, ph, pw)
    with torch.no_grad():
        for yy in ys:
            for xx in xs:
                loc = torch.tensor([[int(yy), int(xx)]] * n)
                loss = _attack_loss(model(apply_patch(x.to(device), patch.to(device), mask.to(device), loc)), y.to(device), cfg).cpu()
                better = loss < best_loss
                best_loss = torch.where(better, loss, best_loss)
                best[better] = loc[better]
    return best


def asr_metrics(clean_pred: np.ndarray, adv_pred: np.ndarray, y: np.ndarray, targeted: bool = False,
                target_class: int = 0) -> dict:
    """ASR as the spec defines it, with clean and robust accuracy and the image counts.

    Untargeted: among images classified correctly when clean, the share misclassified with the patch.
    Targeted: among images whose label is not the target, the share classified as the target.
    """
    clean_pred, adv_pred, y = (np.asarray(a).astype(np.int64) for a in (clean_pred, adv_pred, y))
    n = len(y)
    if n == 0:
        raise QNNError("evaluation set is empty")
    correct = clean_pred == y
    res = {"n_images": n, "clean_acc_pct": 100.0 * correct.mean(), "robust_acc_pct": 100.0 * (adv_pred == y).mean()}
    if targeted:
        keep = y != target_class
        res["n_asr_images"] = int(keep.sum())
        res["asr_pct"] = 100.0 * float((adv_pred[keep] == target_class).mean()) if keep.any() else 0.0
    else:
        res["n_asr_images"] = int(correct.sum())
        res["asr_pct"] = 100.0 * float((adv_pred[correct] != y[correct]).mean()) if correct.any() else 0.0
    return res


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 500, device: str = "cpu") -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])


def patched_images(model: nn.Module, x: torch.Tensor, y: torch.Tensor, patch: torch.Tensor, cfg: PatchConfig,
                   device: str = "cpu") -> torch.Tensor:
    mask = make_mask(cfg.shape, *cfg.patch_shape)
    if tuple(patch.shape) != (x.shape[1], *cfg.patch_shape):
        raise QNNError(f"patch has shape {tuple(patch.shape)}, expected {(x.shape[1], *cfg.patch_shape)}")
    patch = patch.detach().to(x.device)  # a patch optimised on a GPU, pasted on CPU images
    loc = placement_locations(model, x, y, patch, cfg, device)
    return apply_patch(x, patch, mask, loc)


def evaluate_patch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, patch: torch.Tensor, cfg: PatchConfig,
                   device: str = "cpu", clean_pred: torch.Tensor | None = None) -> dict:
    """ASR of a universal patch on (x, y) at the model's current bit-width (`clean_pred`: the model's predictions on
    x, when the caller scores several patches on the same images)."""
    if len(x) == 0:
        raise QNNError("evaluation set is empty")
    xp = patched_images(model, x, y, patch, cfg, device)
    clean = predict(model, x, device=device) if clean_pred is None else clean_pred
    return asr_metrics(clean.numpy(), predict(model, xp, device=device).numpy(), y.numpy(), cfg.targeted,
                       cfg.target_class)


def save_patch(path: str | Path, patch: torch.Tensor, cfg: PatchConfig, info: dict | None = None) -> Path:
    """Lossless `.npz` (float32 patch, mask, config JSON) plus a PNG for people; written atomically."""
    from PIL import Image

    from qnn.checkpoint import atomic_write_bytes

    path = Path(path).with_suffix(".npz")
    import io

    buf = io.BytesIO()
    mask = make_mask(cfg.shape, *cfg.patch_shape)
    np.savez(buf, patch=patch.numpy().astype(np.float32), mask=mask.numpy(),
             config=json.dumps(cfg.to_dict()), info=json.dumps(info or {}))
    atomic_write_bytes(path, buf.getvalue())
    img = (patch.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    alpha = (mask[0].numpy() * 255).astype(np.uint8)
    png = io.BytesIO()
    mode = "RGBA" if img.shape[-1] == 3 else "LA"  # a grayscale patch: grey plus alpha
    Image.fromarray(np.dstack([img, alpha]), mode).resize((img.shape[1] * 8, img.shape[0] * 8), Image.NEAREST).save(
        png, "PNG")
    atomic_write_bytes(path.with_suffix(".png"), png.getvalue())
    return path


def load_patch(path: str | Path, expect_shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, PatchConfig]:
    p = Path(path)
    if not p.is_file():
        raise QNNError(f"patch file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            patch = torch.from_numpy(z["patch"].astype(np.float32))
            cfg_d = json.loads(str(z["config"]))
    except Exception as e:
        raise QNNError(f"{p}: not a patch file ({type(e).__name__})") from None
    try:
        cfg_d["patch_frac"] = None
        cfg_d["patch_shape"] = tuple(cfg_d["patch_shape"])
        cfg_d["image_size"] = tuple(cfg_d["image_size"])
        cfg = PatchConfig(**cfg_d)
    except (TypeError, KeyError, ValueError) as e:
        raise QNNError(f"{p}: malformed patch config ({type(e).__name__}: {str(e)[:100]})") from None
    except QNNError as e:
        raise QNNError(f"{p}: patch config: {e}") from None
    if patch.dim() != 3 or patch.shape[0] not in (1, 3) or tuple(patch.shape[1:]) != tuple(cfg.patch_shape):
        raise QNNError(f"{p}: patch array has shape {tuple(patch.shape)}, config says (1 or 3 channels, "
                       f"{cfg.patch_shape[0]}, {cfg.patch_shape[1]})")
    if expect_shape is not None and tuple(patch.shape[1:]) != tuple(expect_shape):
        raise QNNError(f"{p}: patch is {tuple(patch.shape[1:])}, expected {tuple(expect_shape)}")
    if not bool(((patch >= 0) & (patch <= 1)).all()):  # NaN fails both comparisons
        raise QNNError(f"{p}: patch values must be finite and in [0, 1]")
    return patch, cfg

"""Certified patch robustness by masking, for the deployed integer model (issue #37).

Two methods over rectangular masks that paste one constant, the input normalisation's zero (the dataset mean in
pixels), so that every masked image is an exact input of the integer graph: the masked pixels normalise to exactly
0.0, which the fixed 8-bit input quantizer maps to its zero point with no rounding, in PyTorch and in ONNX Runtime.

- **PatchCleanser** (Xiang et al., USENIX Security 2022), double masking. Mask set: per axis, stride
  s = ceil((n - p + 1) / k) for k positions, mask side m = p + s - 1, starts 0, s, 2s, ... <= n - m plus n - m: every
  p-window lies inside some mask (the paper's R-covering set; 2-D = product of the axes). Inference: the plurality of
  the one-mask predictions; if they all agree, that label; else, for each disagreeing mask in mask order, if all its
  two-mask predictions equal its own label, that label; else the plurality. Certified (for the predicted label y)
  when every two-mask prediction, the one-mask ones included (i == j), equals y: under a patch at any location some
  mask m* covers it, every two-mask image containing m* is the clean one, so a wrong disagreer fails its second round
  at (i, m*), a wrong plurality makes m* a disagreer whose second round passes with y.
- **CertMask-style one round** (Lyu et al. 2025, k-coverage). Mask set: per axis, stride
  s = ceil((n - p + 1) / (k - c + 1)) for k positions and coverage c, side m = p + c s - 1, starts -(c - 1) s, ...,
  every multiple of s up to n - p, clipped to the image: every p-window lies inside exactly c masks per axis (c^2
  in 2-D). Inference: the plurality of the one-mask predictions (ties: the smallest label). Certified for the
  predicted label y when, for every patch location P, with C = the masks fully covering P and u = N - |C| the masks
  that may see the patch: for every label c != y, n_y(C) > n_c(C) + u, or n_y(C) = n_c(C) + u and y < c. Sound:
  under a patch at P the masks in C predict their clean labels, the u others anything, so y keeps >= n_y(C) votes
  and c gets at most n_c(C) + u. The exact aggregation text of the paper was not available to us; this is the
  worst-case vote rule its coverage argument supports. Caveat, proved in docs/defense.md: with rectangular masks the
  masks covering two opposite-corner patch locations can only be whole-image masks, so under this worst case no
  single-round rule can certify two images of different labels; expect certified accuracy near zero here, and use
  PatchCleanser.

The decisions (`plurality`, `double_masking`, `one_round_vote`) and the mask sets are plain numpy, for the edge
runner (`export/run_edge.py`) to copy; `certify` runs them on the PyTorch model at a bit-width (eval mode = the
integer graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qnn.errors import QNNError
from qnn.layers import precision

METHODS = ("patchcleanser", "certmask")


# ---- mask sets (numpy) -----------------------------------------------------------------------------------------------

def axis_positions_limit(n: int, p: int) -> int:
    """How many distinct mask starts a p-patch on n pixels allows (one per patch location)."""
    return n - p + 1


def _check_axis(n: int, p: int, k: int, coverage: int = 1) -> None:
    if not 1 <= p < n:
        raise QNNError(f"patch size {p} must be in 1..{n - 1} for a {n}-pixel image side (a mask set needs room "
                       f"for at least two mask positions)")
    if not 1 <= coverage <= max(k, 1):
        raise QNNError(f"axis coverage {coverage} must be in 1..{k} (the mask positions per axis)")
    top = axis_positions_limit(n, p) + coverage - 1  # beyond this the stride is 1 and masks repeat
    if not 2 <= k <= top:
        raise QNNError(f"mask positions {k} must be in 2..{top} for a {p}-pixel patch on {n} pixels (one position "
                       f"is a single mask over the whole image; more than {top} repeat masks)")


def patchcleanser_axis(n: int, p: int, k: int) -> list[tuple[int, int]]:
    """PatchCleanser's 1-D R-covering set: [start, end) of masks of side p + s - 1, s = ceil((n - p + 1) / k)."""
    _check_axis(n, p, k)
    s = math.ceil((n - p + 1) / k)
    m = min(n, p + s - 1)
    starts = list(range(0, n - m + 1, s))
    if (n - m) % s:
        starts.append(n - m)  # the last mask flush with the border, as the paper's set
    return [(t, t + m) for t in starts]


def certmask_axis(n: int, p: int, k: int, coverage: int) -> list[tuple[int, int]]:
    """A 1-D set covering every p-window exactly `coverage` times with at most k masks (clipped to the image)."""
    _check_axis(n, p, k, coverage)
    s = math.ceil((n - p + 1) / (k - coverage + 1))
    m = p + coverage * s - 1
    # starts: every multiple of s from -(coverage-1)s to the last one <= n - p; any window of coverage*s
    # consecutive starts then holds exactly `coverage` of them
    starts = range(-(coverage - 1) * s, (n - p) // s * s + 1, s)
    return [(max(0, t), min(n, t + m)) for t in starts]


@dataclass(frozen=True)
class MaskSet:
    """Rectangular masks on an image: `rects[i]` = (y0, y1, x0, x1), half-open, inside the image."""

    method: str
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    positions: tuple[int, int]
    axis_coverage: int
    rects: tuple[tuple[int, int, int, int], ...]

    def __len__(self) -> int:
        return len(self.rects)

    def masks(self) -> np.ndarray:
        """(N, H, W) bool, True where the fill is pasted."""
        H, W = self.image_size
        out = np.zeros((len(self.rects), H, W), dtype=bool)
        for i, (y0, y1, x0, x1) in enumerate(self.rects):
            out[i, y0:y1, x0:x1] = True
        return out

    def cover(self) -> np.ndarray:
        """(L, N) bool: mask i holds the whole patch at location l (row-major over top-left corners)."""
        (H, W), (ph, pw) = self.image_size, self.patch_size
        r = np.asarray(self.rects, dtype=np.int64).reshape(-1, 4)
        u, v = np.arange(H - ph + 1)[:, None], np.arange(W - pw + 1)[:, None]
        rows = (r[:, 0] <= u) & (r[:, 1] >= u + ph)          # (Lu, N)
        cols = (r[:, 2] <= v) & (r[:, 3] >= v + pw)          # (Lv, N)
        return (rows[:, None, :] & cols[None, :, :]).reshape(-1, len(r))

    def to_dict(self) -> dict:
        return {"method": self.method, "image_size": list(self.image_size), "patch_size": list(self.patch_size),
                "positions": list(self.positions), "axis_coverage": self.axis_coverage, "n_masks": len(self),
                "min_coverage": int(self.cover().sum(1).min()), "rects": [list(r) for r in self.rects]}


def mask_set(method: str, image_size: tuple[int, int], patch_size: int | tuple[int, int],
             positions: int | tuple[int, int], axis_coverage: int = 1) -> MaskSet:
    """The mask set of `method` for a patch of `patch_size` (side or (h, w)) and `positions` mask starts per axis
    (`axis_coverage`: CertMask's coverage per axis; PatchCleanser's is 1). Masks are ordered row-major."""
    if method not in METHODS:
        raise QNNError(f"unknown certification method '{method}'; choose from {', '.join(METHODS)}")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    kh, kw = (positions, positions) if isinstance(positions, int) else tuple(positions)
    H, W = image_size
    if method == "patchcleanser":
        axis_coverage = 1
        rows, cols = patchcleanser_axis(H, ph, kh), patchcleanser_axis(W, pw, kw)
    else:
        rows, cols = certmask_axis(H, ph, kh, axis_coverage), certmask_axis(W, pw, kw, axis_coverage)
    rects = tuple((y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols)
    return MaskSet(method, (H, W), (ph, pw), (kh, kw), axis_coverage, rects)


def masked_images_np(x: np.ndarray, unions: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """(B, U, 3, H, W): every image of x (B, 3, H, W) with every union (U, H, W) pasted with `fill` (3,). Pixels in
    [0, 1] with fill = the mean, or normalised inputs with fill = 0: either way the masked pixels are exactly 0.0
    after normalisation."""
    return np.where(unions[None, :, None], np.asarray(fill, x.dtype)[None, None, :, None, None], x[:, None])


def pair_unions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, masks[i] | masks[j]) for i < j: the two-mask images double masking needs beyond the one-mask ones
    ((i, j) and (j, i) are the same image, (i, i) the one-mask image)."""
    i, j = np.triu_indices(len(masks), 1)
    return i, j, masks[i] | masks[j]


# ---- decisions (numpy): predictions per mask -> (prediction, certified) ----------------------------------------------

def plurality(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(B, N) labels -> (B,) the most frequent, ties to the smallest label (np.argmax's first maximum)."""
    counts = (pred[..., None] == np.arange(num_classes)).sum(-2)
    return counts.argmax(-1)


def read_pairs(first: np.ndarray, num_classes: int, evaluate, chunk: int = 64, certificates: bool = True
               ) -> np.ndarray:
    """(B, N (N - 1) / 2) two-mask labels, in `pair_unions`' order, of the pairs double masking reads (-1 for the
    others), each evaluated once by `evaluate(images, i, j)` -> labels of image `images[k]` with masks i[k], j[k].

    An image whose one-mask predictions all agree is certified iff every pair agrees too: its pairs go a chunk at a
    time and stop at the first chunk that disagrees. Any other image cannot be certified (its one-mask predictions,
    the table's diagonal, already hold two labels); its inference reads the rows of its disagreeing masks in mask
    order until one row agrees with its mask: those rows, one round per mask, batched over images. With
    `certificates` False only the inference's reads are made (the first-round-agreeing images then read none, and
    the prediction is exact but no image is certified)."""
    B, N = first.shape
    i, j = np.triu_indices(N, 1)
    pairs = np.full((B, len(i)), -1, dtype=np.int64)
    pred = plurality(first, num_classes)
    split = first != pred[:, None]
    alive = np.flatnonzero(~split.any(1)) if certificates else np.zeros(0, dtype=np.int64)
    for s in range(0, len(i), chunk):
        if not len(alive):
            break
        cols = np.arange(s, min(s + chunk, len(i)))
        img, col = np.repeat(alive, len(cols)), np.tile(cols, len(alive))
        pairs[img, col] = evaluate(img, i[col], j[col])
        alive = alive[(pairs[alive][:, cols] == pred[alive, None]).all(1)]
    index = np.full((N, N), -1, dtype=np.int64)  # (i, j) -> pair column, both orders
    index[i, j] = index[j, i] = np.arange(len(i))
    tried = np.zeros_like(split)
    pending = np.flatnonzero(split.any(1))
    while len(pending):
        left = split[pending] & ~tried[pending]
        pending = pending[left.any(1)]
        if not len(pending):
            break
        mask = (left[left.any(1)]).argmax(1)                       # each image's next disagreeing mask
        tried[pending, mask] = True
        row = index[mask][np.arange(N)[None, :] != mask[:, None]].reshape(len(pending), N - 1)
        img, col = np.repeat(pending, N - 1), row.reshape(-1)
        todo = pairs[img, col] < 0
        pairs[img[todo], col[todo]] = evaluate(img[todo], i[col[todo]], j[col[todo]])
        agrees = (pairs[pending[:, None], row] == first[pending, mask][:, None]).all(1)
        pending = pending[~agrees]
    return pairs


def pair_table(first: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(B, N, N) symmetric two-mask table from the one-mask predictions (B, N) (the diagonal) and the predictions on
    `pair_unions`' images (B, N (N - 1) / 2), in its order (-1 where `read_pairs` left one out)."""
    B, N = first.shape
    i, j = np.triu_indices(N, 1)
    t = np.empty((B, N, N), dtype=first.dtype)
    t[:, np.arange(N), np.arange(N)] = first
    t[:, i, j] = pairs
    t[:, j, i] = pairs
    return t


def double_masking(first: np.ndarray, table: np.ndarray, num_classes: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PatchCleanser's double masking and certificate.

    Args:
        first: (B, N) one-mask predictions.
        table: (B, N, N) two-mask predictions, symmetric, with table[:, i, i] == first[:, i].
    Returns:
        (prediction (B,), certified (B,): every two-mask prediction equals the prediction, forwards (B,): distinct
        masked images the inference alone needs (the N one-mask ones plus the second rounds it runs)).
    """
    B, N = first.shape
    if table.shape != (B, N, N) or not (table[:, np.arange(N), np.arange(N)] == first).all():
        raise ValueError("table must be (B, N, N) with the one-mask predictions on its diagonal")
    pred = plurality(first, num_classes)
    forwards = np.full(B, N, dtype=np.int64)
    for b in range(B):
        done = np.zeros(N, dtype=bool)  # masks whose second round ran
        for i in np.flatnonzero(first[b] != pred[b]):
            done[i] = True
            if (table[b, i] == first[b, i]).all():
                pred[b] = first[b, i]
                break
        k = int(done.sum())  # pairs with at least one member in `done`, the diagonal excluded
        forwards[b] += k * (N - 1) - k * (k - 1) // 2
    certified = (table == pred[:, None, None]).all((1, 2))
    return pred, certified, forwards


def one_round_vote(first: np.ndarray, cover: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One-round plurality vote and its worst-case certificate (see the module docstring).

    Args:
        first: (B, N) one-mask predictions.
        cover: (L, N) bool, mask n fully covers patch location l.
    Returns:
        (prediction (B,), certified (B,)).
    """
    pred = plurality(first, num_classes)
    onehot = (first[..., None] == np.arange(num_classes)).astype(np.int64)    # (B, N, C)
    votes = np.einsum("ln,bnc->blc", cover.astype(np.int64), onehot)        # (B, L, C) among the covering masks
    rival = votes + (cover.shape[1] - cover.sum(1))[None, :, None]          # c's votes if every other mask turns
    own = np.take_along_axis(votes, pred[:, None, None], 2)                 # (B, L, 1)
    labels = np.arange(num_classes)[None, None, :]
    holds = (own > rival) | ((own == rival) & (pred[:, None, None] < labels)) | (labels == pred[:, None, None])
    return pred, holds.all((1, 2))


# ---- the model (torch) -----------------------------------------------------------------------------------------------

def fill_pixels(model: nn.Module) -> torch.Tensor:
    """(C,) pixel values that normalise to exactly 0.0: the model's mean (float32, as its normalisation holds it)."""
    mean = getattr(model, "mean", None)
    if mean is None or len(mean) != getattr(model, "in_channels", len(mean)):
        raise QNNError("masking needs the model's input normalisation (a qnn.models.quantized.QuantizedNet has it)")
    return torch.tensor(tuple(mean), dtype=torch.float32)


@torch.no_grad()
def masked_predictions(model: nn.Module, x: torch.Tensor, unions: np.ndarray, fill: torch.Tensor,
                       batch: int = 256, device: str = "cpu", at: tuple | None = None) -> np.ndarray:
    """Labels of the model, as it is set (eval mode: the integer graph), on images with a union of masks pasted:
    (B, U) for every image with every union, or (M,) for the (image indices, union indices) pairs `at`; the masked
    images go through in batches of `batch`."""
    B, U = len(x), len(unions)
    img, uni = (np.repeat(np.arange(B), U), np.tile(np.arange(U), B)) if at is None else at
    out = torch.empty(len(img), dtype=torch.long)
    xs, un = x.to(device), torch.as_tensor(unions, device=device)
    f = fill.to(device=device, dtype=x.dtype).view(1, -1, 1, 1)
    for s in range(0, len(img), batch):
        a, u = torch.as_tensor(img[s:s + batch], device=device), torch.as_tensor(uni[s:s + batch], device=device)
        out[s:s + len(a)] = model(torch.where(un[u][:, None], f, xs[a])).argmax(1).cpu()
    return out.numpy() if at is not None else out.view(B, U).numpy()


@dataclass
class Certification:
    """Per image: the defended prediction, whether it is certified (for that label), the masked images its inference
    and its certificate ran."""

    pred: np.ndarray
    certified: np.ndarray
    inference_forwards: np.ndarray
    certify_forwards: np.ndarray  # masked images the certificate ran: all pairs where the first round agreed
    worst_forwards: int  # masked images per image in the worst case (N + N (N - 1) / 2 for PatchCleanser)

    def summary(self, y: np.ndarray) -> dict:
        y = np.asarray(y)
        return {"n_images": len(y), "clean_acc_pct": 100.0 * float((self.pred == y).mean()),
                "certified_acc_pct": 100.0 * float((self.certified & (self.pred == y)).mean()),
                "forwards_per_image_certify": float(self.certify_forwards.mean()),
                "forwards_per_image_certify_worst": self.worst_forwards,
                "forwards_per_image_inference_mean": float(self.inference_forwards.mean())}


def certify(model: nn.Module, x: torch.Tensor, ms: MaskSet, bits: int | None = None, batch: int = 256,
            device: str = "cpu", certificates: bool = True) -> Certification:
    """Defended predictions and certificates of `model` (at `bits`, or as it is set) on images x (pixels in [0, 1])
    with the mask set `ms`, by its method. Every masked image is evaluated at most once: the one-mask ones, then for
    PatchCleanser the unordered pairs of masks the decision reads (`read_pairs`; `certificates` False: the defended
    predictions alone, none certified)."""
    with precision(model, bits):
        model.eval()
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        fill, masks = fill_pixels(model), ms.masks()
        first = masked_predictions(model, x, masks, fill, batch, device)
        num_classes = max(num_classes, int(first.max()) + 1)
        if ms.method == "patchcleanser":
            _, _, unions = pair_unions(masks)
            column = np.full((len(masks), len(masks)), -1, dtype=np.int64)
            column[np.triu_indices(len(masks), 1)] = np.arange(len(unions))
            pairs = read_pairs(first, num_classes, lambda img, i, j: masked_predictions(
                model, x, unions, fill, batch, device, at=(img, column[i, j])), certificates=certificates)
            num_classes = max(num_classes, int(pairs.max(initial=0)) + 1)
            pred, cert, fw = double_masking(first, pair_table(first, pairs), num_classes)
            return Certification(pred, cert, fw, len(masks) + (pairs >= 0).sum(1), len(masks) + len(unions))
        cover = ms.cover()
        # in chunks of images: the vote counts are (images, locations, classes)
        parts = [one_round_vote(first[i:i + 128], cover, num_classes) for i in range(0, len(first), 128)]
        pred, cert = (np.concatenate([q[k] for q in parts]) for k in (0, 1))
        return Certification(pred, cert, np.full(len(x), len(masks)), np.full(len(x), len(masks)), len(masks))


def attack_cross_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ms: MaskSet, bits: int,
                       cert: Certification | None = None, iterations: int = 5, step: float = 0.1, seed: int = 0,
                       batch: int = 256, device: str = "cpu") -> dict:
    """A per-image patch attack (PGD inside a mask of the certified patch size, random place: qnn.attacks) against
    the undefended model at `bits`, on the images certified correct; the defended inference must keep every label.

    Returns counts: certified images, those the patch fools undefended, and `violations` (certified images the
    defended inference gets wrong under the patch: a bug if ever non-zero), with their indices into x.
    """
    from qnn.attacks.patch import PatchConfig, per_image_patch_attack

    cert = cert if cert is not None else certify(model, x, ms, bits, batch, device)
    ok = np.flatnonzero(cert.certified & (cert.pred == y.numpy()))
    res = {"bits": bits, "patch_size": list(ms.patch_size), "iterations": iterations, "n_certified": len(ok),
           "n_undefended_fooled": 0, "violations": 0, "violating_images": []}
    if len(ok) == 0:
        return res
    with precision(model, bits):
        pcfg = PatchConfig(patch_shape=ms.patch_size, iterations=iterations, step=step, seed=seed,
                           image_size=ms.image_size, num_classes=int(getattr(model, "num_classes", 10) or 10))
        xs, ys = x[ok], y[ok]
        req = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            xadv, _, _ = per_image_patch_attack(model, xs, ys, pcfg, device=device)
        finally:
            for p, r in zip(model.parameters(), req):
                p.requires_grad_(r)
        xadv = xadv.cpu()
        with torch.no_grad():
            plain = torch.cat([model(xadv[i:i + batch].to(device)).argmax(1).cpu() for i in range(0, len(xadv), batch)])
        defended = certify(model, xadv, ms, bits, batch, device, certificates=False).pred
        bad = ok[defended != ys.numpy()]
        res.update(n_undefended_fooled=int((plain != ys).sum()), violations=len(bad),
                   violating_images=[int(i) for i in bad])
    return res

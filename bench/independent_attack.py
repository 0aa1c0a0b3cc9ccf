"""An independent universal-patch attack, written without the project's attack code (qnn.attacks), as a check on it:
Adam on the patch pixels, untargeted (maximise the cross-entropy of the true label), a fresh random position for
every image at every step, several independent random starts (each on the full batch), crafted on the first
`--n-craft` training images and scored on the last `--n-score` test images at `--placements` random positions each.
Only the model's forward (the straight-through form of the deployed integer arithmetic) is used.

    python bench/independent_attack.py --checkpoint qat=runs/.../model.pt --checkpoint qadtr=runs/.../model.pt \\
        --bits 4 --patch-size 10 --dataset cifar10 --data-dir ../shared/data/cifar10 --out results/independent_attack

Prints and writes every start's ASR and the best (the maximum over starts, as an attacker who keeps the best).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, markdown_table, write_results  # noqa: E402


def paste(x, patch, ys, xs):
    """x with `patch` (3,p,p) pasted at per-image top-left corners (ys, xs), by index arithmetic (differentiable)."""
    import torch

    n, _, H, W = x.shape
    p = patch.shape[-1]
    rows = torch.arange(H)[None, :, None]
    cols = torch.arange(W)[None, None, :]
    inside = ((rows >= ys[:, None, None]) & (rows < ys[:, None, None] + p)
              & (cols >= xs[:, None, None]) & (cols < xs[:, None, None] + p))          # n,H,W
    canvas = torch.zeros(n, 3, H + p, W + p, dtype=x.dtype)
    for i in range(n):  # place the patch on a canvas at the corner, then crop the image window
        canvas[i, :, ys[i]:ys[i] + p, xs[i]:xs[i] + p] = patch
    m = inside[:, None].to(x.dtype)
    return x * (1 - m) + canvas[:, :, :H, :W] * m


def craft(model, x, y, size: int, iterations: int, lr: float, batch: int, seed: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    patch = torch.rand(3, size, size, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=lr)
    H, W = x.shape[-2:]
    for _ in range(iterations):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        ys = torch.randint(0, H - size + 1, (batch,), generator=g)
        xs = torch.randint(0, W - size + 1, (batch,), generator=g)
        loss = -F.cross_entropy(model(paste(x[idx], patch, ys, xs)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            patch.clamp_(0, 1)
    return patch.detach()


def asr(model, x, y, patch, placements: int, seed: int) -> float:
    import torch

    g = torch.Generator().manual_seed(seed)
    H, W = x.shape[-2:]
    p = patch.shape[-1]
    with torch.no_grad():
        clean = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
        ok = clean == y
        fooled, total = 0, 0
        for _ in range(placements):
            ys = torch.randint(0, H - p + 1, (len(x),), generator=g)
            xs = torch.randint(0, W - p + 1, (len(x),), generator=g)
            pred = torch.cat([model(paste(x[i:i + 500], patch, ys[i:i + 500], xs[i:i + 500])).argmax(1)
                              for i in range(0, len(x), 500)])
            fooled += int((pred[ok] != y[ok]).sum())
            total += int(ok.sum())
    return 100.0 * fooled / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", required=True, help="NAME=PATH of a qnn checkpoint (repeatable)")
    ap.add_argument("--bits", type=int, default=4, help="bit-width attacked and scored (default 4)")
    ap.add_argument("--patch-size", type=int, default=10, help="square patch side in pixels (default 10)")
    ap.add_argument("--iterations", type=int, default=500, help="Adam steps (default 500)")
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    ap.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    ap.add_argument("--starts", type=int, default=2, help="independent random starts (default 2)")
    ap.add_argument("--n-craft", type=int, default=2000, help="crafting images: the first n training images")
    ap.add_argument("--n-score", type=int, default=2000, help="scored images: the last n test images")
    ap.add_argument("--placements", type=int, default=3, help="random positions per scored image (default 3)")
    ap.add_argument("--dataset", default="cifar10", help="dataset (default cifar10)")
    ap.add_argument("--data-dir", default="../shared/data/cifar10", help="dataset folder (default ../shared/data/cifar10)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default="results/independent_attack", help="results path without extension")
    a = ap.parse_args(argv)
    import torch

    from qnn.checkpoint import load_checkpoint, sha256_file
    from qnn.data import load_dataset
    from qnn.errors import QNNError
    from qnn.layers import precision

    torch.set_num_threads(a.threads)
    try:
        if min(a.patch_size, a.iterations, a.batch, a.starts, a.n_craft, a.n_score, a.placements) < 1 or a.lr <= 0:
            raise QNNError("sizes, counts and the learning rate must be positive")
        specs = [c.partition("=") for c in a.checkpoint]
        if any(not n or not p for n, _, p in specs):
            raise QNNError("--checkpoint takes NAME=PATH")
        train = load_dataset(a.dataset, "train", a.data_dir)
        test = load_dataset(a.dataset, "test", a.data_dir)
        xc, yc = train.subset(a.n_craft).tensors()
        xs, ys = test.subset(a.n_score, start=len(test) - a.n_score).tensors()
        models = [(n, p, load_checkpoint(p)[0]) for n, _, p in specs]
    except QNNError as e:
        print(f"independent_attack: error: {e}", file=sys.stderr)
        return 2
    rows, res = [], {}
    for name, path, model in models:
        model.eval()
        for q in model.parameters():
            q.requires_grad_(False)
        with precision(model, a.bits):
            starts = []
            for s in range(a.starts):
                t0 = time.perf_counter()
                patch = craft(model, xc, yc, a.patch_size, a.iterations, a.lr, a.batch, seed=1000 + s)
                starts.append(asr(model, xs, ys, patch, a.placements, seed=5000))
                print(f"{name} start {s}: ASR {starts[-1]:.1f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
            res[name] = {"checkpoint": path, "checkpoint_sha256": sha256_file(path), "start_asr_pct": starts,
                         "asr_pct": max(starts)}
            rows.append([name, a.bits, " / ".join(f"{v:.1f}" for v in starts), max(starts)])
    md = (f"Independent universal-patch attack (bench/independent_attack.py, none of qnn.attacks): Adam {a.lr}, "
          f"{a.iterations} iterations, batch {a.batch}, {a.patch_size}x{a.patch_size} square, a fresh random position "
          f"per image per step, {a.starts} starts; crafted on the first {a.n_craft} training images, scored on the last "
          f"{a.n_score} test images at {a.placements} random positions each. Command: `{command_line('bench/independent_attack.py', argv)}`\n\n"
          + markdown_table(["model", "bits", "ASR % per start", "best ASR %"], rows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(a.out, {"results": res, "config": vars(a), "threads": a.threads}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Patch-optimisation throughput on CPU: a 6x6 universal patch, 500 iterations over 1000 images (batch 128, EOT 1)
on ResNet-20 at a given bit-width; prints images x EOT samples per second and the wall time (target: < 10 min).

    python bench/attack_speed.py --bits 4 --threads 2 [--checkpoint C]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import environment, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="qnn checkpoint (default: pretrained float ResNet-20, calibrated)")
    ap.add_argument("--weights", default="../shared/data/weights/resnet20-12fca82f.th", help="pretrained float "
                    "ResNet-20 weights (akamaster .th), used when --checkpoint is not given (default "
                    "../shared/data/weights/resnet20-12fca82f.th)")
    ap.add_argument("--data-dir", default="../shared/data/cifar10", help="CIFAR-10 folder; the patch is optimised on "
                    "its first --n-images training images (default ../shared/data/cifar10)")
    ap.add_argument("--bits", default="32,4",
                    help="comma-separated bit-widths to time, each 2..8 or 32 (float) (default 32,4)")
    ap.add_argument("--iterations", type=int, default=500,
                    help="patch optimisation iterations per bit-width (default 500)")
    ap.add_argument("--n-images", type=int, default=1000,
                    help="CIFAR-10 training images the patch is optimised over (default 1000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default="results/attack_speed", help="results path without extension (.json and .md are "
                    "written; default results/attack_speed)")
    a = ap.parse_args(argv)
    import torch

    from qnn.attacks.patch import PatchConfig, optimize_universal_patch
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, load_float_weights
    from qnn.data import load_cifar10
    from qnn.layers import ensure_calibrated_, parse_bits, precision
    from qnn.models import create_model

    torch.set_num_threads(a.threads)
    if a.checkpoint:
        model, _ = load_checkpoint(a.checkpoint)
    else:
        model = load_float_weights(create_model("resnet20"), a.weights)
    x, y = load_cifar10(a.data_dir, "train").subset(a.n_images).tensors()
    rows, res = [], {}
    for b in parse_bits(a.bits):
        with precision(model, b):
            ensure_calibrated_(model, x[:128])
            cfg = PatchConfig(patch_shape=(6, 6), iterations=a.iterations, batch_size=128)
            t0 = time.perf_counter()
            _, info = optimize_universal_patch(model, x, y, cfg, progress=True)
            wall = time.perf_counter() - t0
            res[str(b)] = {"wall_s": wall, "optimise_s": info["seconds"], "images_x_eot_per_s": info["images_x_eot_per_s"]}
            rows.append([b, info["images_x_eot_per_s"], info["seconds"], wall])
            print(f"{b} bits: {info['images_x_eot_per_s']:.0f} images x EOT / s, {wall:.0f} s total", flush=True)
    md = (f"6x6 universal patch, {a.iterations} iterations x batch 128 over {a.n_images} images, ResNet-20, "
          f"{a.threads} threads. Command: `python bench/attack_speed.py --bits {a.bits} --threads {a.threads}`\n\n"
          + markdown_table(["bits", "images x EOT / s", "optimisation s", "wall s (incl. restart selection)"], rows))
    print(md)
    atomic_write_json(a.out + ".json", {"results": res, "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

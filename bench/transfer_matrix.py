"""Transfer matrices on the undefended switchable QAT ResNet-20: a universal patch crafted at float / 8 / 4 / 2 bits,
ASR on every target bit-width; 6x6 and 8x8 squares.

    python bench/transfer_matrix.py --checkpoint runs/qat_resnet20_brevitas/switchable_r8_kd_e5/model.pt

Writes results/transfer_resnet20.{json,md} and one heat-map PNG per patch size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import environment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/qat_resnet20_brevitas/switchable_r8_kd_e5/model.pt",
                    help="qnn checkpoint attacked (default runs/qat_resnet20_brevitas/switchable_r8_kd_e5/model.pt, "
                    "the QAT table's switchable wide-residual row)")
    ap.add_argument("--data-dir", default="../shared/data/cifar10",
                    help="CIFAR-10 folder (default ../shared/data/cifar10)")
    ap.add_argument("--sizes", default="6,8", help="comma-separated square patch sizes in pixels, one matrix each "
                    "(default 6,8)")
    ap.add_argument("--sources", default="32,8,4,2", help="comma-separated bit-widths the patches are crafted at "
                    "(rows), each 2..8 or 32 (default 32,8,4,2)")
    ap.add_argument("--targets", default="32,8,4,2", help="comma-separated bit-widths the patches are evaluated at "
                    "(columns), each 2..8 or 32 (default 32,8,4,2)")
    ap.add_argument("--iterations", type=int, default=500, help="signed-gradient iterations per patch (default 500)")
    ap.add_argument("--n-attack", type=int, default=1000, help="training images the patches are crafted on, the first "
                    "N (default 1000)")
    ap.add_argument("--n-eval", type=int, default=2000, help="test images the ASR is measured on, the first N "
                    "(default 2000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default="results/transfer_resnet20", help="results path without extension (.json, .md, "
                    "one _SxS.png per size and an _patches folder are written; default results/transfer_resnet20)")
    a = ap.parse_args(argv)
    import torch

    from qnn.attacks.patch import PatchConfig
    from qnn.attacks.transfer import heatmap_png, transfer_matrix
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
    from qnn.data import load_cifar10
    from qnn.layers import parse_bits

    torch.set_num_threads(a.threads)
    model, _ = load_checkpoint(a.checkpoint)
    xa, ya = load_cifar10(a.data_dir, "train").subset(a.n_attack).tensors()
    xe, ye = load_cifar10(a.data_dir, "test").subset(a.n_eval).tensors()
    out, md = {}, [f"Universal patch transfer, {a.checkpoint}; crafted on {a.n_attack} train images "
                   f"({a.iterations} signed-gradient iterations, random placement), ASR on {a.n_eval} test images. "
                   f"Command: `python bench/transfer_matrix.py --checkpoint {a.checkpoint} --iterations {a.iterations} "
                   f"--n-attack {a.n_attack} --n-eval {a.n_eval} --threads {a.threads}`\n"]
    for s in [int(v) for v in a.sizes.split(",")]:
        cfg = PatchConfig(patch_shape=(s, s), iterations=a.iterations)
        m = transfer_matrix(model, xa, ya, xe, ye, cfg, parse_bits(a.sources), parse_bits(a.targets),
                            patch_dir=Path(a.out + "_patches") / f"{s}x{s}", progress=True)
        out[f"{s}x{s}"] = m
        heatmap_png(m, f"{a.out}_{s}x{s}.png", f"{s}x{s} universal patch ASR (%), undefended switchable QAT ResNet-20")
        md.append(f"\n### {s}x{s} patch (rows: crafted on, columns: evaluated on; ASR %)\n")
        md.append("| source \\ target | " + " | ".join(f"{t}b" for t in m["targets"]) + " |")
        md.append("|---|" + "---|" * len(m["targets"]))
        for src in m["sources"]:
            md.append(f"| {src}b | " + " | ".join(f"{m['rows'][src]['targets'][t]['asr_pct']:.1f}" for t in m["targets"]) + " |")
        clean = {t: m["rows"][m["sources"][0]]["targets"][t]["clean_acc_pct"] for t in m["targets"]}
        md.append(f"\nclean accuracy on these images: {', '.join(f'{t}b {v:.1f}%' for t, v in clean.items())}\n")
    atomic_write_json(a.out + ".json", {"matrices": out, "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", "\n".join(md).encode())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

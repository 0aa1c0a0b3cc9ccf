"""Write the `cpu` defense budget's own images as a small CIFAR-10 folder for a GPU machine that cannot see
../shared (the device tool carries at most 64 MiB): the first `train_subset` training images plus the last
`n_attack` (so that `len(train) - n_attack` still picks the same attack images), the first `n_eval` test images,
and the pretrained weights. LZMA-compressed npz members (np.load reads them).

    python bench/gpu_data.py --out .gpudata        # then carry .gpudata and use bench/gpu_sweep.sh
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.defense_table import BUDGETS  # noqa: E402


def write_npz(path: Path, **arrays) -> None:
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as z:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, v)
            z.writestr(k + ".npy", buf.getvalue())
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="cpu", help="CIFAR-10 defense budget whose images and weights are copied: cpu "
                    "(20000 + 500 attack training images, 2000 test images) or full (all images) (default cpu)")
    ap.add_argument("--out", default=".gpudata", help="output folder; cifar10/train.npz, cifar10/test.npz and "
                    "weights/ are written in it (default .gpudata)")
    a = ap.parse_args(argv)
    if a.budget not in BUDGETS or BUDGETS[a.budget]["dataset"] != "cifar10":
        print(f"gpu_data: error: budget must be a CIFAR-10 one ({', '.join(k for k, v in BUDGETS.items() if v['dataset'] == 'cifar10')})",
              file=sys.stderr)
        return 2
    b = BUDGETS[a.budget]
    src, out = Path(b["data_dir"]), Path(a.out)
    for f in (src / "train.npz", src / "test.npz", Path(b["init"])):
        if not f.is_file():
            print(f"gpu_data: error: {f} not found (run from the repository root, ../shared beside it)", file=sys.stderr)
            return 2
    (out / "cifar10").mkdir(parents=True, exist_ok=True)
    (out / "weights").mkdir(parents=True, exist_ok=True)
    with np.load(src / "train.npz") as tr:
        n, k = b["train_subset"] or len(tr["y"]), b["n_attack"]
        if n + k >= len(tr["y"]):  # the whole set already holds both (and must not repeat the attack images)
            n, k = len(tr["y"]), 0
        keep = np.r_[0:n, len(tr["y"]) - k:len(tr["y"])]
        write_npz(out / "cifar10" / "train.npz", x=tr["x"][keep], y=tr["y"][keep])
    with np.load(src / "test.npz") as te:
        write_npz(out / "cifar10" / "test.npz", x=te["x"][: b["n_eval"]], y=te["y"][: b["n_eval"]])
    shutil.copy(b["init"], out / "weights" / Path(b["init"]).name)
    print(f"wrote {out}: {n} + {k} training images, {b['n_eval']} test images, {Path(b['init']).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

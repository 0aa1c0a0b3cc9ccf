"""Write the `cpu` defense budget's own images as a small CIFAR-10 folder for a GPU machine that cannot see
../shared (the device tool carries at most 64 MiB): the first `train_subset` training images (the protocol's
crafting images are among them), the first `test_subset` test images (evaluated during training) plus the protocol's
last `n_score` (so that `len(test) - n_score` still picks the same scored images), and the pretrained weights.
LZMA-compressed npz members (np.load reads them). Left-out bit-widths are re-calibrated on the training images this
folder holds, so their figures can differ from a run on the whole set.

    python bench/gpu_data.py --out .gpudata        # then carry .gpudata and run bench/defense_table.py --device cuda there
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

from qnn.defense_grid import BUDGETS  # noqa: E402
from qnn.evaluation import PROTOCOLS  # noqa: E402


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
    if a.budget not in BUDGETS or BUDGETS[a.budget].dataset != "cifar10":
        print(f"gpu_data: error: budget must be a CIFAR-10 one ({', '.join(k for k, v in BUDGETS.items() if v.dataset == 'cifar10')})",
              file=sys.stderr)
        return 2
    b = BUDGETS[a.budget]
    p = PROTOCOLS.get(a.budget, PROTOCOLS["cpu"])
    src, out = Path(b.data_dir), Path(a.out)
    for f in (src / "train.npz", src / "test.npz", Path(b.init)):
        if not f.is_file():
            print(f"gpu_data: error: {f} not found (run from the repository root, ../shared beside it)", file=sys.stderr)
            return 2
    (out / "cifar10").mkdir(parents=True, exist_ok=True)
    (out / "weights").mkdir(parents=True, exist_ok=True)
    with np.load(src / "train.npz") as tr:
        n = max(b.train_subset or len(tr["y"]), p.n_craft)
        write_npz(out / "cifar10" / "train.npz", x=tr["x"][:n], y=tr["y"][:n])
    with np.load(src / "test.npz") as te:
        m, k = b.test_subset, p.n_score
        if m + k >= len(te["y"]):  # the whole set already holds both (and must not repeat the scored images)
            m, k = len(te["y"]), 0
        keep = np.r_[0:m, len(te["y"]) - k:len(te["y"])]
        write_npz(out / "cifar10" / "test.npz", x=te["x"][keep], y=te["y"][keep])
    shutil.copy(b.init, out / "weights" / Path(b.init).name)
    print(f"wrote {out}: {n} training images, {m} + {k} test images, {Path(b.init).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The download a device needs: an edge bundle with int8-container weights against the same bundle with its 2/4-bit
weights packed (`qnn bundle --pack-weights`), both run by bench/run_edge.py.

    python bench/packed_bundle.py --checkpoint runs/qat_resnet20_brevitas/switchable_r8_kd_e5/model.pt --bits 2 \\
        --dataset cifar10 --data-dir ../shared/data/cifar10 --n 500 --out results/packed_bundle_resnet20_w2

Reports the bytes of each bundle (model + packed weights, and the whole folder), run_edge's verdict on each, and
whether the two give identical logits on every bundled image.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, environment, markdown_table, write_results  # noqa: E402

RUN_EDGE = Path(__file__).resolve().parent / "run_edge.py"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="qnn checkpoint (model.pt)")
    ap.add_argument("--bits", type=int, default=2, help="bit-width to deploy (2 or 4 packs; default 2)")
    ap.add_argument("--dataset", default="synthetic", help="synthetic | cifar10 | imagefolder (default synthetic)")
    ap.add_argument("--data-dir", help="dataset folder")
    ap.add_argument("--n", type=int, default=500, help="evaluation images in each bundle (default 500)")
    ap.add_argument("--out", required=True, help="results path without extension (.json and .md are written)")
    a = ap.parse_args(argv)

    import numpy as np

    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset
    from qnn.export.bundle import PACKED_WEIGHTS, build_bundle

    model, _ = load_checkpoint(a.checkpoint)
    ds = load_dataset(a.dataset, "test", data_dir=a.data_dir).subset(a.n)
    rows, res = [], {}
    with tempfile.TemporaryDirectory() as td:
        logits = {}
        for kind, pack in (("int8 containers", False), ("packed 2/4-bit", True)):
            d = build_bundle(model, a.bits, Path(td) / kind.split()[0], ds.x, ds.y, [], pack_weights=pack)
            r = subprocess.run([sys.executable, str(RUN_EDGE), "--bundle", str(d), "--threads", "2", "--skip-latency",
                                "--save-logits", str(Path(td) / f"{d.name}.npz")], capture_output=True, text=True)
            logits[kind] = np.load(Path(td) / f"{d.name}.npz")
            model_bytes = sum(f.stat().st_size for f in (d / "model.onnx", d / PACKED_WEIGHTS) if f.exists())
            res[kind] = {"model_bytes": model_bytes, "bundle_bytes": sum(f.stat().st_size for f in d.iterdir()),
                         "run_edge_exit": r.returncode, "run_edge_pass": r.returncode == 0 and "PASS" in r.stdout,
                         "fully_integer": "fully integer" in r.stdout}
            rows.append([kind, f"{model_bytes / 1024:.1f}", f"{res[kind]['bundle_bytes'] / 1024:.1f}",
                         "PASS" if res[kind]["run_edge_pass"] else f"FAIL (exit {r.returncode})"])
        a_, b_ = logits.values()
        same = sorted(a_.files) == sorted(b_.files) and all(np.array_equal(a_[k], b_[k]) for k in a_.files)
    ratio = res["int8 containers"]["model_bytes"] / res["packed 2/4-bit"]["model_bytes"]
    payload = {"command": command_line("bench/packed_bundle.py", argv), "environment": environment(2), "checkpoint": a.checkpoint,
               "bits": a.bits, "n_images": a.n, "bundles": res, "model_bytes_ratio": ratio,
               "logits_identical": same}
    md = (f"Edge bundle size, {a.bits}-bit weights, `{a.checkpoint}`, {a.n} images. Command: `{payload['command']}`\n\n"
          + markdown_table(["bundle", "model + weights KiB", "whole bundle KiB", "run_edge.py"], rows)
          + f"\n\nThe packed model is {ratio:.2f}x smaller; logits identical on every image: {same}. The first conv and "
          "the classifier stay 8-bit (int8 in the model file); the bundle also holds the evaluation images.\n")
    write_results(a.out, payload, md)
    print(md)
    return 0 if same and all(r["run_edge_pass"] for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

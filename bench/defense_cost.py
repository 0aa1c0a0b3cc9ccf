"""Training cost of defenses relative to plain QAT, measured back to back in one process (one epoch each, the
defense table's `cpu` settings: ResNet-20 from the shared pretrained weights, 20k CIFAR-10 images, batch 128).

    python bench/defense_cost.py [--variants 'qadtr;qadtr:{"gir_every": 32}'] [--threads 2]

Each variant is NAME or NAME:JSON (defense options). Prints and writes seconds per epoch and the ratio to QAT
(results/defense_cost.{json,md}). Cost ratios move with the machine and its load: compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default='qadtr;qadtr:{"gir_every": 32}')
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--init", default="../shared/data/weights/resnet20-12fca82f.th")
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/defense_cost")
    a = ap.parse_args(argv)
    variants = [("none", {})]
    for v in [s for s in a.variants.split(";") if s.strip()]:
        name, _, js = v.partition(":")
        try:
            variants.append((name.strip(), json.loads(js) if js.strip() else {}))
        except ValueError as e:
            print(f"defense_cost: error: bad options for {name!r}: {e}", file=sys.stderr)
            return 2
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json
    from qnn.config import TrainConfig
    from qnn.errors import QNNError
    from qnn.train import train

    rows, res = [], []
    with tempfile.TemporaryDirectory() as td:
        for i, (name, opts) in enumerate(variants):
            try:
                r = train(TrainConfig(model="resnet20", dataset="cifar10", data_dir=a.data_dir, init=a.init,
                                      bits=[2, 4, 8, 32], epochs=1, lr=0.02, batch_size=128, train_subset=a.train_subset,
                                      test_subset=200, out_dir=f"{td}/{i}", defense=name, defense_args=opts,
                                      threads=a.threads, progress=False))
            except QNNError as e:
                print(f"defense_cost: error: {e}", file=sys.stderr)
                return 2
            sec = r["history"][-1]["epoch_seconds"]
            res.append({"defense": name, "options": opts, "epoch_seconds": sec, "ratio_vs_qat": sec / res[0]["epoch_seconds"] if res else 1.0})
            rows.append([name, json.dumps(opts), sec, res[-1]["ratio_vs_qat"]])
            print(f"{name} {json.dumps(opts)}: {sec:.1f} s/epoch ({res[-1]['ratio_vs_qat']:.2f}x QAT)", flush=True)
    md = (f"Defense training cost, one epoch each, back to back. Command: `python bench/defense_cost.py "
          f"--variants '{a.variants}' --threads {a.threads}`\n\n"
          + markdown_table(["defense", "options", "s / epoch", "ratio vs QAT"], rows))
    print(md)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out + ".json", {"results": res, "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

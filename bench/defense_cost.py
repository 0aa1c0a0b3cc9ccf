"""Training cost of defenses relative to plain QAT, measured back to back in one process (one epoch each, the
defense table's `cpu` settings: ResNet-20 from the shared pretrained weights, 20k CIFAR-10 images, batch 128).

    python bench/defense_cost.py [--variants 'qadtr;qadtr:{"gir_every": 32}'] [--threads 2]
    python bench/defense_cost.py --steps 60     # interleaved: step 1 of every variant, then step 2, ...

Each variant is NAME or NAME:JSON (defense options). Prints and writes seconds per epoch and the ratio to QAT
(results/defense_cost.{json,md}). Cost ratios move with the machine and its load: compare within one run only.
On a machine whose speed drifts (shared cloud cores: plain QAT measured 104 s and 125 s per epoch in two runs here),
`--steps N` is the steadier measure: every variant trains N steps on the same batches, one step of each in turn (the
order rotates every step), so a slow spell costs them all alike; s/epoch is then the mean step time x steps per epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import environment, markdown_table  # noqa: E402
from qnn.train_cost import interleaved_epoch_seconds as interleaved  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default='qadtr;qadtr:{"gir_every": 32}', help="semicolon-separated defenses timed "
                    "against plain QAT, each NAME (none, pbat, dwq, qadtr) or NAME:JSON defense options (default "
                    "'qadtr;qadtr:{\"gir_every\": 32}')")
    ap.add_argument("--data-dir", default="../shared/data/cifar10",
                    help="CIFAR-10 folder (default ../shared/data/cifar10)")
    ap.add_argument("--init", default="../shared/data/weights/resnet20-12fca82f.th", help="pretrained float ResNet-20 "
                    "weights every variant starts from (default ../shared/data/weights/resnet20-12fca82f.th)")
    ap.add_argument("--train-subset", type=int, default=20000,
                    help="CIFAR-10 training images in one epoch (sets the steps per epoch) (default 20000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default="results/defense_cost", help="results path without extension (.json and .md are "
                    "written; default results/defense_cost)")
    ap.add_argument("--steps", type=int, default=0, help="N > 0: N interleaved steps per variant instead of whole epochs")
    ap.add_argument("--warmup", type=int, default=3, help="interleaved steps per variant left out of the mean")
    a = ap.parse_args(argv)
    if a.steps < 0 or (a.steps and a.steps <= a.warmup):
        print(f"defense_cost: error: --steps must be 0 or more than --warmup ({a.warmup}), got {a.steps}", file=sys.stderr)
        return 2
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

    cfgs = [TrainConfig(model="resnet20", dataset="cifar10", data_dir=a.data_dir, init=a.init, bits=[2, 4, 8, 32],
                        epochs=1, lr=0.02, batch_size=128, train_subset=a.train_subset, test_subset=200,
                        defense=name, defense_args=opts, threads=a.threads, progress=False) for name, opts in variants]
    try:
        secs = interleaved(cfgs, a.steps, a.warmup) if a.steps else [whole_epoch(c) for c in cfgs]
    except QNNError as e:
        print(f"defense_cost: error: {e}", file=sys.stderr)
        return 2
    rows, res = [], []
    for (name, opts), sec in zip(variants, secs):
        res.append({"defense": name, "options": opts, "epoch_seconds": sec, "ratio_vs_qat": sec / secs[0]})
        rows.append([name, json.dumps(opts), sec, res[-1]["ratio_vs_qat"]])
        print(f"{name} {json.dumps(opts)}: {sec:.1f} s/epoch ({res[-1]['ratio_vs_qat']:.2f}x QAT)", flush=True)
    how = (f"{a.steps} interleaved steps per variant (first {a.warmup} left out), s/epoch = mean step time x steps per "
           "epoch" if a.steps else "one epoch each, back to back")
    cmd = f"python bench/defense_cost.py --variants '{a.variants}' --threads {a.threads}" + (
        f" --steps {a.steps} --warmup {a.warmup}" if a.steps else "")
    md = (f"Defense training cost, {how}. Command: `{cmd}`\n\n"
          + markdown_table(["defense", "options", "s / epoch", "ratio vs QAT"], rows))
    print(md)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out + ".json", {"results": res, "command": cmd, "steps": a.steps, "warmup": a.warmup,
                                        "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    return 0


def whole_epoch(cfg) -> float:
    """Seconds of one real training epoch (qnn.train.train) of this configuration."""
    import tempfile
    from dataclasses import replace

    from qnn.train import train

    with tempfile.TemporaryDirectory() as td:
        return train(replace(cfg, out_dir=td))["history"][-1]["epoch_seconds"]


if __name__ == "__main__":
    sys.exit(main())

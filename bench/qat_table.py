"""Real QAT result: pretrained ResNet-20 fine-tuned on the shared CIFAR-10 as float, as ONE switchable model over
{2,4,8,32}, and as separately trained fixed-precision models (8, 4, 2 bits); clean test accuracy at 32/8/4/2.

    python bench/qat_table.py --data-dir ../shared/data/cifar10 --weights ../shared/data/weights/resnet20-12fca82f.th

Resumable: finished runs are reused, an interrupted run continues from its last epoch.
Writes results/qat_resnet20.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--weights", default="../shared/data/weights/resnet20-12fca82f.th")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the switchable run")
    ap.add_argument("--float-epochs", type=int, default=2, help="epochs of the float fine-tune")
    ap.add_argument("--fixed-epochs", type=int, default=2, help="epochs of each fixed-precision run (more steps per bit-width than the switchable run gets)")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-subset", type=int)
    ap.add_argument("--test-subset", type=int)
    ap.add_argument("--runs-dir", default="runs/qat_resnet20")
    ap.add_argument("--out", default="results/qat_resnet20")
    a = ap.parse_args(argv)

    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
    from qnn.config import TrainConfig
    from qnn.data import load_dataset
    from qnn.errors import QNNError
    from qnn.train import evaluate, train

    runs = {"float": [32], "switchable": [2, 4, 8, 32], "fixed8": [8], "fixed4": [4], "fixed2": [2]}
    try:
        test = load_dataset("cifar10", "test", a.data_dir).subset(a.test_subset)
        results = {}
        for name, bits in runs.items():
            out = Path(a.runs_dir) / name
            if not (out / "model.pt").is_file():
                cfg = TrainConfig(model="resnet20", dataset="cifar10", data_dir=a.data_dir, init=a.weights, bits=bits,
                                  epochs=(a.fixed_epochs if name.startswith("fixed") else a.float_epochs if name == "float" else a.epochs), lr=a.lr, threads=a.threads, train_subset=a.train_subset,
                                  test_subset=a.test_subset, out_dir=str(out), resume=True, eval_bits=bits)
                print(f"== training {name} (bits {bits})", flush=True)
                train(cfg)
            model, obj = load_checkpoint(out / "model.pt")
            acc = evaluate(model, test, bits)
            results[name] = {"bits": bits, "accuracy_pct": {str(k): v for k, v in acc.items()},
                             "epochs": obj["config"]["epochs"], "lr": obj["config"]["lr"]}
            print(name, acc, flush=True)
    except QNNError as e:
        print(f"qat_table: error: {e}", file=sys.stderr)
        return 2
    fl = results["float"]["accuracy_pct"]["32"]
    rows = []
    for b in ("32", "8", "4", "2"):
        sw = results["switchable"]["accuracy_pct"][b]
        fixed = fl if b == "32" else results[f"fixed{b}"]["accuracy_pct"][b]
        rows.append([b, sw, fixed, sw - fl, fixed - fl])
    eps = {k: v["epochs"] for k, v in results.items()}
    md = (f"Pretrained ResNet-20 fine-tuned on the shared (JPEG-decoded) CIFAR-10 (epochs per run: {eps}), "
          f"test set n={len(test)}. Command: `python bench/qat_table.py --epochs {a.epochs} --float-epochs {a.float_epochs} --fixed-epochs {a.fixed_epochs} --lr {a.lr}`\n\n"
          + markdown_table(["bits", "switchable {2,4,8,32} %", "separate model %", "switchable - float", "separate - float"], rows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out + ".json", {"results": results, "n_test": len(test), "epochs": a.epochs, "lr": a.lr,
                                        "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

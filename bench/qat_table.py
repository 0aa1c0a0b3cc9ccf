"""Real QAT result: pretrained ResNet-20 fine-tuned on the shared CIFAR-10 as float, as ONE switchable model over
{2,4,8,32}, and as separately trained fixed-precision models (8, 4, 2 bits); clean test accuracy at 32/8/4/2.

    python bench/qat_table.py --data-dir ../shared/data/cifar10 --weights ../shared/data/weights/resnet20-12fca82f.th

Resumable: finished runs are reused, an interrupted run continues from its last epoch.
Writes results/qat_resnet20.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import environment, markdown_table  # noqa: E402


def earlier_sha(path: str) -> str:
    return json.loads(Path(path).read_text()).get("environment", {}).get("git_sha", "unknown")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10", help="CIFAR-10 folder (default ../shared/data/cifar10)")
    ap.add_argument("--weights", default="../shared/data/weights/resnet20-12fca82f.th", help="pretrained float ResNet-20 weights")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the switchable run")
    ap.add_argument("--float-epochs", type=int, default=2, help="epochs of the float fine-tune")
    ap.add_argument("--fixed-epochs", type=int, default=2, help="epochs of each fixed-precision run (more steps per bit-width than the switchable run gets)")
    ap.add_argument("--lr", type=float, default=0.02, help="learning rate of every run (default 0.02)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each run's training forward (qnn train "
                    "--compile: faster steps on CPU, a few minutes of compilation per run)")
    ap.add_argument("--seed", type=int, default=0, help="training seed of every run (default 0); give each seed its own --runs-dir")
    ap.add_argument("--train-subset", type=int, help="train on the first N training images (default all)")
    ap.add_argument("--test-subset", type=int, help="score on the first N test images (default all 10,000)")
    ap.add_argument("--residual-bits", type=int, default=8,
                    help="also train the switchable model and the 2-bit model with the residual stream at >= this many "
                         "bits (conv inputs stay at the bit-width); 0 = skip those rows")
    ap.add_argument("--residual-epochs", type=int, default=None, help="epochs of the wide-residual runs (default: --epochs / --fixed-epochs)")
    ap.add_argument("--distill", action="store_true",
                    help="wide-residual runs: distil at quantized steps from the float fine-tune of this table (qnn train --distill "
                         "RUNS/float/model.pt); the pretrained weights score only ~81%% on this JPEG-decoded data")
    ap.add_argument("--runs-dir", default="runs/qat_resnet20", help="where the runs' checkpoints go (a finished run is reused)")
    ap.add_argument("--runs", help="train and score only these runs (comma-separated names, e.g. "
                    "float,switchable_r8_kd_e5); tables whose runs are missing are left out")
    ap.add_argument("--compare", help="an earlier results JSON of this program: adds a table of each run's accuracy "
                    "against it (a reproduction check)")
    ap.add_argument("--out", default="results/qat_resnet20", help="results path without extension (.json and .md)")
    a = ap.parse_args(argv)

    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
    from qnn.config import TrainConfig
    from qnn.data import load_dataset
    from qnn.errors import QNNError
    from qnn.train import evaluate, train

    runs = {"float": [32], "switchable": [2, 4, 8, 32], "fixed8": [8], "fixed4": [4], "fixed2": [2]}
    R = a.residual_bits
    tag = (f"r{R}" + ("_kd" if a.distill else "") + (f"_e{a.residual_epochs}" if a.residual_epochs else "")) if R else ""
    if R:
        runs.update({f"switchable_{tag}": [2, 4, 8, 32], f"fixed2_{tag}": [2]})
    if a.runs:
        wanted = a.runs.split(",")
        unknown = [n for n in wanted if n not in runs]
        if unknown:
            print(f"qat_table: error: unknown run(s) {unknown}; choose from {', '.join(runs)}", file=sys.stderr)
            return 2
        runs = {n: runs[n] for n in wanted}
    try:
        earlier = json.loads(Path(a.compare).read_text())["results"] if a.compare else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"qat_table: error: --compare {a.compare}: not a results file of this program ({e})", file=sys.stderr)
        return 2
    try:
        test = load_dataset("cifar10", "test", a.data_dir).subset(a.test_subset)
        results = {}
        for name, bits in runs.items():
            out = Path(a.runs_dir) / name
            if not (out / "model.pt").is_file():
                epochs = a.fixed_epochs if name.startswith("fixed") else a.float_epochs if name == "float" else a.epochs
                wide = bool(R) and name.endswith(tag)
                if wide and a.residual_epochs:
                    epochs = a.residual_epochs
                cfg = TrainConfig(model="resnet20", dataset="cifar10", data_dir=a.data_dir, init=a.weights, bits=bits,
                                  epochs=epochs, lr=a.lr, threads=a.threads, seed=a.seed, train_subset=a.train_subset,
                                  test_subset=a.test_subset, out_dir=str(out), resume=True, eval_bits=bits,
                                  compile=a.compile, residual_bits=(R if wide else None), distill=(str(Path(a.runs_dir) / "float" / "model.pt") if wide and a.distill else None))
                print(f"== training {name} (bits {bits})", flush=True)
                train(cfg)
            model, obj = load_checkpoint(out / "model.pt")
            acc = evaluate(model, test, bits)
            results[name] = {"bits": bits, "accuracy_pct": {str(k): v for k, v in acc.items()},
                             "epochs": obj["config"]["epochs"], "lr": obj["config"]["lr"],
                             "seed": obj["config"].get("seed", 0)}
            print(name, acc, flush=True)
    except QNNError as e:
        print(f"qat_table: error: {e}", file=sys.stderr)
        return 2
    eps = {k: v["epochs"] for k, v in results.items()}
    cmd = (f"python bench/qat_table.py --epochs {a.epochs} --float-epochs {a.float_epochs} --fixed-epochs {a.fixed_epochs} "
           f"--lr {a.lr} --residual-bits {R}" + (f" --residual-epochs {a.residual_epochs}" if a.residual_epochs else "")
           + (" --distill" if a.distill else "") + (f" --seed {a.seed}" if a.seed else "")
           + (" --compile" if a.compile else "") + f" --runs-dir {a.runs_dir}" + (f" --runs {a.runs}" if a.runs else "")
           + (f" --compare {a.compare}" if a.compare else "")
           + (f" --out {a.out}" if a.out != "results/qat_resnet20" else ""))
    md = (f"Pretrained ResNet-20 fine-tuned on the shared (JPEG-decoded) CIFAR-10 (epochs per run: {eps}), "
          f"test set n={len(test)}. Command: `{cmd}`\n\n")
    fl = results["float"]["accuracy_pct"]["32"] if "float" in results else None
    if fl is not None and {"switchable", "fixed8", "fixed4", "fixed2"} <= set(results):
        rows = []
        for b in ("32", "8", "4", "2"):
            sw = results["switchable"]["accuracy_pct"][b]
            fixed = fl if b == "32" else results[f"fixed{b}"]["accuracy_pct"][b]
            rows.append([b, sw, fixed, sw - fl, fixed - fl])
        md += ("Every tensor at the bit-width (first conv and classifier weights at 8 bits), residual stream included:\n\n"
               + markdown_table(["bits", "switchable {2,4,8,32} %", "separate model %", "switchable - float",
                                 "separate - float"], rows))
    if R and fl is not None and {f"switchable_{tag}", f"fixed2_{tag}"} <= set(results):
        rrows = []
        for b in ("32", "8", "4", "2"):
            sw = results[f"switchable_{tag}"]["accuracy_pct"][b]
            fixed = results[f"fixed2_{tag}"]["accuracy_pct"][b] if b == "2" else None
            rrows.append([b, sw, "" if fixed is None else fixed, sw - fl, "" if fixed is None else fixed - fl])
        md += (f"\n\nWide residual stream (`--residual-bits {R}`" + (", distilled from the float fine-tune" if a.distill else "")
               + f", epochs {eps[f'switchable_{tag}']} / {eps[f'fixed2_{tag}']}): every conv input and weight at the bit-width, the residual "
               f"adds, block outputs and pooled features at max(bits, {R}); fully integer in ONNX Runtime (the add runs "
               "twice, once per output grid):\n\n"
               + markdown_table(["bits", f"switchable r{R} %", f"separate 2-bit r{R} %", "switchable - float", "separate - float"], rrows))
    if earlier is not None:
        crows = [[name, b, acc, earlier[name]["accuracy_pct"][b], acc - earlier[name]["accuracy_pct"][b]]
                 for name, r in results.items() if name in earlier
                 for b, acc in r["accuracy_pct"].items() if b in earlier[name]["accuracy_pct"]]
        md += (f"\n\nAgainst `{a.compare}` (git {earlier_sha(a.compare)}), run by run:\n\n"
               + markdown_table(["run", "bits", "this run %", "earlier %", "difference"], crows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out + ".json", {"results": results, "n_test": len(test), "epochs": a.epochs, "lr": a.lr,
                                        "command": cmd, "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

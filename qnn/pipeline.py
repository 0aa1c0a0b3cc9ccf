"""`qnn pipeline`: the whole story in one command.

Trains a small switchable model with plain QAT and with QADT-R, attacks both with a universal patch at every
bit-width, exports integer ONNX, verifies that ONNX Runtime runs it with integer kernels only, checks fake-quant vs
integer parity (predictions and ASR), builds an edge bundle, runs the bundle's run_edge.py on it, and writes a report
(markdown + PNG + JSON) ending in a table: clean accuracy, ASR fake-quant vs integer, latency.
Defaults: embedded synthetic dataset, minutes on 2 CPU cores. `--dataset cifar10 --data-dir ...` for real data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from qnn.errors import QNNError
from qnn.validate import arg_int, arg_seed

CONFIG = "pipeline_config.json"
RESUME_IGNORED = ("out", "overwrite", "resume", "threads")
STAGES = (("qat", "none"), ("qadtr", "qadtr"))  # (stage folder, defense)


def add_parser(sub) -> None:
    from qnn.attacks.patch import default_patch_side

    p = sub.add_parser("pipeline", help="train (QAT, QADT-R) -> attack -> integer export -> verify -> parity -> edge run -> report")
    p.add_argument("--dataset", default="synthetic", help="synthetic (embedded, no download) | cifar10 | imagefolder (default synthetic)")
    p.add_argument("--data-dir", help="dataset folder (CIFAR-10 npz or cifar-10-batches-py; ImageFolder root)")
    p.add_argument("--model", default="small_cnn", help="a zoo model (qnn list models) or path/to/file.py:factory (default small_cnn)")
    p.add_argument("--init", help="float checkpoint to start from (e.g. the shared ResNet-20 weights)")
    p.add_argument("--bits", default="2,4,8,32", help="training bit-width set")
    p.add_argument("--export-bits", default="4,8", help="bit-widths exported and deployed")
    p.add_argument("--epochs", type=arg_int(1), default=4, help="training epochs of each model (default 4)")
    p.add_argument("--n-synthetic", type=arg_int(1), default=4000, help="synthetic training images (default 4000)")
    p.add_argument("--train-subset", type=arg_int(1), help="train on the first N images only")
    p.add_argument("--patch-size", type=arg_int(1), default=default_patch_side(),
                   help=f"side of the square patch in pixels (default {default_patch_side()})")
    p.add_argument("--patch-iters", type=arg_int(1), default=100, help="patch optimisation steps (default 100)")
    p.add_argument("--patch-batch", type=arg_int(1), default=64, help="images per patch optimisation step (default 64)")
    p.add_argument("--n-attack", type=arg_int(1), default=500, help="training images the patch is crafted on (default 500)")
    p.add_argument("--n-eval", type=arg_int(1), default=500, help="test images scored (default 500)")
    p.add_argument("--threads", type=arg_int(1, 1024), default=2, help="CPU threads (default 2)")
    p.add_argument("--seed", type=arg_seed(), default=0, help="seed of training and attacks (default 0)")
    p.add_argument("--out", default="runs/pipeline", help="run directory (default runs/pipeline)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="reuse finished stages of an interrupted run")


class _Stages:
    """Announces each stage and records its wall time (report['stage_seconds'])."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._open: tuple[str, float] | None = None

    def __call__(self, key: str, msg: str) -> None:
        self.close()
        print(f"\n=== {msg}", flush=True)
        self._open = (key, time.perf_counter())

    def close(self) -> None:
        if self._open:
            key, t0 = self._open
            self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - t0, 2)
            self._open = None


def cmd_pipeline(a) -> int:
    import torch

    from qnn.attacks.patch import PatchConfig
    from qnn.checkpoint import atomic_write_json
    from qnn.data import check_data_fits, load_dataset, model_fit_kwargs
    from qnn.layers import parse_bits
    from qnn.outputs import StagedDir
    from qnn.train import check_resume_config, versions

    torch.set_num_threads(a.threads)
    config = {k: v for k, v in vars(a).items() if k not in ("func", "cmd")}
    with StagedDir(a.out, a.overwrite, a.resume, "pipeline run", marker=CONFIG, inputs=(a.init, a.data_dir)) as stage:
        # everything is validated before any output is touched
        bits = parse_bits(a.bits)
        ebits = parse_bits(a.export_bits)
        for b in ebits:
            if b not in bits or b > 8:
                raise QNNError(f"export bit-width {b} must be in the training set {bits} and <= 8")
        from qnn.defenses import make_defense
        from qnn.models import create_model

        from qnn.export.onnx_export import check_exportable

        for name, _ in STAGES:  # the exact configs the stages will train with, and their defenses
            cfg = _train_config(a, name, bits, stage.out / name)
            make_defense(cfg.defense, cfg.defense_args, cfg, create_model(cfg.model))
        # the model as the stages build it: the data is made (synthetic) or read to fit it, and checked before training
        probe = create_model(a.model, **{k: v for k, v in model_fit_kwargs(cfg).items() if v is not None})
        check_exportable(probe)
        if stage.resuming and (stage.work / CONFIG).is_file():
            check_resume_config(json.loads((stage.work / CONFIG).read_text()), config, stage.work, RESUME_IGNORED)
        t_start = time.perf_counter()
        test = load_dataset(a.dataset, "test", a.data_dir, seed=a.seed, n_synthetic=a.n_synthetic, like=probe)
        train_ds = load_dataset(a.dataset, "train", a.data_dir, seed=a.seed, n_synthetic=a.n_synthetic, like=probe)
        check_data_fits(probe, test, "test set")
        if a.n_attack >= len(train_ds):
            raise QNNError(f"--n-attack {a.n_attack} must be smaller than the {len(train_ds)} training images")
        xe, ye = test.subset(a.n_eval).tensors()
        xa, ya = train_ds.subset(a.n_attack, start=len(train_ds) - a.n_attack).tensors()
        PatchConfig(patch_shape=(a.patch_size, a.patch_size), iterations=a.patch_iters, batch_size=a.patch_batch, seed=a.seed,
                    image_size=tuple(xe.shape[-2:]))
        report = {"config": config, "versions": versions(), "models": {}}
        out = stage.prepare()
        atomic_write_json(out / CONFIG, config)
        ok = _run_stages(a, out, bits, ebits, test, xe, ye, xa, ya, report, t_start)
        final = stage.publish()
    print(f"report: {final / 'report.md'} ({'all deployment checks passed' if ok else 'SOME DEPLOYMENT CHECKS FAILED'})")
    return 0 if ok else 1


def _train_config(a, name: str, bits, rdir: Path):
    """The training config of stage `name` (qat: plain QAT; qadtr: QADT-R), resumed stage by stage."""
    from qnn.config import TrainConfig

    return TrainConfig(model=a.model, dataset=a.dataset, data_dir=a.data_dir, init=a.init, bits=bits,
                       epochs=a.epochs, n_synthetic=a.n_synthetic, train_subset=a.train_subset,
                       test_subset=a.n_eval, eval_every=a.epochs, seed=a.seed, out_dir=str(rdir), resume=True,
                       defense=dict(STAGES)[name], threads=a.threads, progress=sys.stderr.isatty())


def _run_stages(a, out: Path, bits, ebits, test, xe, ye, xa, ya, report: dict, t_start: float) -> bool:
    """Train (each model skipped when its model.pt exists: resume is stage by stage), attack, export, bundle,
    run_edge, report; everything into `out`. Returns whether every deployment check passed."""
    from qnn.attacks.patch import PatchConfig, evaluate_patch, optimize_universal_patch, save_patch
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, sha256_file
    from qnn.data import check_data_fits
    from qnn.export.bundle import RUNNER, build_bundle
    from qnn.export.onnx_export import export_model
    from qnn.export.verify import verify
    from qnn.layers import precision
    from qnn.train import train

    _stage = _Stages()
    for name, defense in STAGES:
        _stage(f"train {name}", f"train {name} ({a.model}, bits {bits}, {a.epochs} epochs, defense {defense})")
        rdir = out / name
        if not (rdir / "model.pt").is_file():
            train(_train_config(a, name, bits, rdir))
        model, obj = load_checkpoint(rdir / "model.pt", user_model=a.model)
        check_data_fits(model, test, "test set")
        hist = json.loads((rdir / "metrics.json").read_text())["history"]
        acc = {int(k): v for k, v in hist[-1]["test_acc"].items()}  # the last epoch's, on the same --n-eval images
        m = {"clean_acc_pct": {str(k): v for k, v in acc.items()},
             "epoch_seconds": sum(h["epoch_seconds"] for h in hist) / len(hist), "deploy": {}}
        _stage(f"attack {name}", f"attack {name}: {a.patch_size}x{a.patch_size} universal patch crafted at each bit-width")
        m["asr_pct"] = {}
        patches = {}
        for b in bits:
            cfg = PatchConfig(patch_shape=(a.patch_size, a.patch_size), iterations=a.patch_iters, batch_size=a.patch_batch, seed=a.seed,
                              image_size=tuple(xe.shape[-2:]), num_classes=model.num_classes)
            with precision(model, b):
                patch, _ = optimize_universal_patch(model, xa, ya, cfg, progress=sys.stderr.isatty())
                m["asr_pct"][str(b)] = evaluate_patch(model, xe, ye, patch, cfg)["asr_pct"]
            save_patch(rdir / f"patch_{b}b", patch, cfg)
            patches[b] = (patch, cfg)
            print(f"  {b} bits: clean {acc[b]:.1f}%  ASR {m['asr_pct'][str(b)]:.1f}%", flush=True)
        for b in ebits:
            _stage(f"deploy {name} w{b}", f"{name}: export W{b}A{b} integer ONNX, verify, bundle, run_edge")
            onnx_path = export_model(model, b, "int", rdir / f"{name}_w{b}a{b}.onnx",
                                     {"source_checkpoint_sha256": sha256_file(rdir / "model.pt")})
            census = verify(onnx_path)
            print(f"  integer graph: {'yes' if census['fully_integer'] else 'NO ' + str(census['float_compute_ops'])}"
                  f" ({', '.join(f'{k} x{v}' for k, v in census['ops'].items())})", flush=True)
            bdir = rdir / f"bundle_w{b}"
            ds = test.subset(a.n_eval)
            build_bundle(model, b, bdir, ds.x, ds.y, [(f"own{b}b", *patches[b]), ("from_float", *patches[32])]
                         if 32 in patches else [(f"own{b}b", *patches[b])], sha256_file(rdir / "model.pt"), overwrite=True)
            edge_json = rdir / f"edge_w{b}.json"
            r = subprocess.run([sys.executable, str(bdir / RUNNER),  # as on a device: the bundle's own runner
                                "--bundle", str(bdir), "--threads", str(a.threads), "--json", str(edge_json),
                                "--iters", "30"], capture_output=True, text=True)
            print("  " + "\n  ".join(r.stdout.strip().splitlines()[-12:]), flush=True)
            if r.returncode == 2 or not edge_json.is_file():
                raise QNNError(f"run_edge failed on {bdir}: {r.stderr.strip()[-300:]}")
            edge = json.loads(edge_json.read_text())
            m["deploy"][str(b)] = {"fully_integer": census["fully_integer"], "ops": census["ops"], "edge": edge,
                                   "edge_pass": edge["pass"]}
        report["models"][name] = m

    _stage.close()
    print("\n=== report", flush=True)
    report["seconds"] = time.perf_counter() - t_start
    report["stage_seconds"] = _stage.seconds
    md = _report_md(report, bits, ebits)
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", md.encode())
    _report_png(report, bits, out / "report.png")
    print(md)
    return all(d["edge_pass"] and d["fully_integer"] for m in report["models"].values() for d in m["deploy"].values())


def _report_md(rep: dict, bits, ebits) -> str:
    c = rep["config"]
    lines = ["# qnn pipeline report\n", f"{c['model']} on {c['dataset']}, training bit-widths {bits}, {c['epochs']} epochs, "
             f"{c['patch_size']}x{c['patch_size']} universal patch ({c['patch_iters']} iterations of {c.get('patch_batch', 128)} images), eval on {c['n_eval']} "
             f"images; total {rep['seconds'] / 60:.1f} min. Versions: torch {rep['versions']['torch']}, onnxruntime "
             f"{rep['versions']['onnxruntime']}, git {rep['versions']['git_sha']}"
             f"{' with local changes' if rep['versions'].get('git_dirty') else ''}, code hash "
             f"{rep['versions'].get('code_hash')}.\n",
             "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in rep.get("stage_seconds", {}).items()) + ".\n",
             "## Fake-quant (PyTorch), per bit-width\n", "| model | bits | clean % | patch ASR % |", "|---|---|---|---|"]
    for n, m in rep["models"].items():
        for b in bits:
            lines.append(f"| {n} | {b} | {m['clean_acc_pct'][str(b)]:.1f} | {m['asr_pct'][str(b)]:.1f} |")
    lines += ["", f"QADT-R training time per epoch: {rep['models']['qadtr']['epoch_seconds'] / rep['models']['qat']['epoch_seconds']:.2f}x plain QAT.", "",
              "## Deployed integer model (ONNX Runtime) vs fake-quant", "",
              "| model | bits | integer graph | clean % fake-quant | clean % integer | ASR % fake-quant | ASR % integer | p50 ms batch 1 | images/s batch 32 | edge check |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n, m in rep["models"].items():
        for b in ebits:
            d = m["deploy"][str(b)]
            e = d["edge"]
            comp = e["comparison"]
            asr_row = next(r for r in comp if r["metric"].startswith(f"ASR % [own{b}b"))
            lat = e.get("latency", [{}, {}])
            lines.append(f"| {n} | {b} | {'yes' if d['fully_integer'] else 'NO'} | {comp[0]['fake_quant']:.1f} | {comp[0]['integer']:.1f} | "
                         f"{asr_row['fake_quant']:.1f} | {asr_row['integer']:.1f} | {lat[0].get('p50_ms', float('nan')):.3f} | "
                         f"{lat[1].get('throughput_img_s', float('nan')):.0f} | {'PASS' if d['edge_pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def _report_png(rep: dict, bits, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for n, m in rep["models"].items():
        axes[0].plot([str(b) for b in bits], [m["clean_acc_pct"][str(b)] for b in bits], "o-", label=n)
        axes[1].plot([str(b) for b in bits], [m["asr_pct"][str(b)] for b in bits], "o-", label=n)
    axes[0].set_title("clean accuracy %")
    axes[1].set_title("patch ASR %")
    for ax in axes:
        ax.set_xlabel("bits")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMMANDS = {"pipeline": (add_parser, cmd_pipeline)}

"""Our integer export against what a user would pick instead: ONNX Runtime's own static quantization of the same
float network (`onnxruntime.quantization.quantize_static`: QDQ, per-channel int8 weights, uint8 activations,
calibrated on real images where the dataset is there), and ONNX Runtime float. Batch 1 and 32, 1 and 2 threads,
medians of runs interleaved in one process (each round runs every model once, in turn).

    python bench/peer_latency.py [--models resnet20,resnet18,mobilenetv2_cifar] [--weight-type auto] \
        [--accuracy-qat runs/qat/model.pt --accuracy-float runs/float/model.pt]

All graphs take the same normalised NCHW input. Weights are random (calibrated on the calibration images): latency
does not depend on their values, except through the weight container `--weight-type auto` picks (uint8 for layers
with |w| > 64). Ours is timed twice: as a default model (reduce_range: 8-bit weights on [-63, 63], every layer int8)
and with full-range 8-bit weights (--no-reduce-range; 'auto' then stores the 8-bit layers as uint8, exact on x86
without VNNI but on slower kernels). With --accuracy-qat / --accuracy-float (ResNet-20 on CIFAR-10): top-1 of our
QAT model's integer ONNX against ORT's quantize_static of the float fine-tune (calibrated on real training images)
and the float model, on the same test images. Writes {--out}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, interleaved_ms, markdown_table, pyplot, save_figure, write_results  # noqa: E402
from qnn.bench.latency import export_float_onnx  # noqa: E402


def ort_static_quant(float_path: Path, out: Path, calib, per_channel: bool = True) -> Path:
    """ONNX Runtime's static quantization (QDQ, int8 weights, uint8 activations) of a float ONNX model."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def calibration_pixels(model, n: int, data_dir: str | None):
    """n images (pixels in [0, 1]): real CIFAR-10 training images for a 32x32 model when the dataset is there, else
    uniform-random pixels (they only set activation ranges)."""
    import numpy as np

    x = None
    if model.in_size == 32 and data_dir and Path(data_dir).is_dir():
        from qnn.data import load_dataset

        x = load_dataset("cifar10", "train", data_dir).subset(n).tensors()[0].numpy()
    if x is None:
        x = np.random.default_rng(0).random((n, model.in_channels, model.in_size, model.in_size), dtype=np.float32)
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet18,mobilenetv2_cifar", help="zoo models, comma-separated")
    ap.add_argument("--bits", type=int, default=8, help="bit-width of our export (default 8: ORT's is 8-bit)")
    ap.add_argument("--weight-type", default="auto", choices=["auto", "int8", "uint8"],
                    help="our integer weight container (default auto, the export's default)")
    ap.add_argument("--batches", default="1,32", help="batch sizes (default 1,32)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30; a fifth for 224x224 at batch > 1)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    ap.add_argument("--n-calib", type=int, default=256, help="calibration images (default 256)")
    ap.add_argument("--data-dir", default="../shared/data/cifar10", help="CIFAR-10 for calibration of 32x32 models")
    ap.add_argument("--accuracy-qat", dest="accuracy_qat", metavar="CKPT",
                    help="our QAT checkpoint whose integer ONNX accuracy is measured (with --accuracy-float)")
    ap.add_argument("--accuracy-float", dest="accuracy_float", metavar="CKPT",
                    help="the float fine-tune ORT's quantize_static quantizes for the accuracy comparison")
    ap.add_argument("--n-test", type=int, default=10000, help="test images of the accuracy comparison (default 10000)")
    ap.add_argument("--out", default="results/peer_latency", help="output path without extension")
    a = ap.parse_args(argv)
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    from qnn.export.onnx_export import export_model, normalise
    from qnn.layers import ensure_calibrated_, precision
    from qnn.models import create_model

    if bool(a.accuracy_qat) != bool(a.accuracy_float):
        print("peer_latency: error: --accuracy-qat and --accuracy-float go together", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    results, rows = [], []
    with tempfile.TemporaryDirectory() as td:
        accuracy = _accuracy(a, Path(td)) if a.accuracy_qat else None
        for name in a.models.split(","):
            models = {}
            for label, reduce_range in (("ours int", True), (FULL_RANGE, False)):
                torch.manual_seed(0)
                models[label] = model = create_model(name, reduce_range=reduce_range)
            pixels = calibration_pixels(model, a.n_calib, a.data_dir)
            calib = normalise(pixels, model.mean, model.std)  # what every graph takes
            for m in models.values():
                with precision(m, a.bits):
                    ensure_calibrated_(m, torch.from_numpy(pixels[:64]))
            paths = {k: export_model(m, a.bits, "int", Path(td) / f"{name}_{i}.onnx", weight_type=a.weight_type)
                     for i, (k, m) in enumerate(models.items())}
            paths["ORT float"] = export_float_onnx(model, Path(td) / f"{name}_float.onnx")
            paths["ORT quantize_static"] = ort_static_quant(paths["ORT float"], Path(td) / f"{name}_ortq.onnx", calib)
            for threads in [int(t) for t in a.threads.split(",")]:
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
                for batch in [int(v) for v in a.batches.split(",")]:
                    x = calib[np.arange(batch) % len(calib)]
                    rounds = a.rounds if (model.in_size <= 64 or batch == 1) else max(5, a.rounds // 5)
                    ms = interleaved_ms({k: (lambda s=s: s.run(None, {"input": x})) for k, s in sess.items()},
                                        a.warmup, rounds)
                    r = {"model": name, "batch": batch, "threads": threads, "ms": ms,
                         "ours_vs_ort_quant": ms["ORT quantize_static"] / ms["ours int"],
                         "ours_vs_ort_float": ms["ORT float"] / ms["ours int"],
                         "full_range_vs_ort_quant": ms["ORT quantize_static"] / ms[FULL_RANGE]}
                    results.append(r)
                    rows.append([name, batch, threads, ms["ours int"], ms[FULL_RANGE], ms["ORT quantize_static"],
                                 ms["ORT float"], f"{r['ours_vs_ort_quant']:.2f}x", f"{r['full_range_vs_ort_quant']:.2f}x",
                                 f"{r['ours_vs_ort_float']:.2f}x"])
                    print(f"{name} batch {batch} threads {threads}: ours {ms['ours int']:.2f} ms, ORT quant "
                          f"{ms['ORT quantize_static']:.2f} ms ({r['ours_vs_ort_quant']:.2f}x), ORT float "
                          f"{ms['ORT float']:.2f} ms", flush=True)
    command = command_line("bench/peer_latency.py", argv)
    from qnn.bench.common import cpu_info

    flags = cpu_info()["isa_flags"]
    md = (f"Latency (ms, median of interleaved rounds): our `qnn export --format int --weight-type {a.weight_type}` at "
          f"{a.bits} bits of a default model (reduce_range: every weight int8) and of one with full-range 8-bit weights "
          f"(--no-reduce-range: uint8 8-bit layers), against ONNX Runtime's quantize_static (QDQ, per-channel) and ORT "
          f"float, all at ORT_ENABLE_ALL, on a CPU with {', '.join(flags) or 'no listed ISA extensions'}. Speed-up > 1: "
          f"ours is faster. Command: `{command}`\n\n"
          + markdown_table(["model", "batch", "threads", "ours int", "ours full-range", "ORT quantize_static",
                            "ORT float", "ours vs ORT quant", "full-range vs ORT quant", "ours vs ORT float"], rows))
    if accuracy:
        md += ("\n\nTop-1 % on CIFAR-10 test images " + f"({accuracy['n_test']}): "
               + ", ".join(f"{k} {v:.2f}" for k, v in accuracy["top1"].items()) + ".\n")
    write_results(a.out, {"command": command, "results": results, "accuracy": accuracy, "config": vars(a)}, md)
    _plot(results, a.out + ".png")
    return 0


FULL_RANGE = "ours full-range"


def _accuracy(a, td: Path) -> dict:
    """Top-1 on the first --n-test CIFAR-10 test images: our QAT checkpoint's integer ONNX at --bits, ORT's
    quantize_static of the float checkpoint (calibrated on --n-calib real training images) and that float model."""
    import numpy as np
    import onnxruntime as ort

    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset
    from qnn.export.onnx_export import export_model, normalise
    qat, _ = load_checkpoint(a.accuracy_qat)
    flt, _ = load_checkpoint(a.accuracy_float, expect_arch=qat.arch)
    test = load_dataset("cifar10", "test", a.data_dir).subset(a.n_test).tensors()
    x, y = normalise(test[0].numpy(), qat.mean, qat.std), test[1].numpy()
    calib = normalise(calibration_pixels(flt, a.n_calib, a.data_dir), flt.mean, flt.std)
    qat.eval()
    paths = {f"ours int (QAT, {a.bits} bits)": export_model(qat, a.bits, "int", td / "acc_qat.onnx"),
             "ORT float": export_float_onnx(flt, td / "acc_float.onnx")}
    paths["ORT quantize_static (PTQ of the float model)"] = ort_static_quant(paths["ORT float"], td / "acc_ptq.onnx",
                                                                            calib)
    top1 = {}
    for k, p in paths.items():
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        pred = np.concatenate([s.run(None, {"input": x[i:i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
        top1[k] = float((pred == y).mean() * 100)
        print(f"accuracy: {k} {top1[k]:.2f}%", flush=True)
    return {"n_test": len(y), "top1": top1, "qat_checkpoint": a.accuracy_qat, "float_checkpoint": a.accuracy_float}


def _plot(results, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(results)), 3.5))
    import numpy as np

    i = np.arange(len(results))
    ax.bar(i - 0.2, [r["ours_vs_ort_quant"] for r in results], 0.4, label="ours (default, int8 weights)")
    ax.bar(i + 0.2, [r["full_range_vs_ort_quant"] for r in results], 0.4, label="ours, full-range 8-bit weights")
    ax.legend(fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(results)), [f"{r['model']}\nb{r['batch']} t{r['threads']}" for r in results], fontsize=6)
    ax.set_ylabel("ours int speed-up vs ORT quantize_static")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())

"""Our integer export against what a user would pick instead: ONNX Runtime's own static quantization of the same
float network (`onnxruntime.quantization.quantize_static`: QDQ, per-channel int8 weights, uint8 activations,
calibrated on real images where the dataset is there), and ONNX Runtime float. Batch 1 and 32, 1 and 2 threads,
medians of runs interleaved in one process (each round runs every model once, in turn).

    python bench/peer_latency.py [--models resnet20,resnet18,mobilenetv2_cifar] [--weight-type auto]

All three graphs take the same normalised NCHW input. Weights are random (calibrated on the calibration images):
latency does not depend on their values, except through the weight container `--weight-type auto` picks (uint8 for
layers with |w| > 64). Writes {--out}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, markdown_table, pyplot, save_figure, write_results  # noqa: E402
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


def interleaved_ms(fns: dict, warmup: int, rounds: int) -> dict[str, float]:
    """Median ms of each callable, timed in rounds that run every callable once, in rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def calibration_pixels(model, n: int, data_dir: str | None):
    """n images (pixels in [0, 1]): real CIFAR-10 training images for a 32x32 model when the dataset is there, else
    uniform-random pixels (they only set activation ranges)."""
    import numpy as np

    x = None
    if model.in_size == 32 and data_dir and Path(data_dir).is_dir():
        from qnn.data import load_dataset

        x = load_dataset("cifar10", "train", data_dir).subset(n).tensors()[0].numpy()
    if x is None:
        x = np.random.default_rng(0).random((n, 3, model.in_size, model.in_size), dtype=np.float32)
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
    ap.add_argument("--out", default="results/peer_latency", help="output path without extension")
    a = ap.parse_args(argv)
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    from qnn.export.onnx_export import export_model, normalise
    from qnn.layers import ensure_calibrated_, set_bit_width_
    from qnn.models import create_model

    warnings.filterwarnings("ignore")
    results, rows = [], []
    with tempfile.TemporaryDirectory() as td:
        for name in a.models.split(","):
            torch.manual_seed(0)
            model = create_model(name)
            pixels = calibration_pixels(model, a.n_calib, a.data_dir)
            calib = normalise(pixels, model.mean, model.std)  # what all three graphs take
            set_bit_width_(model, a.bits)
            ensure_calibrated_(model, torch.from_numpy(pixels[:64]))
            paths = {"ours int": export_model(model, a.bits, "int", Path(td) / f"{name}_int.onnx", weight_type=a.weight_type),
                     "ORT float": export_float_onnx(model, Path(td) / f"{name}_float.onnx")}
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
                         "ours_vs_ort_float": ms["ORT float"] / ms["ours int"]}
                    results.append(r)
                    rows.append([name, batch, threads, ms["ours int"], ms["ORT quantize_static"], ms["ORT float"],
                                 f"{r['ours_vs_ort_quant']:.2f}x", f"{r['ours_vs_ort_float']:.2f}x"])
                    print(f"{name} batch {batch} threads {threads}: ours {ms['ours int']:.2f} ms, ORT quant "
                          f"{ms['ORT quantize_static']:.2f} ms ({r['ours_vs_ort_quant']:.2f}x), ORT float "
                          f"{ms['ORT float']:.2f} ms", flush=True)
    command = command_line("bench/peer_latency.py", argv)
    md = (f"Latency (ms, median of interleaved rounds): our `qnn export --format int --weight-type {a.weight_type}` at "
          f"{a.bits} bits against ONNX Runtime's quantize_static (QDQ, per-channel) and ORT float, all at ORT_ENABLE_ALL. "
          f"Speed-up > 1: ours is faster. Command: `{command}`\n\n"
          + markdown_table(["model", "batch", "threads", "ours int", "ORT quantize_static", "ORT float",
                            "ours vs ORT quant", "ours vs ORT float"], rows))
    write_results(a.out, {"command": command, "results": results, "config": vars(a)}, md)
    _plot(results, a.out + ".png")
    return 0


def _plot(results, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(results)), 3.5))
    ax.bar(range(len(results)), [r["ours_vs_ort_quant"] for r in results])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(results)), [f"{r['model']}\nb{r['batch']} t{r['threads']}" for r in results], fontsize=6)
    ax.set_ylabel("ours int speed-up vs ORT quantize_static")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())

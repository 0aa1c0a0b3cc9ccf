"""Latency: ONNX Runtime integer vs ONNX Runtime float vs PyTorch float vs PyTorch fake-quant, for any zoo models
(default ResNet-20 at 32x32 and the ImageNet-style ResNet-18 at 224x224) at 8, 4 and 2 bits; batch 1 and 32; 1 and 2
threads.
Medians of many runs in one process, after warm-up; the ONNX Runtime models timed interleaved. Also the achieved
integer MAC/s as a share of this CPU's int8 peak (a large QLinearConv in ONNX Runtime, `int8_peak`, timed in the same
rounds).

    python bench/latency.py [--models resnet20,resnet18] [--iters 50] [--out results/latency]

2- and 4-bit models run on ONNX Runtime's int8 kernels (it has no 2/4-bit conv kernels): same speed as 8-bit.
Weights are random-initialised and calibrated on random inputs: latency does not depend on their values.
Writes {--out}.{json,md,png} (default results/latency).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, interleaved_ms, markdown_table, pyplot, save_figure, write_results  # noqa: E402


def _median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def count_macs(model, size: int) -> int:
    import brevitas.nn as bnn
    import torch

    convs, linears = bnn.QuantConv2d, bnn.QuantLinear
    macs = 0

    def hook(m, inp, out):  # weight[0]: one output channel's (in / groups) x k x k weights
        nonlocal macs
        if isinstance(m, convs):
            macs += out.numel() // out.shape[0] * m.weight[0].numel()
        elif isinstance(m, linears):
            macs += m.weight.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (convs, linears))]
    with torch.no_grad():
        model(torch.rand(1, model.in_channels, size, size))
    for h in hs:
        h.remove()
    return macs


def export_float_onnx(model, path: Path) -> Path:
    """The model at 32 bits (quantization off) as a float ONNX graph taking normalised NCHW input, like the integer
    export (the model's own normalisation is left out of both)."""
    import torch

    from qnn.layers import precision

    model.eval()
    size = model.in_size
    with precision(model, 32):
        torch.onnx.export(model.body, torch.rand(1, model.in_channels, size, size), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}},
                          opset_version=17)
    return path


#: what `int8_peak` times, for the results' text
PEAK_KERNEL = "a 3x3 256-channel QLinearConv, 14x14, batch 32"


def int8_peak(threads: int):
    """(run, MACs per run): a large 3x3 convolution (256 -> 256 channels, 14x14, batch 32) as ONNX Runtime's
    QLinearConv with int8 weights, whose MAC rate is the practical int8 peak of this CPU for the kernel the models
    use (measured here it beats a 1024^3 MatMulInteger by up to a fifth at one thread). Time it interleaved with the
    model it is compared to (`interleaved_ms`): on a shared machine the peak moves by a third between minutes."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    c, hw, n = 256, 14, 32
    rng = np.random.default_rng(0)
    const = lambda v, name: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [const(rng.integers(-63, 64, (c, c, 3, 3), dtype=np.int8), "w"), const(np.float32(0.02), "xs"),
             const(np.uint8(128), "xz"), const(np.full(c, 0.01, np.float32), "ws"), const(np.zeros(c, np.int8), "wz"),
             const(np.float32(0.5), "ys"), const(np.uint8(128), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf"], ["yf"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"])]
    g = helper.make_graph(nodes, "peak", [helper.make_tensor_value_info("x", TensorProto.UINT8, [n, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [n, c, hw, hw])], inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    x = rng.integers(0, 256, (n, c, hw, hw), dtype=np.uint8)
    return (lambda: s.run(None, {"x": x})), n * hw * hw * c * c * 9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet18", help="zoo models, comma-separated (default resnet20,resnet18)")
    ap.add_argument("--bits", default="8,4,2", help="bit-widths (default 8,4,2)")
    ap.add_argument("--batches", default="1,32", help="batch sizes (default 1,32)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--iters", type=int, default=30, help="timed runs per measurement (default 30; fewer for large inputs at batch > 1)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    ap.add_argument("--weight-type", default="auto", choices=["auto", "int8", "uint8"],
                    help="integer weight container of the exported models (see qnn export --weight-type)")
    ap.add_argument("--out", default="results/latency", help="output path without extension (default results/latency)")
    a = ap.parse_args(argv)
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    from qnn.export.onnx_export import export_model
    from qnn.layers import ensure_calibrated_, precision
    from qnn.models import create_model

    warnings.filterwarnings("ignore")
    results, rows = [], []
    peaks = {int(t): int8_peak(int(t)) for t in a.threads.split(",")}
    with tempfile.TemporaryDirectory() as td:
        for name in a.models.split(","):
            torch.manual_seed(0)
            model = create_model(name)
            size = model.in_size
            macs = count_macs(model, size)
            model.eval()
            fpath = export_float_onnx(model, Path(td) / f"{name}_float.onnx")
            ipaths = {}
            for b in [int(v) for v in a.bits.split(",")]:
                with precision(model, b):
                    ensure_calibrated_(model, torch.rand(8, model.in_channels, size, size))
                ipaths[b] = export_model(model, b, "int", Path(td) / f"{name}_int{b}.onnx", weight_type=a.weight_type)
            for threads in [int(t) for t in a.threads.split(",")]:
                torch.set_num_threads(threads)
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sess = {"float": ort.InferenceSession(str(fpath), so, providers=["CPUExecutionProvider"])}
                sess |= {b: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                         for b, p in ipaths.items()}
                peak_run, peak_macs = peaks[threads]
                for batch in [int(v) for v in a.batches.split(",")]:
                    x = np.random.default_rng(0).random((batch, model.in_channels, size, size), dtype=np.float32)
                    xt = torch.from_numpy(x)
                    iters = a.iters if (size <= 64 or batch == 1) else max(5, a.iters // 5)
                    # the ORT models and the int8 peak in the same rounds; PyTorch (a reference, far slower) after
                    ms = interleaved_ms({"peak": peak_run, **{k: (lambda s=s: s.run(None, {"input": x}))
                                                               for k, s in sess.items()}}, a.warmup, iters)
                    peak = peak_macs / (ms["peak"] / 1e3)
                    t_ort_f = ms["float"]
                    with torch.no_grad(), precision(model, 32):
                        t_pt_f = _median_ms(lambda: model(xt), a.warmup, iters)
                    for b in ipaths:
                        t_int = ms[b]
                        with torch.no_grad(), precision(model, b):
                            t_fq = _median_ms(lambda: model(xt), a.warmup, max(3, iters // 2))
                        mac_s = macs * batch / (t_int / 1e3)
                        r = {"model": name, "bits": b, "batch": batch, "threads": threads, "ort_int_ms": t_int,
                             "ort_float_ms": t_ort_f, "torch_float_ms": t_pt_f, "torch_fakequant_ms": t_fq,
                             "speedup_int_vs_ort_float": t_ort_f / t_int, "int_mac_per_s": mac_s,
                             "int8_peak_mac_per_s": peak, "share_of_int8_peak": mac_s / peak, "macs_per_image": macs}
                        results.append(r)
                        rows.append([name, b, batch, threads, t_int, t_ort_f, r["speedup_int_vs_ort_float"], t_pt_f, t_fq,
                                     f"{peak / 1e9:.1f}", f"{100 * r['share_of_int8_peak']:.1f}%"])
                        print(f"{name} W{b}A{b} batch {batch} threads {threads}: int {t_int:.2f} ms, ORT float {t_ort_f:.2f} ms "
                              f"({t_ort_f / t_int:.2f}x)", flush=True)
    command = command_line("bench/latency.py", argv)
    md = (f"Latency (ms, median), random-initialised weights. Command: `{command}`. ONNX Runtime "
          "ENABLE_ALL; 2/4-bit models run on int8 kernels (ORT has no 2/4-bit kernels). The ORT models and the int8 "
          f"peak ({PEAK_KERNEL}) are timed interleaved, in the same rounds; PyTorch after.\n\n"
          + markdown_table(["model", "bits", "batch", "threads", "ORT int", "ORT float", "int speed-up", "PyTorch float",
                            "PyTorch fake-quant", "int8 peak GMAC/s", "int MAC/s of peak"], rows))
    write_results(a.out, {"command": command, "results": results, "weight_type": a.weight_type}, md)
    _plot(results, a.out + ".png")
    return 0


def _plot(results, path):
    plt = pyplot()
    sel = [r for r in results if r["threads"] == max(x["threads"] for x in results)]
    labels = [f"{r['model']}\nW{r['bits']} b{r['batch']}" for r in sel]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(sel)), 3.5))
    ax.bar(range(len(sel)), [r["speedup_int_vs_ort_float"] for r in sel])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(sel)), labels, fontsize=6)
    ax.set_ylabel("ORT int speed-up vs ORT float")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())

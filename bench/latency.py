"""Latency: ONNX Runtime integer vs ONNX Runtime float vs PyTorch float vs PyTorch fake-quant, for any zoo models
(default ResNet-20 at 32x32 and the ImageNet-style ResNet-18 at 224x224) at 8, 4 and 2 bits; batch 1 and 32; 1 and 2
threads.
Medians of many runs in one process, after warm-up. Also the achieved integer MAC/s as a share of this CPU's
measured int8 GEMM peak (a large MatMulInteger in ONNX Runtime).

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

from qnn.bench.common import command_line, markdown_table, pyplot, save_figure, write_results  # noqa: E402


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
        model(torch.rand(1, 3, size, size))
    for h in hs:
        h.remove()
    return macs


def export_float_onnx(model, path: Path) -> Path:
    """The model at 32 bits (quantization off) as a float ONNX graph taking normalised NCHW input, like the integer
    export (the model's own normalisation is left out of both)."""
    import torch

    from qnn.layers import set_bit_width_

    set_bit_width_(model, 32)
    model.eval()
    size = model.in_size
    torch.onnx.export(model.body, torch.rand(1, 3, size, size), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}}, opset_version=17)
    return path


def int8_peak_macs(threads: int) -> float:
    """MAC/s of a large uint8 x int8 MatMulInteger in ONNX Runtime: the practical int8 peak of this CPU."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = 1024
    b = numpy_helper.from_array(np.random.default_rng(0).integers(-128, 127, (n, n), dtype=np.int8), "B")
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [b])
    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "mm.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        a = np.random.default_rng(1).integers(0, 255, (n, n), dtype=np.uint8)
        ms = _median_ms(lambda: s.run(None, {"A": a}), 3, 10)
    return n ** 3 / (ms / 1e3)


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
    from qnn.layers import ensure_calibrated_, set_bit_width_
    from qnn.models import create_model

    warnings.filterwarnings("ignore")
    results, rows = [], []
    peaks = {int(t): int8_peak_macs(int(t)) for t in a.threads.split(",")}
    with tempfile.TemporaryDirectory() as td:
        for name in a.models.split(","):
            torch.manual_seed(0)
            model = create_model(name)
            size = model.in_size
            macs = count_macs(model, size)
            set_bit_width_(model, 32)
            model.eval()
            fpath = export_float_onnx(model, Path(td) / f"{name}_float.onnx")
            ipaths = {}
            for b in [int(v) for v in a.bits.split(",")]:
                set_bit_width_(model, b)
                ensure_calibrated_(model, torch.rand(8, 3, size, size))
                ipaths[b] = export_model(model, b, "int", Path(td) / f"{name}_int{b}.onnx", weight_type=a.weight_type)
            for threads in [int(t) for t in a.threads.split(",")]:
                torch.set_num_threads(threads)
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                fsess = ort.InferenceSession(str(fpath), so, providers=["CPUExecutionProvider"])
                for batch in [int(v) for v in a.batches.split(",")]:
                    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
                    xt = torch.from_numpy(x)
                    iters = a.iters if (size <= 64 or batch == 1) else max(5, a.iters // 5)
                    t_ort_f = _median_ms(lambda: fsess.run(None, {"input": x}), a.warmup, iters)
                    set_bit_width_(model, 32)
                    with torch.no_grad():
                        t_pt_f = _median_ms(lambda: model(xt), a.warmup, iters)
                    for b, p in ipaths.items():
                        isess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                        t_int = _median_ms(lambda: isess.run(None, {"input": x}), a.warmup, iters)
                        set_bit_width_(model, b)
                        with torch.no_grad():
                            t_fq = _median_ms(lambda: model(xt), a.warmup, max(3, iters // 2))
                        mac_s = macs * batch / (t_int / 1e3)
                        r = {"model": name, "bits": b, "batch": batch, "threads": threads, "ort_int_ms": t_int,
                             "ort_float_ms": t_ort_f, "torch_float_ms": t_pt_f, "torch_fakequant_ms": t_fq,
                             "speedup_int_vs_ort_float": t_ort_f / t_int, "int_mac_per_s": mac_s,
                             "share_of_int8_peak": mac_s / peaks[threads], "macs_per_image": macs}
                        results.append(r)
                        rows.append([name, b, batch, threads, t_int, t_ort_f, r["speedup_int_vs_ort_float"], t_pt_f, t_fq,
                                     f"{100 * r['share_of_int8_peak']:.1f}%"])
                        print(f"{name} W{b}A{b} batch {batch} threads {threads}: int {t_int:.2f} ms, ORT float {t_ort_f:.2f} ms "
                              f"({t_ort_f / t_int:.2f}x)", flush=True)
    command = command_line("bench/latency.py", argv)
    md = (f"Latency (ms, median), random-initialised weights. Command: `{command}`. ONNX Runtime "
          "ENABLE_ALL; 2/4-bit models run on int8 kernels (ORT has no 2/4-bit kernels). Peak = measured 1024^3 "
          f"MatMulInteger: {', '.join(f'{t} thr {v / 1e9:.1f} GMAC/s' for t, v in peaks.items())}.\n\n"
          + markdown_table(["model", "bits", "batch", "threads", "ORT int", "ORT float", "int speed-up", "PyTorch float",
                            "PyTorch fake-quant", "int MAC/s of peak"], rows))
    write_results(a.out, {"command": command, "results": results, "int8_peak_mac_per_s": peaks,
                          "weight_type": a.weight_type}, md)
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

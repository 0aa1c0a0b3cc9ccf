"""How fast ONNX Runtime applies a 256-entry table to uint8 codes, the exact form of an elementwise function
(Hardswish, SiLU, ...) on a quantized tensor: the exporter's Cast (int32) + Gather, the same with int64 indices, and
ORT's own table kernels QLinearSigmoid / QLinearLeakyRelu (which build their table from their function, in their float
arithmetic, so they take no table of ours) for reference. Interleaved medians on one tensor shape.

    python bench/lookup_kernels.py [--shape 32,16,56,56] [--threads 2] [--out results/screens/lookup_kernels]

Why it matters: on MobileNetV3-Small-224 the Gathers take about two thirds of the integer model's kernel time
(results/node_profile_edge_cnns.md), which makes it slower than the float model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, interleaved_ms, markdown_table, write_results  # noqa: E402

FORMS = ("Cast int32 + Gather", "Cast int64 + Gather", "QLinearSigmoid", "QLinearLeakyRelu")


def session(form: str, shape: list[int], threads: int):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    inits = [nh.from_array(np.float32(0.05), "s"), nh.from_array(np.uint8(128), "z")]
    if "Gather" in form:
        inits = [nh.from_array(np.arange(256, dtype=np.uint8)[::-1].copy(), "lut")]
        to = T.INT32 if "int32" in form else T.INT64
        nodes = [h.make_node("Cast", ["x"], ["i"], to=to), h.make_node("Gather", ["lut", "i"], ["y"], axis=0)]
    else:
        nodes = [h.make_node(form, ["x", "s", "z", "s", "z"], ["y"], domain="com.microsoft")]
    g = h.make_graph(nodes, "lookup", [h.make_tensor_value_info("x", T.UINT8, shape)],
                     [h.make_tensor_value_info("y", T.UINT8, shape)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32,16,56,56", help="uint8 tensor shape (default 32,16,56,56: a batch of 32 "
                    "through MobileNetV3-Small-224's second stage)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    ap.add_argument("--out", default="results/screens/lookup_kernels", help="results path without extension")
    a = ap.parse_args(argv)
    import numpy as np

    try:
        shape = [int(v) for v in a.shape.split(",")]
    except ValueError:
        print(f"lookup_kernels: error: --shape must be integers such as 32,16,56,56, got {a.shape!r}", file=sys.stderr)
        return 2
    if not shape or min(shape) < 1 or a.threads < 1 or a.rounds < 3:
        print("lookup_kernels: error: --shape entries, --threads must be positive and --rounds at least 3",
              file=sys.stderr)
        return 2
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    sessions = {f: session(f, shape, a.threads) for f in FORMS}
    ms = interleaved_ms({f: (lambda s=s: s.run(None, {"x": x})) for f, s in sessions.items()}, 3, a.rounds)
    n = int(np.prod(shape))
    base = ms[FORMS[0]]
    rows = [[f, f"{ms[f]:.2f}", f"{ms[f] * 1e6 / n:.2f}", f"{base / ms[f]:.1f}x"] for f in FORMS]
    md = (f"Table lookup on {n / 1e6:.1f} M uint8 codes (shape {shape}), ONNX Runtime, {a.threads} threads, median of "
          f"{a.rounds} interleaved rounds. Command: `{command_line('bench/lookup_kernels.py', argv)}`\n\n"
          + markdown_table(["form", "ms", "ns per element", "vs Cast int32 + Gather"], rows))
    write_results(a.out, {"shape": shape, "threads": a.threads, "rounds": a.rounds, "ms": ms,
                          "command": command_line("bench/lookup_kernels.py", argv)}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

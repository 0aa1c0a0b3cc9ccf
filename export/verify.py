"""Load an ONNX model in ONNX Runtime with full (portable) optimisation, read the optimised graph back, census ops."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from qnn.errors import QNNError
from qnn.integer import ort_kernels

_OURS_INTEGER, _OURS_MOVES = ort_kernels()
#: ops that compute in integers once ORT has fused the QDQ groups: every integer kernel the integer program's ops run
#: as (`qnn.integer.Op.integer_kernels`), and those other tools' integer graphs hold (ORT's `quantize_static`)
INTEGER_OPS = _OURS_INTEGER | {"QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearConcat", "QLinearSigmoid",
                               "QLinearLeakyRelu"}
#: data movement / clamping that is exact on integer tensors: the program's (`Op.moves`), and what ORT's optimiser
#: rewrites them into or leaves (slices merged into a Split, Identity, shape plumbing)
MOVEMENT_OPS = _OURS_MOVES | {"Identity", "Squeeze", "Unsqueeze", "Shape", "Split"}
BOUNDARY_OPS = {"QuantizeLinear", "DequantizeLinear"}


def load_onnx(path: str | Path) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise QNNError(f"ONNX file not found: {p}")
    try:
        m = onnx.load(str(p))
        if not m.graph.node:
            raise ValueError("empty graph")
        onnx.checker.check_model(m)
    except Exception as e:
        raise QNNError(f"{p}: not a valid ONNX model (truncated or corrupt): {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
    return m


def optimized_graph(path: str | Path, level: str = "extended", threads: int = 1) -> onnx.ModelProto:
    """The graph ORT actually runs. 'extended' = every portable fusion; 'all' adds hardware layouts (NCHWc)."""
    import onnxruntime as ort

    load_onnx(path)
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = threads
    fd, tmp = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        so.optimized_model_filepath = tmp
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise QNNError(f"{path}: ONNX Runtime could not load it: {str(e).splitlines()[0][:160]}") from None
        return onnx.load(tmp)
    finally:
        os.unlink(tmp)


def _interpolates(n: onnx.NodeProto) -> bool:
    """A Resize other than nearest computes new values."""
    modes = [a.s for a in n.attribute if a.name == "mode"]
    return n.op_type == "Resize" and modes != [b"nearest"]


def census(model: onnx.ModelProto) -> dict:
    """Op counts and the float compute ops left (with the input Quantize and final Dequantize allowed)."""
    ops = Counter(n.op_type for n in model.graph.node)
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    float_ops = []
    for n in model.graph.node:
        if n.op_type in INTEGER_OPS or (n.op_type in MOVEMENT_OPS and not _interpolates(n)):
            continue
        if n.op_type == "QuantizeLinear" and any(i in graph_inputs for i in n.input):
            continue
        if n.op_type == "DequantizeLinear" and any(o in graph_outputs for o in n.output):
            continue
        if n.op_type == "QGemm" or n.op_type.startswith("QLinear"):
            continue
        float_ops.append(n.op_type)
    # a graph of data movement alone computes nothing in integers: it is not an integer model
    computes = any(n.op_type in INTEGER_OPS or n.op_type == "QGemm" or n.op_type.startswith("QLinear")
                   for n in model.graph.node)
    return {"ops": dict(sorted(ops.items())), "float_compute_ops": float_ops, "integer_compute_ops": computes,
            "fully_integer": not float_ops and computes}


def verify(path: str | Path, level: str = "extended") -> dict:
    m = optimized_graph(path, level)
    return census(m)

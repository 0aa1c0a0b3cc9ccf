"""A small interpreter that runs an exported integer (QDQ) ONNX graph with the numpy integer kernels.

It reads the graph the way ONNX Runtime fuses it: DequantizeLinear values stay integer (tensor, scale, zero point);
Conv / Add / GlobalAveragePool consume them and produce an integer result that the following QuantizeLinear
requantizes; Gemm without a Quantize produces float logits. Any float op outside that pattern is refused: the
interpreter is also a second opinion on "fully integer".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qnn.kernels import reference as K
from qnn.errors import QNNError


@dataclass
class _DQ:
    q: np.ndarray
    scale: np.ndarray
    zp: np.ndarray


@dataclass
class _Pending:
    """An integer-domain op waiting for its output Quantize (scale, zp) to requantize."""

    op: str
    args: tuple


class IntegerInterpreter:
    def __init__(self, model: onnx.ModelProto | str | Path, cpu: str | None = None):
        """`cpu`: the CPU family whose ONNX Runtime arithmetic to follow (`qnn.kernels.reference.CPU_FAMILIES`;
        default: this machine's): QLinearAdd rounds differently on x86-64 and aarch64."""
        self.cpu = K.cpu_family(cpu)
        if not isinstance(model, onnx.ModelProto):
            from qnn.export.verify import load_onnx

            model = load_onnx(model)
        self.model = model
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.input_name = model.graph.input[0].name
        self.output_name = model.graph.output[0].name
        self.ops_seen: dict[str, int] = {}

    def run(self, x: np.ndarray) -> np.ndarray:
        env: dict[str, object] = {self.input_name: x.astype(np.float32), **self.inits}
        for node in self.model.graph.node:
            self.ops_seen[node.op_type] = self.ops_seen.get(node.op_type, 0) + 1
            ins = [env[i] if i else None for i in node.input]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            env[node.output[0]] = self._exec(node.op_type, ins, attrs, node)
        out = env[self.output_name]
        if not isinstance(out, np.ndarray):
            raise QNNError(f"graph output is not materialised ({type(out).__name__})")
        return out

    def _exec(self, op: str, ins: list, at: dict, node):
        if op == "QuantizeLinear":
            x, s, z = ins[0], ins[1], ins[2]
            if isinstance(x, _Pending):
                return self._requant(x, float(s), int(z))
            return K.quantize(x, float(s), int(z), z.dtype.type)
        if op == "DequantizeLinear":
            return _DQ(ins[0], ins[1], ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros_like(ins[1], dtype=np.int32))
        if op == "Clip":
            return np.clip(ins[0], ins[1], ins[2]).astype(ins[0].dtype)
        if op == "Slice":
            x, st, en, ax, sp = ins
            sl = [slice(None)] * x.ndim
            for s_, e_, a_, p_ in zip(st, en, ax, sp):
                sl[int(a_)] = slice(int(s_), int(min(e_, 2**62)), int(p_))
            return x[tuple(sl)]
        if op == "Pad":  # negative pads crop, as in ONNX
            x, pads, val = ins[0], ins[1], ins[2]
            k = x.ndim
            begin, end = [int(v) for v in pads[:k]], [int(v) for v in pads[k:]]
            x = x[tuple(slice(max(0, -b), n - max(0, -e)) for b, e, n in zip(begin, end, x.shape))]
            return np.pad(x, [(max(0, b), max(0, e)) for b, e in zip(begin, end)], constant_values=val)
        if op == "Flatten":
            return ins[0].reshape(ins[0].shape[0], -1)
        if op == "Reshape":  # allowzero 0: a 0 copies the input's dim
            shape = [ins[0].shape[i] if d == 0 else int(d) for i, d in enumerate(ins[1])]
            return self._integer(ins[0], node).reshape(shape)
        if op == "Transpose":
            return self._integer(ins[0], node).transpose(at["perm"])
        if op == "Resize":  # nearest, asymmetric, floor, whole scale factors: each element repeated
            x, scales = self._integer(ins[0], node), ins[2]
            how = tuple(at.get(k) for k in ("mode", "coordinate_transformation_mode", "nearest_mode"))
            if how != (b"nearest", b"asymmetric", b"floor") or any(float(f) != int(f) for f in scales):
                raise QNNError(f"{node.name}: only nearest Resize by whole factors is integer data movement")
            for axis, f in enumerate(scales):
                x = np.repeat(x, int(f), axis=axis)
            return x
        if op == "Identity":
            return ins[0]
        if op == "Concat":
            if not all(isinstance(i, np.ndarray) for i in ins):
                raise QNNError(f"{node.name}: Concat of non-integer tensors: graph is not fully integer")
            return np.concatenate(ins, axis=int(at["axis"]))
        if op == "Cast":  # integer codes to table indices
            if not (isinstance(ins[0], np.ndarray) and np.issubdtype(ins[0].dtype, np.integer)):
                raise QNNError(f"{node.name}: Cast of a non-integer tensor: graph is not fully integer")
            return ins[0].astype({onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT64: np.int64}[at["to"]])
        if op == "Gather":  # a lookup table indexed by integer codes
            return np.take(ins[0], ins[1].astype(np.int64), axis=int(at.get("axis", 0)))
        if op == "MaxPool":
            pads = at.get("pads", [0, 0, 0, 0])
            if list(pads[:2]) != list(pads[2:]):
                raise QNNError(f"{node.name}: asymmetric MaxPool padding is not supported")
            return K.max_pool(ins[0], at["kernel_shape"], at.get("strides", [1, 1]), pads[:2], at.get("dilations", [1, 1]),
                              bool(at.get("ceil_mode", 0)))
        if op in ("Conv", "Add", "Mul", "GlobalAveragePool", "AveragePool"):
            if not all(isinstance(i, _DQ) for i in ins if i is not None):
                raise QNNError(f"{node.name}: float {op} (inputs not dequantized integers): graph is not fully integer")
            return _Pending(op, (ins, at))
        if op == "Gemm":
            a, b, c = (ins + [None])[:3]
            if not all(isinstance(i, _DQ) for i in (a, b)):
                raise QNNError(f"{node.name}: float Gemm: graph is not fully integer")
            if self._consumer_is_quantize(node):
                return _Pending(op, (ins, at))
            return K.qgemm_float_out(a.q, float(a.scale), int(a.zp), b.q, b.scale, b.zp,
                                     None if c is None else c.q, bool(at.get("transB", 0)))
        raise QNNError(f"{node.name}: op {op} not supported by the integer interpreter")

    @staticmethod
    def _integer(x, node) -> np.ndarray:
        if not (isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer)):
            raise QNNError(f"{node.name}: {node.op_type} of a non-integer tensor: graph is not fully integer")
        return x

    def _consumer_is_quantize(self, node) -> bool:
        users = [n for n in self.model.graph.node if node.output[0] in n.input]
        return len(users) == 1 and users[0].op_type == "QuantizeLinear"

    def _requant(self, p: _Pending, ys: float, yz: int) -> np.ndarray:
        ins, at = p.args
        if p.op == "Conv":
            x, w, b = (ins + [None])[:3]
            pads = at.get("pads", [0, 0, 0, 0])
            if list(pads[:2]) != list(pads[2:]):
                raise QNNError("asymmetric Conv padding is not supported")
            return K.qlinear_conv(x.q, float(x.scale), int(x.zp), w.q, w.scale, w.zp, ys, yz, None if b is None else b.q,
                                  at.get("strides", [1, 1]), pads[:2], at.get("dilations", [1, 1]), int(at.get("group", 1)))
        if p.op == "Gemm":
            a, w, b = (ins + [None])[:3]
            return K.qgemm(a.q, float(a.scale), int(a.zp), w.q, w.scale, w.zp, None if b is None else b.q, ys, yz,
                           bool(at.get("transB", 0)))
        if p.op == "Add":
            a, b = ins
            return K.qlinear_add(a.q, float(a.scale), int(a.zp), b.q, float(b.scale), int(b.zp), ys, yz, cpu=self.cpu)
        if p.op == "Mul":
            a, b = ins
            return K.qlinear_mul(a.q, float(a.scale), int(a.zp), b.q, float(b.scale), int(b.zp), ys, yz)
        if p.op == "GlobalAveragePool":
            x = ins[0]
            return K.qlinear_global_avg_pool(x.q, float(x.scale), int(x.zp), ys, yz)
        if p.op == "AveragePool":
            x, pads = ins[0], at.get("pads", [0, 0, 0, 0])
            if list(pads[:2]) != list(pads[2:]):
                raise QNNError("asymmetric AveragePool padding is not supported")
            return K.qlinear_avg_pool(x.q, float(x.scale), int(x.zp), ys, yz, at["kernel_shape"],
                                      at.get("strides", [1, 1]), pads[:2], bool(at.get("ceil_mode", 0)),
                                      bool(at.get("count_include_pad", 0)))
        raise QNNError(f"cannot requantize {p.op}")

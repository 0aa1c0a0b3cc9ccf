"""Export a switchable model at one bit-width to ONNX: integer QDQ ('int'), QCDQ ('qcdq') or QONNX ('qonnx').

The graph is the model's integer program (`qnn.integer`, lowered from the traced model), so it holds exactly the
integer weights, int32 biases and scales the model's own evaluation computes with:
- int  : int8 weight initializers + DequantizeLinear, int32 bias, uint8 activations (Q -> [Clip] -> DQ). ONNX Runtime
         (>= ORT_ENABLE_EXTENDED) fuses it into QLinearConv / QLinearAdd / QLinearGlobalAveragePool / QGemm on
         x86-64 and aarch64. Sub-8-bit values travel in uint8/int8 containers with an integer Clip.
- qcdq : float weights quantized in the graph (Q -> Clip -> DQ), Brevitas' QCDQ style.
- qonnx: QONNX `Quant` nodes (domain qonnx.custom_op.general) for FINN / hls4ml; float compute between them.
Data movement (MaxPool, Flatten, Slice, Pad, Reshape, Transpose, nearest Resize) runs on the uint8 tensors directly; the option-A shortcut (strided Slice
+ channel Pad) is one 1x1 QLinearConv that copies the integers in 'int' (`qnn.integer.ChannelEmbed`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qnn import __version__
from qnn.errors import QNNError
from qnn.integer import SATURATION_FREE_MAX_W, Grid, IntegerProgram
from qnn.layers import precision, uncalibrated
from qnn.qmodules import ELEMENTWISE

FORMATS = ("int", "qcdq", "qonnx")
OPSET = 19
QONNX_DOMAIN = "qonnx.custom_op.general"


@dataclass
class QTensor:
    """A tensor name in the graph plus its integer grid (uint8 container: scale, zero point, [lo, hi])."""

    name: str          # uint8 tensor (int/qcdq) or float tensor carrying quantized values (qonnx)
    grid: Grid
    shape: tuple[int, ...] | None = None  # at batch 1; set by the integer program once the op is emitted

    @property
    def scale(self) -> float:
        return float(self.grid.scale)

    @property
    def zp(self) -> int:
        return self.grid.zp


WEIGHT_TYPES = ("auto", "int8", "uint8")


class _Builder:
    def __init__(self, fmt: str, bits: int, weight_type: str = "auto"):
        if weight_type not in WEIGHT_TYPES:
            raise QNNError(f"unknown weight type '{weight_type}'; choose from {', '.join(WEIGHT_TYPES)}")
        self.fmt, self.bits, self.weight_type = fmt, bits, weight_type
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def uid(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr: np.ndarray, base: str) -> str:
        name = self.uid(base)
        self.inits.append(numpy_helper.from_array(np.require(np.asarray(arr), requirements="C"), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, domain: str | None = None, **attrs) -> str:
        out = self.uid(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", domain=domain, **attrs))
        return out

    # ---- activations
    def quantize(self, x_float: str, g: Grid) -> QTensor:
        """QuantizeLinear onto grid `g` (uint8), with an integer Clip where the grid is narrower than uint8."""
        s = np.float32(g.scale)
        if self.fmt == "qonnx":
            # QONNX Quant: signed (zero point 0) for the shifted grid [-2^(b-1), 2^(b-1)-1], else unsigned with zp
            signed = g.lo == -(2 ** (g.bits - 1)) and g.hi <= 2 ** (g.bits - 1) - 1
            out = self.node("Quant", [x_float, self.const(s, "s"), self.const(np.float32(0 if signed else g.zp), "zp"),
                                      self.const(np.float32(g.bits), "bw")], "quant", domain=QONNX_DOMAIN,
                            signed=int(signed), narrow=0, rounding_mode="ROUND")
            full_hi = 2 ** (g.bits - 1) - 1 if signed else 2**g.bits - 1 - g.zp
            if g.hi < full_hi:  # a clamp inside the grid (ReLU6)
                out = self.node("Clip", [out, "", self.const(np.float32(g.hi * s), "hi")], "clip")
            return QTensor(out, g)
        y = self.node("QuantizeLinear", [x_float, self.const(s, "s"), self.const(np.uint8(g.zp), "zp")], "q")
        if g.lo + g.zp > 0 or g.hi + g.zp < 255:
            y = self.node("Clip", [y, self.const(np.uint8(g.lo + g.zp), "lo"), self.const(np.uint8(g.hi + g.zp), "hi")], "clip")
        return QTensor(y, g)

    def dequant(self, t: QTensor) -> str:
        if self.fmt == "qonnx":
            return t.name
        return self.node("DequantizeLinear", [t.name, self.const(np.float32(t.scale), "s"), self.const(np.uint8(t.zp), "zp")], "dq")

    @staticmethod
    def same_grid(name: str, t: QTensor) -> QTensor:
        return QTensor(name, t.grid)

    @staticmethod
    def reread(t: QTensor, g: Grid) -> QTensor:
        """The same uint8 codes read on grid `g` (its scale and zero point)."""
        return QTensor(t.name, g)

    def constant_tensor(self, codes: np.ndarray, g: Grid) -> QTensor:
        """A constant uint8 tensor on grid `g` (an initializer the op's DequantizeLinear reads)."""
        return QTensor(self.const(codes.astype(np.uint8), "k"), g)

    def pad(self, name: str, torch_pads, t: QTensor) -> str:
        """Zero padding (F.pad's order: last dim first) of a 4-D tensor: pads with the zero point."""
        begin, end = [0] * 4, [0] * 4
        for i in range(len(torch_pads) // 2):
            begin[3 - i], end[3 - i] = int(torch_pads[2 * i]), int(torch_pads[2 * i + 1])
        value = self.const(np.float32(0) if self.fmt == "qonnx" else np.uint8(t.zp), "pv")
        return self.node("Pad", [name, self.const(np.array(begin + end, np.int64), "pads"), value], "pad", mode="constant")

    def slice(self, name: str, index: tuple) -> str:
        """x[index] for a tuple of slices over the leading dims."""
        starts, ends, axes, steps = [], [], [], []
        for axis, sl in enumerate(index):
            if sl == slice(None):
                continue
            if sl is Ellipsis or (sl.step or 1) < 1:
                raise QNNError(f"slice {index} has no integer export (Ellipsis or negative step)")
            starts.append(sl.start or 0)
            ends.append(2**62 if sl.stop is None else sl.stop)
            axes.append(axis)
            steps.append(sl.step or 1)
        arr = lambda v, n: self.const(np.array(v, np.int64), n)  # noqa: E731
        return self.node("Slice", [name, arr(starts, "st"), arr(ends, "en"), arr(axes, "ax"), arr(steps, "sp")], "slice")

    def upsample(self, name: str, factor: tuple[int, int]) -> str:
        """Nearest upsampling of a 4-D tensor by whole factors: Resize(nearest) with 'asymmetric' coordinates and
        'floor' rounding reads input pixel floor(i / f), each integer repeated f times."""
        scales = self.const(np.array([1, 1, *factor], np.float32), "scales")
        return self.node("Resize", [name, "", scales], "upsample", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def embed_channels(self, t: QTensor, stride: tuple[int, int], before: int, after: int) -> QTensor:
        """t[:, :, ::sh, ::sw] zero-padded by `before` / `after` channels, on t's grid. 'int': a 1x1 strided conv with
        0/1 int8 weights at scale 1 requantized onto t's own grid (multiplier exactly 1: the integers are copied, no
        Clip needed), which ORT runs as a QLinearConv in its conv layout; elsewhere a Slice and a Pad. The 0/1 weights
        are int8 whatever `weight_type` says: they cannot saturate any kernel."""
        sh, sw = stride
        if self.fmt != "int":
            name = t.name if (sh, sw) == (1, 1) else self.slice(t.name, (slice(None), slice(None), slice(None, None, sh),
                                                                         slice(None, None, sw)))
            return self.same_grid(self.pad(name, (0, 0, 0, 0, before, after), t), t)
        cin = t.shape[1]
        cout = before + cin + after
        w = np.zeros((cout, cin, 1, 1), np.int8)
        w[before + np.arange(cin), np.arange(cin)] = 1
        wq = self.node("DequantizeLinear", [self.const(w, "ew"), self.const(np.ones(cout, np.float32), "ews"),
                                            self.const(np.zeros(cout, np.int8), "ewzp")], "ewdq", axis=0)
        y = self.node("Conv", [self.dequant(t), wq], "embed", kernel_shape=[1, 1], strides=[sh, sw])
        return QTensor(self.node("QuantizeLinear", [y, self.const(np.float32(t.scale), "s"),
                                                    self.const(np.uint8(t.zp), "zp")], "q"), t.grid)

    def lookup(self, t: QTensor, op, out: Grid) -> QTensor:
        """op.table (the output integers of the input grid's levels) applied to `t`. 'int' / 'qcdq': Gather on the
        uint8 codes (cast to int32 indices) from a 256-entry uint8 table; 'qonnx': the float function between Quant
        nodes, as QONNX tools expect."""
        if self.fmt == "qonnx":
            return self.quantize(self.float_fn(t.name, op.name, op.kwargs), out)
        g = t.grid
        table = np.full(256, out.zp, np.int64)  # codes outside the input grid cannot occur
        table[g.lo + g.zp:g.hi + g.zp + 1] = op.table.numpy().astype(np.int64) + out.zp
        idx = self.node("Cast", [t.name], "idx", to=TensorProto.INT32)
        return QTensor(self.node("Gather", [self.const(table.astype(np.uint8), "lut"), idx], "lut", axis=0), out)

    def float_fn(self, x: str, name: str, kw: dict) -> str:
        """The ONNX form of an elementwise function (QONNX's float compute between quantizers): its registration's."""
        if name not in ELEMENTWISE:
            raise QNNError(f"no ONNX form for elementwise function '{name}'")
        return ELEMENTWISE[name].onnx(self, x, kw)

    # ---- weights / bias
    def weight(self, w_int: np.ndarray, s_eff: np.ndarray, bits: int, lift: int = 1) -> str:
        """The dequantized weights of `bits`-bit integers `w_int` with per-channel scales `s_eff`. 'int' and 'qcdq'
        store them lifted: times `lift` at scale / `lift` (`qnn.integer.weight_lift`: the same real weights, on the
        finer accumulator grid their int32 bias shares); 'qonnx' states the `bits`-bit grid itself."""
        qm = 2 ** (bits - 1) - 1
        w_l, s_l = w_int * lift, (s_eff / lift).astype(np.float32)
        if self.fmt == "int":
            # 'auto': uint8 weights (zero point 128, the same integers) where int8 ones could saturate ORT's u8s8 kernels
            # on x86 without VNNI (its u8u8 kernels widen to int16 first: exact everywhere); int8 elsewhere (fastest)
            u8 = self.weight_type == "uint8" or (self.weight_type == "auto" and np.abs(w_l).max() > SATURATION_FREE_MAX_W)
            if u8:
                return self.node("DequantizeLinear", [self.const((w_l + 128).astype(np.uint8), "w"), self.const(s_l, "ws"),
                                                      self.const(np.full(len(s_l), 128, np.uint8), "wzp")], "wdq", axis=0)
            return self.node("DequantizeLinear", [self.const(w_l.astype(np.int8), "w"), self.const(s_l, "ws"),
                                                  self.const(np.zeros(len(s_l), np.int8), "wzp")], "wdq", axis=0)
        shape = (-1,) + (1,) * (w_int.ndim - 1)
        wf = (w_int * s_eff.reshape(shape)).astype(np.float32)
        if self.fmt == "qcdq":
            q = self.node("QuantizeLinear", [self.const(wf, "wf"), self.const(s_l, "ws"),
                                             self.const(np.zeros(len(s_l), np.int8), "wzp")], "wq", axis=0)
            c = self.node("Clip", [q, self.const(np.int8(-qm * lift), "lo"), self.const(np.int8(qm * lift), "hi")],
                          "wclip")
            return self.node("DequantizeLinear", [c, self.const(s_l, "ws"),
                                                  self.const(np.zeros(len(s_l), np.int8), "wzp")], "wdq", axis=0)
        return self.node("Quant", [self.const(wf, "wf"), self.const(s_eff.reshape(shape).astype(np.float32), "ws"),
                                   self.const(np.float32(0), "zp"), self.const(np.float32(bits), "bw")], "wquant",
                         domain=QONNX_DOMAIN, signed=1, narrow=1, rounding_mode="ROUND")

    def bias(self, b_int: np.ndarray, s_bias: np.ndarray) -> str:
        if self.fmt == "qonnx":
            return self.const((b_int * s_bias).astype(np.float32), "bf")
        return self.node("DequantizeLinear", [self.const(b_int.astype(np.int32), "b"), self.const(s_bias.astype(np.float32), "bs"),
                                              self.const(np.zeros(len(b_int), np.int32), "bzp")], "bdq", axis=0)


def build_graph(model: torch.nn.Module, bits: int, fmt: str = "int", batch: int | str | None = None,
                weight_type: str = "auto") -> onnx.ModelProto:
    """Build the ONNX model of `model` at `bits` (weights and activations; first/last layers per the model).

    batch: the input's batch dimension; by default symbolic ("N", any batch in ONNX Runtime) for 'int' and 'qcdq', and
    1 for 'qonnx' (qonnx and FINN read a symbolic dimension as 0).

    weight_type (format 'int'): 'int8', 'uint8' (zero point 128) or 'auto' (uint8 for layers whose |w| > 64, which
    ORT's u8s8 kernels can saturate on x86 CPUs without VNNI; int8 for the others)."""
    if fmt not in FORMATS:
        raise QNNError(f"unknown export format '{fmt}'; choose from {', '.join(FORMATS)}")
    if not (2 <= bits <= 8):
        raise QNNError(f"integer export needs bits in 2..8, got {bits}")
    if batch is None:
        batch = 1 if fmt == "qonnx" else "N"
    b = _Builder(fmt, bits, weight_type)
    C, H, W = model.in_channels, model.in_size, model.in_size
    model.eval()
    with precision(model, bits), torch.no_grad():
        if uncalibrated(model):
            raise QNNError(f"model has no calibrated {bits}-bit activation scales: it was not trained at {bits} bits")
        logits = IntegerProgram(model.body).emit(b, "input", (1, C, H, W))
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_node"))
    graph = helper.make_graph(b.nodes, f"{getattr(model, 'arch', 'model')}_w{bits}a{bits}",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, C, H, W])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, model.num_classes])], b.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if fmt == "qonnx":
        opsets.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="qnn", producer_version=__version__)
    m.ir_version = 9
    return m


def check_exportable(model: torch.nn.Module) -> None:
    """The exporters take any model quantized by `qnn.quantize` behind the zoo's interface (`QuantizedNet`)."""
    from qnn.models.quantized import QuantizedNet

    if not isinstance(model, QuantizedNet):
        raise QNNError(f"model '{getattr(model, 'arch', type(model).__name__)}' cannot be exported: wrap it with "
                       f"qnn.models.quantized.QuantizedNet (pixels in [0, 1], normalisation, the quantized body)")


def _reduce_range(model: torch.nn.Module) -> bool:
    """Whether every weight quantizer puts 8-bit weights on the 7-bit grid (a user's own Brevitas model may not)."""
    from qnn.brevitas_quant import quantizers

    weights = [q for q in quantizers(model) if q.kind == "weight"]
    return bool(weights) and all(q.reduce_range for q in weights)


def int8_weight_max(m: onnx.ModelProto) -> int:
    """The largest |w| stored in an int8 weight container (0 when none): above SATURATION_FREE_MAX_W, ORT's u8 x s8
    kernels can saturate on x86 without AVX-VNNI."""
    inits = {t.name: t for t in m.graph.initializer}
    top = 0
    for n in m.graph.node:
        t = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" and n.input[0].startswith("w_") else None
        if t is not None and t.data_type == onnx.TensorProto.INT8:
            top = max(top, int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int16)).max()))
    return top


def export_model(model: torch.nn.Module, bits: int, fmt: str, out: str | Path, meta: dict | None = None,
                 weight_type: str = "auto") -> Path:
    """Build, check, attach metadata and write atomically. Returns the path."""
    from qnn.checkpoint import atomic_write_bytes

    check_exportable(model)

    m = build_graph(model, bits, fmt, weight_type=weight_type)
    md = {"qnn_version": __version__, "format": fmt, "w_bits": str(bits), "a_bits": str(bits),
          "residual_bits": str(max(bits, model.residual_bits) if getattr(model, "residual_bits", None) else bits),
          "first_last_w_bits": str(model.first_last_bits or bits), "input_layout": "NCHW",
          "input_normalisation": json.dumps({"mean": list(model.mean), "std": list(model.std), "pixel_range": [0, 1]}),
          "input_shape": json.dumps([model.in_channels, model.in_size, model.in_size]),
          "arch": getattr(model, "arch", ""),
          "weight_type": weight_type, "reduce_range": str(_reduce_range(model)).lower()}
    if fmt == "int":  # what the edge runner checks against the CPU's flags before running
        md["int8_weight_max"] = str(int8_weight_max(m))
    md.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (meta or {}).items()})
    for k, v in md.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    if fmt != "qonnx":
        onnx.checker.check_model(m, full_check=True)
    atomic_write_bytes(out, m.SerializeToString())
    return Path(out)


def normalise(x01: np.ndarray, mean, std) -> np.ndarray:
    """NCHW pixels in [0,1] -> the exported graph's input (mean and std: one value per channel)."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((x01.astype(np.float32) - m) / s).astype(np.float32)

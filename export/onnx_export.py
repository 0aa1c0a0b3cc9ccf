"""Export a switchable model at one bit-width to ONNX: integer QDQ ('int'), QCDQ ('qcdq') or QONNX ('qonnx').

The graph is written directly from the model's folded integer state (not traced), so it holds exactly the integer
weights, int32 biases and scales the fake-quant model computes with:
- int  : int8 weight initializers + DequantizeLinear, int32 bias, uint8 activations (Q -> [Clip] -> DQ). ONNX Runtime
         (>= ORT_ENABLE_EXTENDED) fuses it into QLinearConv / QLinearAdd / QLinearGlobalAveragePool / QGemm on
         x86-64 and aarch64. Sub-8-bit values travel in uint8/int8 containers with an integer Clip.
- qcdq : float weights quantized in the graph (Q -> Clip -> DQ), Brevitas' QCDQ style.
- qonnx: QONNX `Quant` nodes (domain qonnx.custom_op.general) for FINN / hls4ml; float compute between them.
Data movement (Slice/Pad of the option-A shortcut, MaxPool, Flatten) runs on the uint8 tensors directly.
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
from qnn.layers import ActQuant, QConvBN, set_bit_width_

FORMATS = ("int", "qcdq", "qonnx")
OPSET = 19
QONNX_DOMAIN = "qonnx.custom_op.general"


@dataclass
class QTensor:
    """A tensor name in the graph plus its quantization: integer name (uint8) and scale/zero-point."""

    name: str          # uint8 tensor (int/qcdq) or float tensor carrying quantized values (qonnx)
    scale: float
    zp: int


#: |w| above this can saturate ONNX Runtime's u8 x s8 kernels on x86 without AVX-VNNI (AVX2 / AVX-512BW use
#: VPMADDUBSW, which adds two u8*s8 products into a saturating int16: 255 * 64 * 2 = 32640 is the largest safe pair)
SATURATION_FREE_MAX_W = 64
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
    def quantize(self, x_float: str, q: ActQuant, scale: float) -> QTensor:
        lo, hi, zp = q.qrange()
        zp_i, nbits = int(zp), (8 if q.kind == "input" else q.bits)
        if self.fmt == "qonnx":
            signed = q.kind == "shifted"
            out = self.node("Quant", [x_float, self.const(np.float32(scale), "s"), self.const(np.float32(0 if signed else zp_i), "zp"),
                                      self.const(np.float32(nbits), "bw")], "quant", domain=QONNX_DOMAIN,
                            signed=int(signed), narrow=0, rounding_mode="ROUND")
            return QTensor(out, scale, zp_i)
        y = self.node("QuantizeLinear", [x_float, self.const(np.float32(scale), "s"), self.const(np.uint8(zp_i), "zp")], "q")
        if nbits < 8 and q.kind != "input":
            y = self.node("Clip", [y, self.const(np.uint8(lo + zp_i), "lo"), self.const(np.uint8(hi + zp_i), "hi")], "clip")
        return QTensor(y, scale, zp_i)

    def dequant(self, t: QTensor) -> str:
        if self.fmt == "qonnx":
            return t.name
        return self.node("DequantizeLinear", [t.name, self.const(np.float32(t.scale), "s"), self.const(np.uint8(t.zp), "zp")], "dq")

    # ---- weights / bias
    def weight(self, w_int: np.ndarray, s_eff: np.ndarray, bits: int) -> str:
        qm = 2 ** (bits - 1) - 1
        if self.fmt == "int":
            # 'auto': uint8 weights (zero point 128, the same integers) where int8 ones could saturate ORT's u8s8 kernels
            # on x86 without VNNI (its u8u8 kernels widen to int16 first: exact everywhere); int8 elsewhere (fastest)
            u8 = self.weight_type == "uint8" or (self.weight_type == "auto" and np.abs(w_int).max() > SATURATION_FREE_MAX_W)
            if u8:
                return self.node("DequantizeLinear", [self.const((w_int + 128).astype(np.uint8), "w"), self.const(s_eff.astype(np.float32), "ws"),
                                                      self.const(np.full(len(s_eff), 128, np.uint8), "wzp")], "wdq", axis=0)
            return self.node("DequantizeLinear", [self.const(w_int.astype(np.int8), "w"), self.const(s_eff.astype(np.float32), "ws"),
                                                  self.const(np.zeros(len(s_eff), np.int8), "wzp")], "wdq", axis=0)
        shape = (-1,) + (1,) * (w_int.ndim - 1)
        wf = (w_int * s_eff.reshape(shape)).astype(np.float32)
        if self.fmt == "qcdq":
            q = self.node("QuantizeLinear", [self.const(wf, "wf"), self.const(s_eff.astype(np.float32), "ws"),
                                             self.const(np.zeros(len(s_eff), np.int8), "wzp")], "wq", axis=0)
            c = self.node("Clip", [q, self.const(np.int8(-qm), "lo"), self.const(np.int8(qm), "hi")], "wclip")
            return self.node("DequantizeLinear", [c, self.const(s_eff.astype(np.float32), "ws"),
                                                  self.const(np.zeros(len(s_eff), np.int8), "wzp")], "wdq", axis=0)
        return self.node("Quant", [self.const(wf, "wf"), self.const(s_eff.reshape(shape).astype(np.float32), "ws"),
                                   self.const(np.float32(0), "zp"), self.const(np.float32(bits), "bw")], "wquant",
                         domain=QONNX_DOMAIN, signed=1, narrow=1, rounding_mode="ROUND")

    def bias(self, b_int: np.ndarray, s_bias: np.ndarray) -> str:
        if self.fmt == "qonnx":
            return self.const((b_int * s_bias).astype(np.float32), "bf")
        return self.node("DequantizeLinear", [self.const(b_int.astype(np.int32), "b"), self.const(s_bias.astype(np.float32), "bs"),
                                              self.const(np.zeros(len(b_int), np.int32), "bzp")], "bdq", axis=0)


def _f(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _conv(b: _Builder, conv: QConvBN, x: QTensor) -> str:
    s_x = torch.tensor(x.scale, dtype=torch.float32)
    w_int, s_eff, b_int = conv.folded(s_x)
    s_eff32 = s_eff.detach().float().numpy()
    s_bias = (np.float32(x.scale) * s_eff32).astype(np.float32)
    # recompute the int32 bias against the exact float32 bias scale the graph stores
    bn = conv.bn
    inv = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    bias_f = (bn.bias - bn.running_mean * inv).detach().float().numpy()
    b_int = np.round(bias_f / s_bias).astype(np.int64)
    if np.abs(b_int).max() >= 2**31:
        raise QNNError("int32 bias overflow in export")
    k = conv.weight.shape[-1]
    return b.node("Conv", [b.dequant(x), b.weight(_f(w_int).astype(np.int64), s_eff32, conv.wbits), b.bias(b_int, s_bias)], "conv",
                  kernel_shape=[k, k], strides=[conv.stride] * 2, pads=[conv.padding] * 4)


def _scale_of(q: ActQuant) -> float:
    return float(q.scale().detach())


def build_graph(model: torch.nn.Module, bits: int, fmt: str = "int", batch: int | str = "N",
                weight_type: str = "auto") -> onnx.ModelProto:
    """Build the ONNX model of `model` at `bits` (weights and activations; first/last layers per the model).

    weight_type (format 'int'): 'int8', 'uint8' (zero point 128) or 'auto' (uint8 for layers whose |w| > 64, which
    ORT's u8s8 kernels can saturate on x86 CPUs without VNNI; int8 for the others)."""
    if fmt not in FORMATS:
        raise QNNError(f"unknown export format '{fmt}'; choose from {', '.join(FORMATS)}")
    if not (2 <= bits <= 8):
        raise QNNError(f"integer export needs bits in 2..8, got {bits}")
    set_bit_width_(model, bits)
    model.eval()
    for m in model.modules():
        if isinstance(m, ActQuant) and m.kind != "input" and not bool(m.initialized[m.bits - 2 if m.bits <= 8 else 7]):
            raise QNNError(f"model has no calibrated {m.bits}-bit activation scales: it was not trained at {bits} bits")
    b = _Builder(fmt, bits, weight_type)
    H = W = model.in_size
    xin = b.quantize("input", model.inq, _scale_of(model.inq))
    x = b.quantize(_conv(b, model.conv1, xin), model.act1, _scale_of(model.act1))
    split = getattr(model, "residual_bits", None) is not None
    # a wide residual stream: the producing op is emitted twice, once per output quantizer (two fused QLinear ops)
    xc = b.quantize(_conv(b, model.conv1, xin), model.act1_conv, _scale_of(model.act1_conv)) if split else x
    if model.stem_kind == "imagenet":
        x = QTensor(b.node("MaxPool", [x.name], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), x.scale, x.zp)
        xc = QTensor(b.node("MaxPool", [xc.name], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                     xc.scale, xc.zp) if split else x
    for blk in model.blocks:
        h = b.quantize(_conv(b, blk.conv1, xc), blk.act1, _scale_of(blk.act1))
        h = b.quantize(_conv(b, blk.conv2, h), blk.q2, _scale_of(blk.q2))
        if blk.shortcut_kind == "none":
            sc = x
        elif blk.shortcut_kind == "A":
            sl = b.node("Slice", [x.name, b.const(np.array([0, 0], np.int64), "st"), b.const(np.array([2**31, 2**31], np.int64), "en"),
                                  b.const(np.array([2, 3], np.int64), "ax"), b.const(np.array([2, 2], np.int64), "sp")], "slice")
            pad_val = b.const(np.uint8(x.zp) if fmt != "qonnx" else np.float32(0), "pv")
            sc = QTensor(b.node("Pad", [sl, b.const(np.array([0, blk.pad, 0, 0, 0, blk.pad, 0, 0], np.int64), "pads"), pad_val],
                                "pad", mode="constant"), x.scale, x.zp)
        else:
            sc = b.quantize(_conv(b, blk.sc_conv, x), blk.sc_q, _scale_of(blk.sc_q))
        s = b.node("Add", [b.dequant(h), b.dequant(sc)], "add")
        x_new = b.quantize(s, blk.act_out, _scale_of(blk.act_out))
        if split:
            s2 = b.node("Add", [b.dequant(h), b.dequant(sc)], "add")
            xc = b.quantize(s2, blk.act_out_conv, _scale_of(blk.act_out_conv))
        else:
            xc = x_new
        x = x_new
    p = b.node("GlobalAveragePool", [b.dequant(x)], "gap")
    pq = b.quantize(p, model.pool_q, _scale_of(model.pool_q))
    flat = QTensor(b.node("Flatten", [pq.name], "flatten", axis=1), pq.scale, pq.zp)
    lin = model.linear
    s_in = np.float32(flat.scale)
    s_w = lin.w_scale().detach().float().numpy()
    s_bias = (s_in * s_w).astype(np.float32)
    b_int = np.round(lin.bias.detach().float().numpy() / s_bias).astype(np.int64)
    w_int = _f(lin.int_weight()).astype(np.int64)
    logits = b.node("Gemm", [b.dequant(flat), b.weight(w_int, s_w, lin.wbits), b.bias(b_int, s_bias)], "gemm", transB=1)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_node"))
    graph = helper.make_graph(b.nodes, f"{getattr(model, 'arch', 'model')}_w{bits}a{bits}",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, H, W])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, model.num_classes])], b.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if fmt == "qonnx":
        opsets.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="qnn", producer_version=__version__)
    m.ir_version = 9
    return m


def check_exportable(model: torch.nn.Module) -> None:
    """The integer exporter walks the toolkit's own ResNet layers; models on Brevitas layers (`qnn.quantize`) train,
    evaluate and are attacked, but their integer export is not built yet: say so in one line."""
    from qnn.models.resnet import QResNet

    if not isinstance(model, QResNet):
        raise QNNError(f"integer export of model '{getattr(model, 'arch', type(model).__name__)}' (Brevitas layers) is "
                       f"not available yet; the exportable models are the ResNets and small_cnn")


def export_model(model: torch.nn.Module, bits: int, fmt: str, out: str | Path, meta: dict | None = None,
                 weight_type: str = "auto") -> Path:
    """Build, check, attach metadata and write atomically. Returns the path."""
    from qnn.checkpoint import atomic_write_bytes

    check_exportable(model)

    m = build_graph(model, bits, fmt, weight_type=weight_type)
    md = {"qnn_version": __version__, "format": fmt, "w_bits": str(bits), "a_bits": str(bits),
          "residual_bits": str(max(bits, model.residual_bits) if getattr(model, "residual_bits", None) else bits),
          "first_last_w_bits": str(model.conv1.fixed_w_bits or bits), "input_layout": "NCHW",
          "input_normalisation": json.dumps({"mean": list(model.mean), "std": list(model.std), "pixel_range": [0, 1]}),
          "input_shape": json.dumps([3, model.in_size, model.in_size]), "arch": getattr(model, "arch", ""),
          "weight_type": weight_type}
    md.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (meta or {}).items()})
    for k, v in md.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    if fmt != "qonnx":
        onnx.checker.check_model(m, full_check=True)
    atomic_write_bytes(out, m.SerializeToString())
    return Path(out)


def normalise(x01: np.ndarray, mean, std) -> np.ndarray:
    """NCHW pixels in [0,1] -> the exported graph's input."""
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return ((x01.astype(np.float32) - m) / s).astype(np.float32)

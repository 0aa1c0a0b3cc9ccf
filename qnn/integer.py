"""The integer program of a model quantized by `qnn.quantize`, at its current bit-width.

`IntegerProgram(body)` walks the traced graph once and lowers it to integer ops: each conv or linear (with its
BatchNorm folded) or residual add or average pool is fused with the activation quantizer that consumes it, as ONNX
Runtime fuses DequantizeLinear -> op -> QuantizeLinear into QLinearConv / QGemm / QLinearAdd /
QLinearGlobalAveragePool. Each op owns both its exact arithmetic (`run`, in torch, what ORT's MLAS kernels compute)
and its ONNX emission (`emit`): so the evaluation in PyTorch, the exported graph and the numpy interpreter of that
graph are one definition, for every model, with no per-architecture code.

Tensors in `run` are integers held in float tensors, centred on their zero point (q - zp): padding with 0 is padding
with the zero point. Accumulators are exact (float32 while they provably stay below 2^24, float64 beyond);
requantization is rint(float32(acc) * float32(s_x * s_w / s_y)), half to even, saturated to the output grid. With
autograd on, every rounding passes a straight-through gradient, so attacks differentiate the deployed arithmetic.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import brevitas.nn as bnn
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from qnn.brevitas_quant import SwitchableIntQuant, quantizers
from qnn.errors import QNNError
from qnn.kernels import reference as K
from qnn.layers import FLOAT_BITS, switchable_modules
from qnn.qmodules import QuantElementwise, ReLU6Quant, SwitchableBatchNorm2d, TorchForms

_EXACT_F32 = 2.0**24


@dataclass(frozen=True)
class Grid:
    """The integer grid of a quantized tensor: float32 scale, zero point, and [lo, hi] in the centred domain."""

    scale: torch.Tensor
    zp: int
    lo: int
    hi: int
    bits: int

    @staticmethod
    def of(q: SwitchableIntQuant, clamp_hi: float | None = None) -> "Grid":
        b = q.bits
        lo, hi, zp = q.qrange(b)
        s = q.scale(b).detach().float().reshape(())
        if clamp_hi is not None:  # ReLU6: the clamp at 6 lands on the grid as min(hi, rint(6 / s))
            hi = min(hi, float(torch.round(torch.tensor(clamp_hi, dtype=torch.float32) / s)))
        return Grid(s, int(zp), int(lo), int(hi), b)

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """rint(v) (half to even) saturated to the grid; with autograd, one node whose gradient passes straight
        through where the rounded value is inside the grid and is zero where it saturated."""
        if v.requires_grad:
            return _RoundSaturate.apply(v, float(self.lo), float(self.hi))
        return torch.clamp(torch.round(v), float(self.lo), float(self.hi))


class _RoundSaturate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        r = torch.round(v)
        out = torch.clamp(r, lo, hi)
        ctx.save_for_backward(out == r)  # inside the grid: lo <= r <= hi (NaN: outside), in one pass
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        inside, = ctx.saved_tensors
        return g * inside, None, None


def _requant(acc: torch.Tensor, mult: torch.Tensor, out: Grid) -> torch.Tensor:
    m = mult.reshape(1, -1, *([1] * (acc.dim() - 2))) if mult.numel() > 1 else mult
    return out.round(acc.float() * m)


def _fold(layer: nn.Module, bn: nn.Module | None, q_w: SwitchableIntQuant) -> tuple[torch.Tensor, ...]:
    """(integer weights with BatchNorm's sign folded in, per-channel float32 scale, float bias) of conv/linear +
    optional BatchNorm at the current bit-width; the integer weights are those of training."""
    b = q_w.bits
    lo, hi, _ = q_w.qrange(b)
    s_w = q_w.scale(b).detach().float().reshape(-1)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    w_int = torch.clamp(torch.round(layer.weight.detach() / s_w.reshape(shape)), lo, hi)
    bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(w_int.shape[0])
    if bn is not None:
        inv, bias = bn.folded(layer.bias)
        sign = torch.where(inv < 0, -1.0, 1.0)
        w_int = w_int * sign.reshape(shape)
        s_w = (s_w * inv.abs()).float()
    return w_int, s_w, bias.float()


#: |w| above this can saturate ONNX Runtime's u8 x s8 kernels on x86 without AVX-VNNI (AVX2 / AVX-512BW use
#: VPMADDUBSW, which adds two u8*s8 products into a saturating int16: 255 * 64 * 2 = 32640 is the largest safe pair)
SATURATION_FREE_MAX_W = 64


def weight_lift(grid_bits: int) -> int:
    """The power of two a `grid_bits`-bit layer's integer weights are multiplied by in the integer graph, their scale
    divided by it: the same real weights, on an accumulator grid s_x * s_w that much finer. ONNX's int32 bias lives on
    that grid; with 2-bit inputs and weights it is coarse, and a bias rounded onto it would shift a channel's outputs
    by up to half of it, about a point of 2-bit accuracy (`results/archive/bias_rounding.md`). The lifted weights stay
    within SATURATION_FREE_MAX_W, so no kernel can saturate: 64 at 2 bits, 16 at 3, 8 at 4, 4 at 5, 2 at 6, 1 from 7."""
    if grid_bits < 2:
        raise QNNError(f"integer weights need 2 or more bits, got {grid_bits}")
    qmax, lift = 2 ** (grid_bits - 1) - 1, 1
    while 2 * lift * qmax <= SATURATION_FREE_MAX_W:
        lift *= 2
    return lift


class Op:
    """One op of the integer program: `run` computes it on centred integer tensors, `emit` writes it to ONNX."""

    inputs: tuple[int, ...]
    out: Grid | None  # None: a float result (the logits)
    #: True where ONNX Runtime's arithmetic differs between CPU families: `run` then takes `cpu=` (a family; None:
    #: this machine's)
    by_cpu_family = False
    #: the ONNX Runtime kernels the op's emission runs as, once ORT has fused its QDQ groups: integer arithmetic, and
    #: data movement or clamps on integer tensors (`qnn.export.verify` reads its op sets from these)
    integer_kernels: tuple[str, ...] = ()
    moves: tuple[str, ...] = ()

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def emit(self, b, *xs):
        raise NotImplementedError


class QuantizeInput(Op):
    def __init__(self, out: Grid):
        self.inputs, self.out = (), out
        self.uint8 = Grid(out.scale, 0, -out.zp, 255 - out.zp, 8)  # the whole uint8 range, centred on the zero point

    def run(self, x: torch.Tensor) -> torch.Tensor:  # QuantizeLinear: saturate(rint(x / s) + zp) on uint8, centred
        return self.uint8.round(x.float() / self.out.scale)

    def emit(self, b, x):
        return b.quantize(x, self.out)


class QConv(Op):
    """QLinearConv (conv + BatchNorm folded + int32 bias, requantized onto `out`'s grid), or QGemm for a linear
    layer; with `out` None the linear layer's result is the float logits: float32(acc + bias) * (s_x * s_w)."""
    integer_kernels, moves = ("QLinearConv", "QGemm"), ("Clip",)

    def __init__(self, layer: nn.Module, bn: nn.Module | None, x: int, in_grid: Grid, out: Grid | None):
        self.inputs, self.in_grid, self.out = (x,), in_grid, out
        self.linear = isinstance(layer, bnn.QuantLinear)
        q_w = quantizers(layer.weight_quant)[0]
        self.w_bits = q_w.grid_bits(q_w.bits)  # 7 for 8-bit weights with reduce_range: the grid the emitters write
        self.w_int, self.s_w, bias = _fold(layer, bn, q_w)
        # the integer graph's weights and scales: lifted onto a finer grid, which its int32 bias shares (weight_lift)
        self.lift = weight_lift(self.w_bits)
        self.w_acc, self.s_acc = self.w_int * self.lift, (self.s_w / self.lift).float()
        self.s_bias = (in_grid.scale * self.s_acc).float()
        self.b_real = bias / self.s_bias  # the bias on its grid before rounding (results/archive/bias_rounding.md)
        if self.b_real.abs().max() >= 2**31:
            raise QNNError(f"int32 bias overflow in {type(layer).__name__}: scales too small for this bias")
        self.b_int = torch.round(self.b_real)
        if not self.linear:
            self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
            self.kernel = layer.kernel_size
            if isinstance(self.padding, str) or layer.padding_mode != "zeros":
                raise QNNError(f"integer export needs numeric zero padding on every conv, got {self.padding!r} "
                               f"({layer.padding_mode}): give padding as numbers with padding_mode='zeros'")
        # every partial sum of the accumulator is bounded by this: float32 is exact below 2^24
        bound = self.w_acc.abs().reshape(len(self.w_acc), -1).sum(1).max() * max(-in_grid.lo, in_grid.hi) \
            + self.b_int.abs().max()
        if float(bound) >= 2**31:
            raise QNNError(f"int32 accumulator overflow possible in {type(layer).__name__} (bound {float(bound):.3g})")
        self.acc_dtype = torch.float32 if float(bound) < _EXACT_F32 else torch.float64
        self.mult = (in_grid.scale * self.s_acc / out.scale).float() if out is not None else self.s_bias

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        # with autograd (attacks) float32 always: the gradient needs no exactness (values are exact while partial sums
        # stay below 2^24; the scores attacks report come from the exact, gradient-free path)
        dtype = torch.float32 if x.requires_grad else self.acc_dtype
        w, bias = self.w_acc.to(dtype), self.b_int.to(dtype)
        if self.linear:
            return F.linear(x.to(dtype), w, bias)
        return F.conv2d(x.to(dtype), w, bias, self.stride, self.padding, self.dilation, self.groups)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(x)
        if self.out is None:
            return acc.float() * self.mult
        return _requant(acc, self.mult, self.out)

    def emit(self, b, x):
        w = b.weight(self.w_int.numpy(), self.s_w.numpy(), self.w_bits, self.lift)
        bias = b.bias(self.b_int.numpy(), self.s_bias.numpy())
        if self.linear:
            y = b.node("Gemm", [b.dequant(x), w, bias], "gemm", transB=1)
        else:
            (ph, pw), (kh, kw) = self.padding, self.kernel
            y = b.node("Conv", [b.dequant(x), w, bias], "conv", kernel_shape=[kh, kw], strides=list(self.stride),
                       pads=[ph, pw, ph, pw], dilations=list(self.dilation), group=self.groups)
        return y if self.out is None else b.quantize(y, self.out)


def _lookup_pair(op, key: str, a: torch.Tensor, b: torch.Tensor, kernel) -> torch.Tensor:
    """`kernel(a_codes, b_codes)` (an elementwise MLAS kernel on uint8 codes) on the centred tensors a and b
    (broadcasting), through the kernel's table of all 256 x 256 code pairs: computed once per op and `key` (the CPU
    family whose arithmetic it is), exact by construction, and a gather instead of a numpy round trip per batch."""
    tables = op.__dict__.setdefault("_tables", {})
    if (key, a.device) not in tables:
        codes = np.arange(256, dtype=np.uint8)
        y = kernel(np.repeat(codes, 256).reshape(256, 256), np.tile(codes, 256).reshape(256, 256))
        tables[(key, a.device)] = op.out.round(torch.from_numpy(y.astype(np.float32)).reshape(-1) - op.out.zp).to(a.device)
    return tables[(key, a.device)][((a + op.ga.zp) * 256 + (b + op.gb.zp)).long()]


class QAdd(Op):
    """QLinearAdd: about rint(a * (s_a / s_y) + b * (s_b / s_y)) on `out`'s grid; exactly, the arithmetic of the
    target CPU family's MLAS kernel (`qnn.kernels.reference.qlinear_add`), which differs between x86-64 and aarch64
    in the last bit of rare near-ties."""
    integer_kernels, moves = ("QLinearAdd",), ("Clip",)

    def __init__(self, a: int, b: int, ga: Grid, gb: Grid, out: Grid):
        self.inputs, self.out, self.ga, self.gb = (a, b), out, ga, gb
        self.ra, self.rb = (ga.scale / out.scale).float(), (gb.scale / out.scale).float()

    by_cpu_family = True

    def run(self, a: torch.Tensor, b: torch.Tensor, cpu: str | None = None) -> torch.Tensor:
        if a.requires_grad or b.requires_grad:  # attacks: the gradient needs no exactness
            return self.out.round(a * self.ra + b * self.rb)
        cpu = K.cpu_family(cpu)
        return _lookup_pair(self, cpu, a, b, lambda x, y: K.qlinear_add(
            x, float(self.ga.scale), self.ga.zp, y, float(self.gb.scale), self.gb.zp, float(self.out.scale),
            self.out.zp, cpu=cpu))

    def emit(self, b, x, y):
        return b.quantize(b.node("Add", [b.dequant(x), b.dequant(y)], "add"), self.out)


class QMul(Op):
    """QLinearMul of two quantized tensors (broadcasting: a squeeze-excitation gate times its feature map): the exact
    integer product, then MLAS' float32 requantisation (`qnn.kernels.reference.qlinear_mul`)."""
    integer_kernels, moves = ("QLinearMul",), ("Clip",)

    def __init__(self, a: int, b: int, ga: Grid, gb: Grid, out: Grid):
        self.inputs, self.out, self.ga, self.gb = (a, b), out, ga, gb
        self.ratio = (ga.scale * gb.scale / out.scale).float()

    def run(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.requires_grad or b.requires_grad:  # attacks: the gradient needs no exactness
            return self.out.round(a * b * self.ratio)
        return _lookup_pair(self, "any", a, b, lambda x, y: K.qlinear_mul(
            x, float(self.ga.scale), self.ga.zp, y, float(self.gb.scale), self.gb.zp, float(self.out.scale),
            self.out.zp))

    def emit(self, b, x, y):
        return b.quantize(b.node("Mul", [b.dequant(x), b.dequant(y)], "mul"), self.out)


class QGlobalAvgPool(Op):
    """QLinearGlobalAveragePool: rint(sum * (s_x / (s_y * HW)))."""
    integer_kernels, moves = ("QLinearGlobalAveragePool",), ("Clip",)

    def __init__(self, x: int, in_grid: Grid, out: Grid):
        self.inputs, self.in_grid, self.out = (x,), in_grid, out

    def run(self, x: torch.Tensor) -> torch.Tensor:
        hw = x.shape[2] * x.shape[3]
        mult = self.in_grid.scale / (self.out.scale * torch.tensor(float(hw)))
        return _requant(x.sum((2, 3), keepdim=True), mult, self.out)  # exact: integer sums < 2^24

    def emit(self, b, x):
        return b.quantize(b.node("GlobalAveragePool", [b.dequant(x)], "gap"), self.out)


class QLookup(Op):
    """An elementwise function of a quantized tensor as a table: every level k of the input grid maps to
    out.round(f(k * s_x) / s_y), computed once here in float32. The 'int' and 'qcdq' graphs index the table with the
    uint8 codes (Cast + Gather: data movement, so ONNX Runtime, the interpreter and PyTorch agree by construction);
    QONNX writes the float function between its Quant nodes. With autograd the value is the table's and the gradient
    the real function's (straight through the output rounding)."""
    moves = ("Cast", "Gather")

    def __init__(self, fn, name: str, kwargs: dict, x: int, in_grid: Grid, out: Grid):
        self.inputs, self.in_grid, self.out, self.fn, self.name, self.kwargs = (x,), in_grid, out, fn, name, kwargs
        levels = torch.arange(in_grid.lo, in_grid.hi + 1, dtype=torch.float32)
        with torch.no_grad():
            self.table = out.round(fn(levels * in_grid.scale) / out.scale)  # centred output integers

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = self.table[(x.detach() - self.in_grid.lo).long()]
        if not x.requires_grad:
            return y
        smooth = self.fn(x * self.in_grid.scale) / self.out.scale
        return smooth + (y - smooth).detach()

    def emit(self, b, x):
        return b.lookup(x, self, self.out)


class QHardGate(QLookup):
    """Hardsigmoid, and Hardswish = x * hardsigmoid(x), in ORT's vectorised integer kernels instead of a Gather (26x
    slower per element, `results/archive/lookup_kernels.md`): hardsigmoid(x) = (x + 3) / 6 saturated to [0, 1] is a
    QLinearAdd of x and the constant 3 onto a grid six times the output's, whose codes read on the output's grid are the
    hardsigmoid; Hardswish multiplies x by that hardsigmoid on an 8-bit grid in a QLinearMul. PyTorch evaluates the same
    integers as a table over the input codes, built once per CPU family from the kernels' models (QLinearAdd rounds
    differently on aarch64); with autograd, the real function's gradient, as QLookup."""
    integer_kernels, moves = ("QLinearAdd", "QLinearMul"), ("Clip",)

    THREE = (np.uint8(6), np.float32(0.5))  # the constant 3 as a uint8 code and its scale (zero point 0): exact
    GATE = Grid(torch.tensor(1 / 255, dtype=torch.float32), 0, 0, 255, 8)  # Hardswish's inner hardsigmoid

    def __init__(self, fn, name: str, kwargs: dict, x: int, in_grid: Grid, out: Grid):
        super().__init__(fn, name, kwargs, x, in_grid, out)
        self.swish = name == "hardswish"
        self.tables: dict[str, torch.Tensor] = {}
        # hard-sigmoid saturates at 0 and 1: its own clamp inside the output grid (which may reach past 1, or below
        # 0 when a concatenation shares it), as ReLU6's clamp at 6; Hardswish's 8-bit gate is [0, 1] exactly
        top = int(torch.round(torch.tensor(1.0, dtype=torch.float32) / out.scale))
        self.gate = self.GATE if self.swish else Grid(out.scale, out.zp, max(out.lo, 0), min(out.hi, top), out.bits)

    def _add_scale(self, g: Grid) -> np.float32:
        return np.float32(g.scale) * np.float32(6)

    def _codes(self, family: str) -> np.ndarray:
        """The output codes of every input code 0..255 (uint8), as ORT computes them on `family`."""
        g, out = self.in_grid, self.out
        codes = np.arange(256, dtype=np.uint8)
        three, s3 = self.THREE
        gate = self.gate
        y = K.qlinear_add(codes, float(g.scale), g.zp, np.array([three]), float(s3), 0,
                          float(self._add_scale(gate)), gate.zp, cpu=family)
        y = np.clip(y, gate.lo + gate.zp, gate.hi + gate.zp)
        if not self.swish:
            return y
        y = K.qlinear_mul(codes, float(g.scale), g.zp, y, float(gate.scale), 0, float(out.scale), out.zp)
        return np.clip(y, out.lo + out.zp, out.hi + out.zp)

    by_cpu_family = True

    def run(self, x: torch.Tensor, cpu: str | None = None) -> torch.Tensor:
        cpu = K.cpu_family(cpu)
        if cpu not in self.tables:
            self.tables[cpu] = torch.from_numpy(self._codes(cpu).astype(np.float32)) - self.out.zp
        t = self.tables[cpu].to(x.device)
        y = t[(x.detach() + self.in_grid.zp).long()]
        if not x.requires_grad:
            return y
        smooth = self.fn(x * self.in_grid.scale) / self.out.scale
        return smooth + (y - smooth).detach()

    def emit(self, b, x):
        if b.fmt == "qonnx":  # QONNX tools expect the float function between Quant nodes
            return super().emit(b, x)
        inner = self.gate
        three, s3 = self.THREE
        const = b.constant_tensor(np.array([three]), Grid(torch.tensor(s3), 0, 0, 255, 8))
        added = b.node("Add", [b.dequant(x), b.dequant(const)], "hsig")
        wide = Grid(torch.tensor(self._add_scale(inner)), inner.zp, inner.lo, inner.hi, inner.bits)
        gate = b.reread(b.quantize(added, wide), self.GATE if self.swish else self.out)  # the codes, read as hsig
        if not self.swish:
            return gate
        return b.quantize(b.node("Mul", [b.dequant(x), b.dequant(gate)], "hswish"), self.out)


class QAvgPool(Op):
    """QLinearAveragePool, as ONNX Runtime's kernel computes it: the window's dequantized values s_x * (q - zp) summed
    in float32 row by row, divided by the count (with count_include_pad the whole kernel, even for a ceil_mode window
    past the padded edge; without, the window's in-image part), then rint(y / s_y + zp) saturated."""
    integer_kernels, moves = ("QLinearAveragePool",), ("Clip",)

    def __init__(self, x: int, in_grid: Grid, out: Grid, kernel, stride, padding, ceil_mode: bool,
                 count_include_pad: bool):
        self.inputs, self.in_grid, self.out = (x,), in_grid, out
        self.kernel, self.stride, self.padding = _pair(kernel), _pair(stride or kernel), _pair(padding)
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # attacks: the gradient needs no exactness
            count = (float(self.kernel[0] * self.kernel[1]) if self.count_include_pad else
                     F.avg_pool2d(torch.ones_like(x[:1, :1]), self.kernel, self.stride, self.padding, self.ceil_mode,
                                  count_include_pad=False, divisor_override=1))
            total = F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, divisor_override=1)
            return self.out.round(total * (self.in_grid.scale / (self.out.scale * count)))
        g, out = self.in_grid, self.out
        y = K.qlinear_avg_pool((x + g.zp).cpu().numpy().astype(np.uint8), float(g.scale), g.zp, float(out.scale),
                               out.zp, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        return out.round(torch.from_numpy(y.astype(np.float32)).to(x.device) - out.zp)

    def emit(self, b, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        y = b.node("AveragePool", [b.dequant(x)], "avgpool", kernel_shape=[kh, kw], strides=[sh, sw],
                   pads=[ph, pw, ph, pw], ceil_mode=int(self.ceil_mode), count_include_pad=int(self.count_include_pad))
        return b.quantize(y, self.out)


class Move(Op):
    """Data movement on the integer tensor (same grid): max pool, flatten, zero padding, strided slicing, a
    permutation of the dims after the batch, nearest upsampling by integer factors."""
    moves = ("MaxPool", "Flatten", "Pad", "Transpose", "Resize", "Slice")

    def __init__(self, kind: str, x: int, grid: Grid, **params):
        self.inputs, self.out, self.kind, self.p = (x,), grid, kind, params

    def run(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        if self.kind == "maxpool":  # F.max_pool2d pads with -inf, as ONNX MaxPool ignores padding
            return F.max_pool2d(x, p["kernel"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])
        if self.kind == "flatten":
            return x.flatten(1)
        if self.kind == "pad":
            return F.pad(x, p["pads"])
        if self.kind == "permute":
            return x.permute(p["perm"])
        if self.kind == "transpose":
            return x.transpose(*p["dims"])
        if self.kind == "upsample":  # nearest: every integer repeated, exactly what Resize(nearest, floor) copies
            (fh, fw) = p["factor"]
            return x.repeat_interleave(fh, 2).repeat_interleave(fw, 3)
        return x[p["index"]]

    def emit(self, b, x):
        p, name = self.p, x.name
        if self.kind == "maxpool":
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (p[k] for k in ("kernel", "stride", "padding", "dilation"))
            y = b.node("MaxPool", [name], "maxpool", kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                       dilations=[dh, dw], ceil_mode=int(p["ceil_mode"]))
        elif self.kind == "flatten":
            y = b.node("Flatten", [name], "flatten", axis=1)
        elif self.kind == "pad":
            y = b.pad(name, p["pads"], x)
        elif self.kind in ("permute", "transpose"):
            rank = len(x.shape)
            perm = [d % rank for d in p["perm"]] if self.kind == "permute" else _swapped(rank, *p["dims"])
            if perm[0] != 0:
                raise QNNError("a permutation that moves the batch dim has no integer form")
            y = b.node("Transpose", [name], "transpose", perm=perm)
        elif self.kind == "upsample":
            y = b.upsample(name, p["factor"])
        else:
            y = b.slice(name, p["index"])
        return b.same_grid(y, x)


class Part(Op):
    """Part `index` of torch.split(x, sizes, dim) or torch.chunk(x, chunks, dim): a slice of the integer tensor,
    whose bounds the emitter reads off the input's shape."""
    moves = ("Slice",)

    def __init__(self, x: int, grid: Grid, how: str, arg, dim: int, index: int):
        self.inputs, self.out, self.how, self.arg, self.dim, self.index = (x,), grid, how, arg, dim, index

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.split if self.how == "split" else torch.chunk)(x, self.arg, self.dim)[self.index]

    def emit(self, b, x):
        dim = self.dim % len(x.shape)
        part = self.run(torch.arange(x.shape[dim]).reshape([-1 if d == dim else 1 for d in range(len(x.shape))]))
        if part.numel() == 0:
            raise QNNError(f"part {self.index} of the {self.how} along dim {self.dim} is empty")
        lo, hi = int(part.min()), int(part.max()) + 1
        return b.same_grid(b.slice(x.name, (slice(None),) * dim + (slice(lo, hi),)), x)


@dataclass(frozen=True)
class Size:
    """A size the model reads off one of its tensors (x.size(i), x.shape[i]), or integer arithmetic on such sizes:
    resolved from the tensors' shapes when the program runs, so the batch size stays free."""

    expr: tuple  # ("dim", value index, axis) or (operator, a, b) with a, b Size or int

    def refs(self) -> set[int]:
        if self.expr[0] == "dim":
            return {self.expr[1]}
        return set().union(*(a.refs() for a in self.expr[1:] if isinstance(a, Size)))

    def reads_batch(self) -> bool:
        if self.expr[0] == "dim":
            return self.expr[2] == 0 or self.expr[2] <= -4  # -4 is a 4-D tensor's batch (wider: refused with it)
        return any(isinstance(a, Size) and a.reads_batch() for a in self.expr[1:])

    def value(self, shapes: dict[int, tuple]) -> int:
        if self.expr[0] == "dim":
            return int(shapes[self.expr[1]][self.expr[2]])
        fn, *args = self.expr
        return int(fn(*(a.value(shapes) if isinstance(a, Size) else a for a in args)))


class Shape:
    """x.size() / x.shape, indexed later."""

    def __init__(self, x: int):
        self.x = x

    def __getitem__(self, axis: int) -> Size:
        if not isinstance(axis, int):
            raise QNNError(f"sizes are read one at a time (x.size(1), x.shape[2]), not as {axis!r}: write the reshape "
                           "with each size")
        return Size(("dim", self.x, axis))


class Reshape(Op):
    """view / reshape of the integer tensor. Sizes read off tensors are inputs of the op, resolved when it runs. The
    batch must stay the first dim: the ONNX Reshape copies it (0), every other entry is written as a constant."""
    moves = ("Reshape",)

    def __init__(self, x: int, grid: Grid, shape: list, name: str):
        for i, d in enumerate(shape):
            if isinstance(d, Size) and d.reads_batch() and not (i == 0 and d.expr[0] == "dim"):
                raise QNNError(f"'{name}': a reshape that moves the batch size out of the first dim has no integer "
                               "form: keep the batch first, as in x.view(x.size(0), ...)")
            if not isinstance(d, (int, Size)):
                what = "a whole shape" if isinstance(d, Shape) else repr(d)
                raise QNNError(f"'{name}': reshape sizes must be integers or sizes of the model's tensors, got {what}")
        self.refs = sorted(set().union(*(d.refs() for d in shape if isinstance(d, Size))))
        self.inputs, self.out, self.shape = (x, *self.refs), grid, list(shape)

    def _shape(self, shapes: dict[int, tuple]) -> list[int]:
        return [d.value(shapes) if isinstance(d, Size) else d for d in self.shape]

    def run(self, x: torch.Tensor, *refs: torch.Tensor) -> torch.Tensor:
        return x.reshape(self._shape({i: r.shape for i, r in zip(self.refs, refs)}))

    def emit(self, b, x, *refs):
        shape = self._shape({i: r.shape for i, r in zip(self.refs, refs)})
        if isinstance(self.shape[0], Size) and self.shape[0].reads_batch():
            shape[0] = 0  # ONNX Reshape: copy the input's dim 0, the batch
        return b.same_grid(b.node("Reshape", [x.name, b.const(np.array(shape, np.int64), "shape")], "reshape"), x)


class Concat(Op):
    """Concatenation of tensors on one grid (`qnn.quantize` gives every input the same quantizer): integers moved."""
    moves = ("Concat",)

    def __init__(self, xs: tuple[int, ...], grids: list[Grid], dim: int, name: str):
        g = grids[0]
        for other in grids[1:]:
            if (float(other.scale), other.zp, other.lo, other.hi) != (float(g.scale), g.zp, g.lo, g.hi):
                raise QNNError(f"'{name}': the concatenated tensors are on different grids (quantize the model with "
                               "qnn.quantize, which shares one quantizer among them)")
        self.inputs, self.out, self.dim = tuple(xs), g, dim

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, self.dim)

    def emit(self, b, *xs):
        return b.same_grid(b.node("Concat", [x.name for x in xs], "concat", axis=self.dim), xs[0])


class ChannelEmbed(Op):
    """The option-A shortcut of a downsampling residual block: x[:, :, ::sh, ::sw] zero-padded (with the zero point)
    by `before` / `after` channels. The 'int' export writes it as one 1x1 strided conv whose 0/1 weights embed the
    input channels, with the input's grid as output: the requantisation multiplier is exactly 1, so ORT's QLinearConv
    copies the integers, and it runs in the convs' layout instead of a generic strided Slice and a Pad
    (`builder.embed_channels`)."""
    integer_kernels, moves = ("QLinearConv",), ("Slice", "Pad")  # one conv in 'int', a slice and a pad elsewhere

    def __init__(self, x: int, grid: Grid, stride: tuple[int, int], before: int, after: int):
        if min(before, after) < 0:  # a crop is a Move("pad"): the embedding's weights could not express it
            raise QNNError(f"a channel embedding pads, it cannot crop (before={before}, after={after})")
        self.inputs, self.out, self.stride, self.before, self.after = (x,), grid, stride, before, after

    def run(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return F.pad(x[:, :, ::sh, ::sw], (0, 0, 0, 0, self.before, self.after))

    def emit(self, b, x):
        return b.embed_channels(x, self.stride, self.before, self.after)


def _spatial_stride(index: tuple) -> tuple[int, int] | None:
    """(sh, sw) when `index` is x[:, :, ::sh, ::sw] (starting at 0, to the end), else None."""
    if len(index) != 4 or any(sl != slice(None) for sl in index[:2]):
        return None
    if not all(isinstance(sl, slice) and sl.start in (None, 0) and sl.stop is None for sl in index[2:]):
        return None
    return (index[2].step or 1, index[3].step or 1)


def _swapped(rank: int, d0: int, d1: int) -> list[int]:
    perm = list(range(rank))
    perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    return perm


SIZE_ARITHMETIC = {operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv}

#: what a transposed conv is refused with: ONNX Runtime runs ConvTranspose in float only (no QDQ fusion)
CONV_TRANSPOSE_HINT = (" (ONNX Runtime runs ConvTranspose in float only: use nn.Upsample(scale_factor=s, mode='nearest') "
                       "followed by a Conv2d)")
#: what a construct with no integer form is refused with, by type name, where a supported one does its job
HINTS = {"AdaptiveMaxPool2d": " (use MaxPool2d with a fixed kernel, or AdaptiveAvgPool2d(1))",
         "ConvTranspose2d": CONV_TRANSPOSE_HINT}


# ---------------------------------------------------------------- the constructs a float model may contain

#: what `qnn.quantize` does with a construct of each role
ROLES = {
    "layer": "swapped for a Brevitas layer with the switchable weight quantizer",
    "batchnorm": "one BatchNorm per bit-width, folded into the conv before it",
    "activation": "the unsigned activation quantizer (ReLU6 keeps its clamp)",
    "elementwise": "a quantized elementwise function (`qnn.qmodules.ELEMENTWISE`), a table of the input grid",
    "add": "an add of two tensors (a float result, requantized)",
    "mul": "a product of two tensors (a float result, requantized)",
    "cat": "a concatenation (its inputs share one quantizer)",
    "avgpool": "average pooling (a float result, requantized)",
    "move": "data movement on the integer grid, kept as it is",
    "shape": "sizes read off tensors, and integer arithmetic on them",
    "quantizer": "an activation or input quantizer of the converted graph",
}
#: roles whose float module `qnn.quantize` replaces: a subclass (whose forward may differ) is not taken for them
SWAPPED = ("layer", "batchnorm", "activation", "elementwise")


@dataclass(frozen=True)
class Construct(TorchForms):
    """One construct of a model: the torch modules, functions and tensor methods that are it, its `role` in
    `qnn.quantize` (ROLES), the modules of the converted graph it lowers (`lowered`; by default its modules, which the
    conversion keeps) and its lowering to integer ops, `lower(program, node, args, module)` (module None for a
    function or method). `qnn.quantize` accepts exactly the registered constructs, and refuses every other before
    training; the integer program lowers through the same entries, so the two cannot drift apart."""

    name: str
    role: str
    lower: Callable
    lowered: tuple = ()


CONSTRUCTS: dict[str, Construct] = {}
_FLOAT_MODULES: dict[type, Construct] = {}
_LOWERED_MODULES: dict[type, Construct] = {}
_FUNCTIONS: dict = {}
_METHODS: dict[str, Construct] = {}


def construct(name: str, role: str, modules: tuple = (), functions: tuple = (), methods: tuple = (),
              lowered: tuple | None = None):
    """Register the decorated lowering as construct `name` (see `Construct`)."""
    if role not in ROLES:
        raise ValueError(f"construct '{name}': unknown role '{role}'")

    def register(lower: Callable) -> Callable:
        c = Construct(name, role, lower, tuple(modules if lowered is None else lowered), modules=tuple(modules),
                      functions=tuple(functions), methods=tuple(methods))
        for table, keys in ((CONSTRUCTS, [name]), (_FLOAT_MODULES, c.modules), (_LOWERED_MODULES, c.lowered),
                            (_FUNCTIONS, c.functions), (_METHODS, c.methods)):
            for k in keys:
                if k in table:
                    raise ValueError(f"construct '{name}': {getattr(k, '__name__', k)} is registered twice")
                table[k] = c
        return lower

    return register


def _elementwise_construct(node: fx.Node, m: nn.Module | None):
    from qnn.qmodules import elementwise_of

    e = elementwise_of(node.op, type(m) if m is not None else node.target)
    return (CONSTRUCTS["elementwise"], e) if e is not None else (None, None)


def float_construct(node: fx.Node, m: nn.Module | None = None) -> tuple[Construct | None, object]:
    """(the construct of a float model's node, its elementwise function where it is one), or (None, None): the node
    of module `m` (call_module), function or tensor method. A module matches its own type, or for the roles that
    keep the module (`SWAPPED` aside) the nearest registered class it derives from."""
    c, e = _elementwise_construct(node, m)
    if c is not None:
        return c, e
    if node.op == "call_module":
        for t in type(m).__mro__:
            c = _FLOAT_MODULES.get(t)
            if c is not None:
                return (c if t is type(m) or c.role not in SWAPPED else None), None
        return None, None
    table = _FUNCTIONS if node.op == "call_function" else _METHODS if node.op == "call_method" else {}
    try:
        return table.get(node.target), None
    except TypeError:  # an unhashable target
        return None, None


def lowering_of(node: fx.Node, m: nn.Module | None = None) -> Construct | None:
    """The construct that lowers a node of the converted graph (module `m` for call_module)."""
    if node.op == "call_module":
        return next((_LOWERED_MODULES[t] for t in type(m).__mro__ if t in _LOWERED_MODULES), None)
    c = (_FUNCTIONS if node.op == "call_function" else _METHODS).get(node.target)
    return None if c is None or c.role in SWAPPED else c


def _fn_name(f) -> str:
    """A function as a model's code writes it: F.relu, torch.relu, operator.add, getattr."""
    mod = getattr(f, "__module__", None) or ""
    prefix = {"torch.nn.functional": "F.", "torch": "torch.", "_operator": "operator.", "operator": "operator."}.get(
        mod, "torch." if mod.startswith("torch") else "")
    return prefix + getattr(f, "__name__", str(f))


def describe_constructs() -> list[str]:
    """One line per registered construct (`qnn list ops`): its name, role and the torch names that are it."""
    from qnn.qmodules import ELEMENTWISE

    def names(c) -> list[str]:
        return [f"nn.{t.__name__}" for t in c.modules] + [_fn_name(f) for f in c.functions] + \
            [f".{m}()" for m in c.methods]

    lines = []
    for c in CONSTRUCTS.values():
        if c.role == "elementwise":
            for e in ELEMENTWISE.values():
                lines.append(f"{e.name:<20} elementwise  {', '.join(names(e))}")
        else:
            lines.append(f"{c.name:<20} {c.role:<12} {', '.join(names(c))}")
    return lines


def supported(kind: str) -> list[str]:
    """The names of the registered float modules ('modules') or functions and methods ('functions'), sorted."""
    from qnn.qmodules import ELEMENTWISE

    if kind == "modules":
        names = [t.__name__ for t in _FLOAT_MODULES] + [t.__name__ for e in ELEMENTWISE.values() for t in e.modules]
    else:
        names = [_fn_name(f) for f in _FUNCTIONS] + [f".{m}()" for m in _METHODS] + \
            [_fn_name(f) for e in ELEMENTWISE.values() for f in e.functions]
    return sorted(set(names))


@dataclass
class _Parts:
    """The tuple torch.split / torch.chunk returns, waiting for the index that picks one part."""

    x: int
    how: str
    arg: object
    dim: int


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass
class _Pending:
    """A float result waiting for the activation quantizer that fuses with it."""

    kind: str                 # 'layer', 'add', 'gap', 'avgpool'
    args: tuple
    bn: nn.Module | None = None
    clamp_hi: float | None = None
    pool: dict | None = None  # avgpool: its window
    flatten: bool = False     # gap from a spatial mean without keepdim: (N, C), not (N, C, 1, 1)


class IntegerProgram:
    """The integer ops of `body` (a `qnn.quantize`d GraphModule) at its current, quantized bit-width."""

    def __init__(self, body: fx.GraphModule):
        self.ops: list[Op] = []
        self.grids: list[Grid | None] = []
        self._lower(body)
        self._fuse_subsamples()

    def _fuse_subsamples(self) -> None:
        """A channel embedding whose input is a spatial subsample x[:, :, ::s, ::s] that nothing else reads takes the
        subsample over (one op, one conv in ONNX); the slice is dropped and the ops re-indexed."""
        readers = [0] * len(self.ops)
        for i in [j for op in self.ops for j in op.inputs] + [self.output]:
            readers[i] += 1
        dead = set()
        for op in self.ops:
            if not isinstance(op, ChannelEmbed) or op.stride != (1, 1):
                continue
            src = self.ops[op.inputs[0]]
            stride = _spatial_stride(src.p["index"]) if isinstance(src, Move) and src.kind == "slice" else None
            if stride and readers[op.inputs[0]] == 1:
                dead.add(op.inputs[0])
                op.inputs, op.stride = src.inputs, stride
        if not dead:
            return
        new = {i: n for n, i in enumerate(i for i in range(len(self.ops)) if i not in dead)}
        for op in self.ops:
            op.inputs = tuple(new[j] for j in op.inputs)
        self.ops = [op for i, op in enumerate(self.ops) if i not in dead]
        self.grids = [g for i, g in enumerate(self.grids) if i not in dead]
        self.output = new[self.output]

    def _push(self, op: Op) -> int:
        self.ops.append(op)
        self.grids.append(op.out)
        return len(self.ops) - 1

    def _value(self, v, node: fx.Node) -> int:
        if isinstance(v, int):
            return v
        raise QNNError(f"'{node.name}' takes a float tensor: the integer graph needs a quantizer before it")

    def _lower(self, gm: fx.GraphModule) -> None:
        """Lower every node; the constructs with no integer form are all named in one error (a node fed by one of
        them is not reported again)."""
        env: dict[fx.Node, object] = {}
        failed = object()
        errors: list[str] = []

        def resolve(a):
            if isinstance(a, (list, tuple)):
                return type(a)(resolve(v) for v in a)
            return env.get(a, a) if isinstance(a, fx.Node) else a

        def flat(a):
            return [x for v in a for x in flat(v)] if isinstance(a, (list, tuple)) else [a]

        for node in gm.graph.nodes:
            args = [resolve(a) for a in node.args]
            if any(v is failed for v in flat(args)):
                env[node] = failed
                continue
            try:
                if node.op == "placeholder":
                    env[node] = "input"
                elif node.op == "output":
                    self.output = self._materialise(env[node.args[0]], None, node)
                elif node.op == "call_module":
                    env[node] = self._module(gm.get_submodule(node.target), node, args)
                elif node.op in ("call_function", "call_method"):
                    env[node] = self._function(node, args)
                else:
                    raise QNNError(f"unsupported graph node '{node.name}' ({node.op}) in the integer graph")
            except QNNError as e:
                errors.append(str(e))
                env[node] = failed
        if len(errors) == 1:
            raise QNNError(errors[0])
        if errors:
            raise QNNError(f"{len(errors)} constructs have no integer form: " + "; ".join(errors))

    def _materialise(self, v, q: SwitchableIntQuant | None, node: fx.Node) -> int:
        """Fuse the pending float result `v` with quantizer `q` (None: the float output) into one integer op."""
        if isinstance(v, int) and q is None:
            return v
        if not isinstance(v, _Pending):
            what = "an already quantized tensor" if isinstance(v, int) else "the float input"
            raise QNNError(f"'{node.name}' requantizes {what}: not an integer op in ONNX Runtime")
        out = Grid.of(q, v.clamp_hi) if q is not None else None
        if v.kind == "layer":
            layer, x = v.args
            return self._push(QConv(layer, v.bn, x, self.grids[x], out))
        if out is None:
            raise QNNError(f"the model's output '{node.name}' is a float {v.kind}: end it with a linear layer")
        if v.kind == "add":
            a, b = v.args
            return self._push(QAdd(a, b, self.grids[a], self.grids[b], out))
        if v.kind == "mul":
            a, b = v.args
            return self._push(QMul(a, b, self.grids[a], self.grids[b], out))
        if v.kind == "avgpool":
            return self._push(QAvgPool(v.args[0], self.grids[v.args[0]], out, **v.pool))
        y = self._push(QGlobalAvgPool(v.args[0], self.grids[v.args[0]], out))
        return self._push(Move("flatten", y, out)) if v.flatten else y

    def _module(self, m: nn.Module, node: fx.Node, args: list):
        c = lowering_of(node, m)
        if c is None:
            raise QNNError(f"'{node.name}' ({type(m).__name__}) has no integer kernel{HINTS.get(type(m).__name__, '')}")
        return c.lower(self, node, args, m)

    def _function(self, node: fx.Node, args: list):
        f = node.target
        if f in SIZE_ARITHMETIC and any(isinstance(a, Size) for a in args):  # x.size(0) * 2, ...: any such function
            if not all(isinstance(a, (Size, int)) for a in args):
                raise QNNError(f"'{node.name}': integer arithmetic on sizes takes sizes and integers only")
            return Size((f, *args))
        c = lowering_of(node)
        if c is None:
            raise QNNError(f"'{node.name}' ({getattr(f, '__name__', f)}) has no integer kernel")
        return c.lower(self, node, args, None)

    def _flatten(self, x, node: fx.Node, start: int, end: int) -> int:
        xi = x if isinstance(x, int) else self._value(x, node)
        if start != 1 or end != -1:
            raise QNNError(f"'{node.name}': only flatten(1) has an integer form")
        return self._push(Move("flatten", xi, self.grids[xi]))

    def _upsample(self, x, node, size, scale_factor, mode) -> int:
        if mode not in ("nearest", "nearest-exact"):
            raise QNNError(f"'{node.name}': {mode} upsampling computes new values, it has no integer form: use "
                           "mode='nearest'")
        factor = (scale_factor,) * 2 if isinstance(scale_factor, (int, float)) else scale_factor
        if size is not None or factor is None or any(float(f) != int(f) or int(f) < 1 for f in factor):
            raise QNNError(f"'{node.name}': only upsampling by whole scale factors has an integer form (give "
                           f"scale_factor=2, not size=...), got size={size}, scale_factor={scale_factor}")
        xi = self._value(x, node)
        return self._push(Move("upsample", xi, self.grids[xi], factor=tuple(int(f) for f in factor)))

    def _maxpool(self, x, node, kernel, stride, padding, dilation, ceil_mode) -> int:
        xi = self._value(x, node)
        return self._push(Move("maxpool", xi, self.grids[xi], kernel=_pair(kernel), stride=_pair(stride or kernel),
                               padding=_pair(padding), dilation=_pair(dilation), ceil_mode=bool(ceil_mode)))

    def logit_lsb(self) -> float:
        """One LSB of the float logits: the classifier's input scale times its largest (lifted) weight scale, the
        grid its accumulator sits on."""
        last = self.ops[self.output]
        if not isinstance(last, QConv) or last.out is not None:
            raise QNNError("the model does not end with a linear layer")
        return float(last.s_bias.max())

    # ---- execution
    def _values(self, x: torch.Tensor, cpu: str | None = None) -> list[torch.Tensor]:
        cpu = K.cpu_family(cpu)
        vals: list[torch.Tensor] = []
        for op in self.ops:
            args = [vals[i] for i in op.inputs] if op.inputs else [x]
            vals.append(op.run(*args, cpu=cpu) if op.by_cpu_family else op.run(*args))
        return vals

    def run(self, x: torch.Tensor, cpu: str | None = None) -> torch.Tensor:
        """The logits the exported integer graph computes for the normalised input `x`, in the ONNX Runtime
        arithmetic of CPU family `cpu` (default: this machine's)."""
        y = self._values(x, cpu)[self.output]
        g = self.grids[self.output]
        return y if g is None else y * g.scale

    def emit(self, b, input_name: str, input_shape: tuple[int, ...]):
        """Write the program with builder `b` (see `qnn.export.onnx_export`); returns the output's value. Each
        emitted integer tensor carries its shape (for an input of `input_shape`), which ops that write shaped
        constants (the channel embedding's weights) read."""
        shapes = [tuple(v.shape) for v in self._values(torch.zeros(input_shape))]
        vals = []
        for op, shape in zip(self.ops, shapes):
            v = op.emit(b, *(vals[i] for i in op.inputs)) if op.inputs else op.emit(b, input_name)
            if hasattr(v, "grid"):
                v.shape = shape
            vals.append(v)
        y = vals[self.output]
        return y if self.grids[self.output] is None else b.dequant(y)


# ---------------------------------------------------------------- the registered constructs and their lowerings
# Each takes (program, node, its resolved args, its module or None). Positional and keyword arguments are read as
# torch's signatures name them.

def _arg(node: fx.Node, args: list, i: int, key: str, default=None):
    return args[i] if len(args) > i else node.kwargs.get(key, default)


@construct("conv / linear", "layer", modules=(nn.Conv2d, nn.Linear), lowered=(bnn.QuantConv2d, bnn.QuantLinear))
def _layer(p: IntegerProgram, node, args, m):
    return _Pending("layer", (m, p._value(args[0] if args else None, node)))


@construct("batchnorm", "batchnorm", modules=(nn.BatchNorm2d,), lowered=(SwitchableBatchNorm2d,))
def _batchnorm(p: IntegerProgram, node, args, m):
    x = args[0] if args else None
    if not (isinstance(x, _Pending) and x.kind == "layer" and x.bn is None):
        raise QNNError(f"BatchNorm '{node.name}' does not follow a conv: it cannot be folded (put each BatchNorm "
                       "right after its conv, before the activation)")
    x.bn = m
    return x


@construct("relu", "activation", modules=(nn.ReLU, nn.ReLU6), functions=(F.relu, torch.relu, F.relu6),
           lowered=(bnn.QuantReLU, bnn.QuantIdentity, ReLU6Quant))
def _quantizer(p: IntegerProgram, node, args, m):
    x = args[0] if args else None
    q = quantizers(m)[0]
    if q.kind == "input":
        if x != "input":
            raise QNNError(f"the input quantizer '{node.name}' must take the model's input")
        return p._push(QuantizeInput(Grid.of(q)))
    if isinstance(m, ReLU6Quant) and isinstance(x, _Pending):
        x.clamp_hi = 6.0
    return p._materialise(x, q, node)


@construct("elementwise", "elementwise", lowered=(QuantElementwise,))
def _elementwise(p: IntegerProgram, node, args, m):
    xi = p._value(args[0] if args else None, node)
    kind = QHardGate if m.name in ("hardsigmoid", "hardswish") else QLookup
    return p._push(kind(m.fn, m.name, m.kwargs, xi, p.grids[xi], Grid.of(quantizers(m.quant)[0])))


@construct("add", "add", functions=(operator.add, torch.add))
def _add(p: IntegerProgram, node, args, m):
    return _Pending("add", (p._value(args[0], node), p._value(args[1], node)))


@construct("mul", "mul", functions=(operator.mul, torch.mul))
def _mul(p: IntegerProgram, node, args, m):
    return _Pending("mul", (p._value(args[0], node), p._value(args[1], node)))


@construct("cat", "cat", functions=(torch.cat, torch.concat, torch.concatenate))
def _cat(p: IntegerProgram, node, args, m):
    if not args:
        raise QNNError(f"'{node.name}': pass the tensors to concatenate positionally")
    xs = tuple(p._value(v, node) for v in args[0])
    return p._push(Concat(xs, [p.grids[i] for i in xs], int(_arg(node, args, 1, "dim", 0)), node.name))


_GLOBAL_ONLY = ("only global average pooling (output size 1) has an integer kernel (use AvgPool2d with a fixed kernel "
                "for other sizes)")


@construct("global average pool", "avgpool", modules=(nn.AdaptiveAvgPool2d,), functions=(F.adaptive_avg_pool2d,))
def _global_pool(p: IntegerProgram, node, args, m):
    size = m.output_size if m is not None else _arg(node, args, 1, "output_size")
    if _pair(size) != (1, 1):
        raise QNNError(f"'{node.name}': {_GLOBAL_ONLY}")
    return _Pending("gap", (p._value(args[0] if args else None, node),))


@construct("spatial mean", "avgpool", functions=(torch.mean,), methods=("mean",))
def _mean(p: IntegerProgram, node, args, m):
    dims, keep = _arg(node, args, 1, "dim"), _arg(node, args, 2, "keepdim", False)
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if sorted(d % 4 for d in dims) != [2, 3] or node.kwargs.get("dtype") is not None:
        raise QNNError(f"'{node.name}': only a mean over the two spatial dims (the global average pool) has an "
                       "integer kernel")
    return _Pending("gap", (p._value(args[0], node),), flatten=not keep)


@construct("average pool", "avgpool", modules=(nn.AvgPool2d,), functions=(F.avg_pool2d,))
def _avg_pool(p: IntegerProgram, node, args, m):
    if m is not None:
        kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
                  count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)
    else:
        kw = dict(zip(("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                      args[1:]), **node.kwargs)
    if kw.get("divisor_override") is not None:
        raise QNNError(f"'{node.name}': average pooling with divisor_override has no integer kernel")
    return _Pending("avgpool", (p._value(args[0], node),), pool=dict(
        kernel=kw["kernel_size"], stride=kw.get("stride") or kw["kernel_size"], padding=kw.get("padding", 0),
        ceil_mode=kw.get("ceil_mode", False), count_include_pad=kw.get("count_include_pad", True)))


@construct("max pool", "move", modules=(nn.MaxPool2d,), functions=(F.max_pool2d,))
def _max_pool(p: IntegerProgram, node, args, m):
    if m is not None:
        return p._maxpool(args[0], node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    kw = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), args[1:]), **node.kwargs)
    return p._maxpool(args[0], node, kw["kernel_size"], kw.get("stride") or kw["kernel_size"], kw.get("padding", 0),
                      kw.get("dilation", 1), kw.get("ceil_mode", False))


@construct("identity", "move", modules=(nn.Dropout, nn.Identity), functions=(F.dropout,), methods=("contiguous",))
def _identity(p: IntegerProgram, node, args, m):
    return args[0] if args else None


@construct("flatten", "move", modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",))
def _flatten(p: IntegerProgram, node, args, m):
    if m is not None:
        return p._flatten(args[0], node, m.start_dim, m.end_dim)
    return p._flatten(args[0], node, _arg(node, args, 1, "start_dim", 0), _arg(node, args, 2, "end_dim", -1))


@construct("reshape", "move", functions=(torch.reshape,), methods=("view", "reshape"))
def _reshape(p: IntegerProgram, node, args, m):
    shape = args[1:] if node.target is not torch.reshape else args[1]
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    xi = p._value(args[0], node)
    if len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], Size) and shape[0].expr[0] == "dim" \
            and shape[0].reads_batch():
        return p._flatten(xi, node, 1, -1)
    return p._push(Reshape(xi, p.grids[xi], list(shape), node.name))


@construct("upsample", "move", modules=(nn.Upsample,), functions=(F.interpolate,))
def _upsample(p: IntegerProgram, node, args, m):
    if m is not None:
        return p._upsample(args[0], node, m.size, m.scale_factor, m.mode)
    kw = dict(zip(("size", "scale_factor", "mode"), args[1:]), **node.kwargs)
    if kw.get("align_corners") or kw.get("antialias"):
        raise QNNError(f"'{node.name}': only nearest upsampling (no align_corners, no antialias) has an integer form")
    return p._upsample(args[0], node, kw.get("size"), kw.get("scale_factor"), kw.get("mode", "nearest"))


@construct("zero padding", "move", functions=(F.pad,))
def _pad(p: IntegerProgram, node, args, m):
    pads = tuple(_arg(node, args, 1, "pad"))
    mode, value = _arg(node, args, 2, "mode", "constant"), _arg(node, args, 3, "value", 0.0)
    if mode != "constant" or value not in (0, 0.0, None):
        raise QNNError(f"'{node.name}': only zero padding has an integer form")
    xi = p._value(args[0], node)
    if len(pads) == 6 and not any(pads[:4]) and min(pads[4:]) >= 0:  # channels only: the option-A shortcut
        return p._push(ChannelEmbed(xi, p.grids[xi], (1, 1), int(pads[4]), int(pads[5])))
    return p._push(Move("pad", xi, p.grids[xi], pads=pads))


@construct("permute", "move", functions=(torch.permute,), methods=("permute",))
def _permute(p: IntegerProgram, node, args, m):
    perm = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else tuple(args[1:])
    if not perm or perm[0] != 0:
        raise QNNError(f"'{node.name}': a permutation that moves the batch dim has no integer form")
    xi = p._value(args[0], node)
    return p._push(Move("permute", xi, p.grids[xi], perm=perm))


@construct("transpose", "move", functions=(torch.transpose,), methods=("transpose",))
def _transpose(p: IntegerProgram, node, args, m):
    d0, d1 = args[1:3]
    if 0 in (d0, d1):
        raise QNNError(f"'{node.name}': a transpose of the batch dim has no integer form")
    xi = p._value(args[0], node)
    return p._push(Move("transpose", xi, p.grids[xi], dims=(int(d0), int(d1))))


@construct("split / chunk", "move", functions=(torch.split, torch.chunk), methods=("split", "chunk"))
def _split(p: IntegerProgram, node, args, m):
    how = "split" if node.target in (torch.split, "split") else "chunk"
    arg = args[1] if len(args) > 1 else node.kwargs.get("chunks" if how == "chunk" else "split_size_or_sections",
                                                         node.kwargs.get("split_size"))
    dim = _arg(node, args, 2, "dim", 0)
    if dim == 0 or dim <= -4:
        raise QNNError(f"'{node.name}': a {how} along the batch dim has no integer form: split a feature dim (given "
                       "as a dim of 1 or more)")
    return _Parts(p._value(args[0], node), how, arg, int(dim))


@construct("index", "move", functions=(operator.getitem,))
def _getitem(p: IntegerProgram, node, args, m):
    x = args[0]
    if isinstance(x, Shape):
        return x[args[1]]
    if isinstance(x, _Parts):
        return p._push(Part(x.x, p.grids[x.x], x.how, x.arg, x.dim, int(args[1])))
    if not isinstance(x, int):
        p._value(x, node)  # refused: a float value
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if not all(isinstance(i, slice) or i is Ellipsis for i in index):
        raise QNNError(f"'{node.name}': only slicing has an integer form")
    return p._push(Move("slice", x, p.grids[x], index=index))


@construct("size", "shape", functions=(getattr,), methods=("size",))
def _size(p: IntegerProgram, node, args, m):
    if node.target is getattr:
        if args[1] != "shape":
            raise QNNError(f"'{node.name}': of a tensor's attributes only .shape has an integer form")
        return Shape(p._value(args[0], node))
    dim = _arg(node, args, 1, "dim")
    shape = Shape(p._value(args[0], node))
    return shape if dim is None else shape[dim]


@construct("size arithmetic", "shape", functions=tuple(SIZE_ARITHMETIC - {operator.add, operator.mul}))
def _size_arithmetic(p: IntegerProgram, node, args, m):  # on sizes, IntegerProgram._function took it already
    raise QNNError(f"'{node.name}' ({getattr(node.target, '__name__', node.target)}) on tensors has no integer kernel: "
                   "only sizes are divided or subtracted")


def ort_kernels() -> tuple[set[str], set[str]]:
    """(the integer kernels, the data movement ops) that ONNX Runtime runs the emitted ops of every op as."""
    ops, todo = [], [Op]
    while todo:
        t = todo.pop()
        ops.append(t)
        todo.extend(t.__subclasses__())
    return {k for t in ops for k in t.integer_kernels}, {k for t in ops for k in t.moves}


def program_of(body: fx.GraphModule) -> IntegerProgram:
    """`IntegerProgram(body)`, built once and reused while nothing it was built from has changed: the same graph, the
    same switch position of every switchable module, and every parameter and buffer the same tensor (identity and
    storage) at the same in-place version (optimizer steps, `load_state_dict` and `.to()` all change one of these).
    An attack's forwards and a whole evaluation then lower the graph and fold the weights once, not per batch."""
    tensors = [*body.parameters(), *body.buffers()]
    # ids are compared, and the tensors themselves are kept in the cache, so an id cannot be reused while it lives
    key = (id(body.graph), body.code, tuple((m.w_bits, m.a_bits) for m in switchable_modules(body)),
           tuple((id(t), t._version, t.data_ptr()) for t in tensors))
    cached = body.__dict__.get("_integer_program")
    if cached is not None and cached[0] == key:
        return cached[2]
    program = IntegerProgram(body)
    body.__dict__["_integer_program"] = (key, tensors, program)
    return program


def integer_ready(body: nn.Module) -> bool:
    """Whether `body` runs quantized now (some quantizer below 32 bits)."""
    return any(q.bits != FLOAT_BITS for q in quantizers(body))

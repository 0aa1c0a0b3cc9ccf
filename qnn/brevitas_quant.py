"""Run-time switchable quantizers for Brevitas layers (`brevitas.nn.QuantConv2d`, `QuantLinear`, `QuantReLU`,
`QuantIdentity`, ...), passed as `weight_quant=` / `act_quant=`.

Each quantizer is a Brevitas injector whose whole `tensor_quant` is one module of ours, `SwitchableIntQuant`: one
learned LSQ log-scale per bit-width (all allocated up front), a switch that is an index change (no re-instantiation,
no `init_tensor_quant`, the path that broke shared scales in Brevitas issue #702), float mode at 32 bits, and the
fake quantization in a single autograd node (`qnn.layers.fake_quant`): Brevitas' stock composition (scaling, int
scaling, clamp, float-to-int modules) costs an elementwise pass and an autograd node each. It returns the tuple
Brevitas' proxies and export handlers expect: (value, scale, zero point, bit width).

The recipe is the toolkit's integer one: per-output-channel symmetric narrow-range weights (with `reduce_range`, the
8-bit ones on the 7-bit grid [-63, 63], so that ONNX Runtime's int8 kernels are exact on every CPU: x86 without
AVX-VNNI adds pairs of u8 x s8 products in a saturating int16, and 2 * 255 * 63 fits); unsigned activations
after ReLU / pooling; the shifted form (uint8 with zero point 2^(b-1)) for tensors that can be negative before a
residual add; a fixed 8-bit input quantizer. `qnn.layers.set_bit_width_` switches these like the toolkit's own
layers. Scales are initialised from the first tensor seen at a bit-width (MSE-optimal clipping), in training only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from brevitas.quant.scaled_int import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

from qnn.errors import QNNError
from qnn.layers import (BIT_CHOICES, FLOAT_BITS, SwitchableMixin, _forget_init, _known_init, _mark_init, bit_index,
                        fake_quant, mse_act_scale, mse_weight_scale)

KINDS = ("weight", "unsigned", "shifted", "input")


class SwitchableIntQuant(nn.Module, SwitchableMixin):
    """Brevitas `tensor_quant` with one learned scale per bit-width; see the module docstring.

    kind 'weight': signed narrow range [-(2^(b-1)-1), 2^(b-1)-1], one scale per output channel (`scale_shape`);
    'unsigned': [0, 2^b-1]; 'shifted': [-2^(b-1), 2^(b-1)-1] stored with zero point 2^(b-1); 'input': 8 bits
    asymmetric over `input_range`, fixed (not learned). `fixed_bits` pins a layer (e.g. first and last at 8 bits);
    `min_bits` is a floor (e.g. a wider residual stream); `reduce_range` (weights) puts 8-bit weights on the 7-bit grid.
    """

    def __init__(self, kind: str, scale_shape: tuple[int, ...] = (), fixed_bits: int | None = None,
                 input_range: tuple[float, float] | None = None, min_bits: int | None = None,
                 reduce_range: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise QNNError(f"unknown quantizer kind '{kind}'; choose from {', '.join(KINDS)}")
        for b in (fixed_bits, min_bits):
            if b is not None:
                bit_index(b)
        if reduce_range and kind != "weight":
            raise QNNError("reduce_range applies to weight quantizers only")
        self.kind, self.fixed_bits, self.min_bits, self.reduce_range = kind, fixed_bits, min_bits, reduce_range
        self.log_scale = nn.Parameter(torch.zeros(len(BIT_CHOICES), *scale_shape))
        self.register_buffer("initialized", torch.zeros(len(BIT_CHOICES), dtype=torch.bool))
        self.register_load_state_dict_pre_hook(_forget_init)
        if kind == "input":
            if input_range is None:
                raise QNNError("the input quantizer needs the input's (low, high) range")
            lo, hi = input_range
            s = (hi - lo) / 255.0
            self.log_scale.requires_grad_(False)
            self.log_scale.data.fill_(math.log(s))
            self.initialized.fill_(True)
            self.zp = float(round(-lo / s))

    @property
    def bits(self) -> int:
        """The bit-width this quantizer runs at now (32: float)."""
        b = self.w_bits if self.kind == "weight" else self.a_bits
        if b == FLOAT_BITS:
            return FLOAT_BITS
        if self.kind == "input":
            return 8
        b = self.fixed_bits or b
        return max(b, self.min_bits) if self.min_bits else b

    def grid_bits(self, bits: int) -> int:
        """The width of the integer grid at switch position `bits`: 7 for 8-bit weights with `reduce_range`."""
        return 7 if self.reduce_range and bits == 8 else bits

    def qrange(self, bits: int) -> tuple[float, float, float]:
        """(lo, hi, zero point) of the integer grid at `bits`, in the zero-point-removed domain."""
        if self.kind == "weight":
            g = self.grid_bits(bits)
            return float(-(2 ** (g - 1) - 1)), float(2 ** (g - 1) - 1), 0.0
        if self.kind == "unsigned":
            return 0.0, float(2**bits - 1), 0.0
        if self.kind == "shifted":
            return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1), float(2 ** (bits - 1))
        return -self.zp, 255.0 - self.zp, self.zp

    @torch.no_grad()
    def _init_scale(self, x: torch.Tensor, idx: int, bits: int) -> None:
        lo, hi, _ = self.qrange(bits)
        if self.kind == "weight":
            s = mse_weight_scale(x, hi).reshape(self.log_scale.shape[1:])
        else:
            s = mse_act_scale(x, lo, hi, self.kind == "unsigned").reshape(self.log_scale.shape[1:])
        self.log_scale.data[idx] = torch.log(s)
        _mark_init(self, "initialized", idx)

    def scale(self, bits: int | None = None) -> torch.Tensor:
        return self.log_scale[bit_index(self.bits if bits is None else bits)].exp()

    def forward(self, x: torch.Tensor):
        b = self.bits
        one = torch.ones((), device=x.device)
        if b == FLOAT_BITS:  # quantization off: the float tensor, described as a 32-bit grid of step 1
            return x, one, torch.zeros((), device=x.device), torch.tensor(float(FLOAT_BITS), device=x.device)
        idx = bit_index(b)
        if not _known_init(self, "initialized", idx):
            if not (self.training or self.kind == "weight"):
                raise QNNError(f"{self.kind} quantizer at {b} bits was never calibrated; train or calibrate first")
            self._init_scale(x, idx, b)
        lo, hi, zp = self.qrange(b)
        s = self.log_scale[idx].exp()
        shape = (-1,) + (1,) * (x.dim() - 1) if self.kind == "weight" else ()
        s_x = s.reshape(shape)
        if self.kind == "input" or not self.training:
            gf = 0.0 if self.kind == "input" else 1.0
        else:  # LSQ gradient scale: 1/sqrt(elements per scale x levels)
            gf = 1.0 / math.sqrt((x.numel() // max(s.numel(), 1)) * hi)
        y = fake_quant(x, s_x, lo, hi, gf)
        return y, s_x, torch.full_like(s_x, zp), torch.tensor(float(self.grid_bits(b)), device=x.device)


class _WeightTensorQuant(SwitchableIntQuant):
    def __init__(self, scaling_per_output_channel_shape, fixed_bits=None, reduce_range=False):
        super().__init__("weight", tuple(scaling_per_output_channel_shape)[:1], fixed_bits,
                         reduce_range=reduce_range)


class _UnsignedTensorQuant(SwitchableIntQuant):
    def __init__(self, fixed_bits=None, min_bits=None):
        super().__init__("unsigned", (), fixed_bits, min_bits=min_bits)


class _ShiftedTensorQuant(SwitchableIntQuant):
    def __init__(self, fixed_bits=None, min_bits=None):
        super().__init__("shifted", (), fixed_bits, min_bits=min_bits)


class _InputTensorQuant(SwitchableIntQuant):
    def __init__(self, input_range, fixed_bits=None):
        super().__init__("input", (), None, tuple(input_range))


class SwitchableWeightQuant(Int8WeightPerTensorFloat):
    """weight_quant=: per-output-channel symmetric narrow-range int weights, switchable bit-width (`.let(
    reduce_range=True)`: 8-bit weights on the 7-bit grid)."""

    scaling_per_output_channel = True
    tensor_quant = _WeightTensorQuant
    fixed_bits = None
    reduce_range = False


class SwitchableUnsignedActQuant(Uint8ActPerTensorFloat):
    """act_quant=: unsigned activations [0, 2^b-1] (after ReLU or pooling), switchable bit-width."""

    tensor_quant = _UnsignedTensorQuant
    fixed_bits = None
    min_bits = None


class SwitchableShiftedActQuant(Uint8ActPerTensorFloat):
    """act_quant=: values that can be negative, as uint8 with zero point 2^(b-1) (before a residual add)."""

    tensor_quant = _ShiftedTensorQuant
    fixed_bits = None
    min_bits = None


class FixedInputQuant(Uint8ActPerTensorFloat):
    """act_quant= of the model's input: 8 bits over `input_range` (set with `.let(input_range=(lo, hi))`), fixed;
    at 32 bits the input passes through."""

    tensor_quant = _InputTensorQuant
    fixed_bits = None


def with_fixed_bits(quant, bits: int):
    """The quantizer `quant` pinned to `bits` whatever the model's switch says (first and last layers)."""
    bit_index(bits)
    return quant.let(fixed_bits=bits)


def quantizers(model: nn.Module) -> list[SwitchableIntQuant]:
    return [m for m in model.modules() if isinstance(m, SwitchableIntQuant)]

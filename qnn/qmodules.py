"""The modules `qnn.quantize` puts in a converted model beyond Brevitas' own: the per-bit-width BatchNorm, the
activation quantizers (ReLU6 with its clamp) and the quantized elementwise functions.

They sit below both the converter (`qnn.quantization`), which places them, and the integer lowering
(`qnn.integer`), which recognises them, so that neither imports the other's module for them.
"""

from __future__ import annotations

import copy

import brevitas.nn as bnn
import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.brevitas_quant import SwitchableShiftedActQuant, SwitchableUnsignedActQuant
from qnn.errors import QNNError
from qnn.layers import BIT_CHOICES, SwitchableMixin, bit_index


class SwitchableBatchNorm2d(nn.Module, SwitchableMixin):
    """One BatchNorm2d per bit-width; the activation bit-width picks it (statistics shift most with it)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bns = nn.ModuleList(copy.deepcopy(bn) for _ in BIT_CHOICES)

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self.bns[bit_index(self.a_bits)]

    @torch.no_grad()
    def folded(self, conv_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma / sigma, the folded bias) of the current BatchNorm after a conv with bias `conv_bias`, from the
        running statistics: conv(x) * gamma / sigma + bias is this BatchNorm of the conv in eval mode."""
        bn = self.bn
        sigma = torch.sqrt(bn.running_var + bn.eps)
        inv = bn.weight / sigma if bn.weight is not None else 1.0 / sigma
        bias = (0.0 if conv_bias is None else conv_bias) - bn.running_mean
        bias = bias * inv + (0.0 if bn.bias is None else bn.bias)
        return inv.detach().float(), bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class ReLU6Quant(nn.Module):
    """ReLU6 as an explicit clamp then the unsigned quantizer: Brevitas' QuantReLU6 drops the clamp at 6 when a
    quantizer is present, which float mode would then lack."""

    def __init__(self, min_bits: int | None = None):
        super().__init__()
        self.quant = bnn.QuantIdentity(act_quant=_act_quant("unsigned", min_bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(F.relu6(x))


def _act_quant(kind: str, min_bits: int | None = None):
    quant = SwitchableUnsignedActQuant if kind == "unsigned" else SwitchableShiftedActQuant
    return quant.let(min_bits=min_bits) if min_bits else quant


def act_module(kind: str, min_bits: int | None = None, relu6: bool = False) -> nn.Module:
    """An activation quantizer module: 'unsigned' (also the ReLU; `relu6` clamps at 6 first) or 'shifted'.
    `min_bits` is a floor on its bit-width (the wide residual stream). Brevitas re-creates a quantizer from its
    injector on `load_state_dict`, so every setting lives in the injector, never on the instance."""
    if relu6:
        return ReLU6Quant(min_bits)
    if kind == "unsigned":
        return bnn.QuantReLU(act_quant=_act_quant(kind, min_bits), return_quant_tensor=False)
    return bnn.QuantIdentity(act_quant=_act_quant(kind, min_bits))


#: elementwise functions of one quantized tensor: name -> (function, whether its values are >= 0). On a grid of at
#: most 256 levels any of them is exactly a table of output integers (`qnn.integer.QLookup`)
ELEMENTWISE = {
    "hardswish": (F.hardswish, False), "hardsigmoid": (F.hardsigmoid, True), "silu": (F.silu, False),
    "sigmoid": (torch.sigmoid, True), "gelu": (F.gelu, False), "tanh": (torch.tanh, False),
    "leaky_relu": (F.leaky_relu, False), "elu": (F.elu, False),
}
class QuantElementwise(nn.Module):
    """An elementwise function of a quantized tensor, then its own activation quantizer (unsigned where the function
    is non-negative, else shifted). Training runs the real function (straight-through at the roundings); the
    integer program evaluates it as a table of the input grid's levels (`qnn.integer.QLookup`)."""

    def __init__(self, name: str, kwargs: dict | None = None):
        super().__init__()
        if name not in ELEMENTWISE:
            raise QNNError(f"unknown elementwise function '{name}'; known: {', '.join(ELEMENTWISE)}")
        self.name, self.kwargs = name, dict(kwargs or {})
        self.nonneg = ELEMENTWISE[name][1]
        self.quant = act_module("unsigned" if self.nonneg else "shifted")

    def fn(self, x: torch.Tensor) -> torch.Tensor:
        return ELEMENTWISE[self.name][0](x, **self.kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.fn(x))

    def extra_repr(self) -> str:
        return self.name + (f", {self.kwargs}" if self.kwargs else "")

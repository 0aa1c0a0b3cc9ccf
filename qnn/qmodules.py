"""The modules `qnn.quantize` puts in a converted model beyond Brevitas' own: the per-bit-width BatchNorm, the
activation quantizers (ReLU6 with its clamp) and the quantized elementwise functions.

They sit below both the converter (`qnn.quantization`), which places them, and the integer lowering
(`qnn.integer`), which recognises them, so that neither imports the other's module for them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import brevitas.nn as bnn
import numpy as np
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


@dataclass(frozen=True, kw_only=True)
class TorchForms:
    """The torch modules, functions and tensor methods (by name) that are one construct of a float model."""

    modules: tuple = ()
    functions: tuple = ()
    methods: tuple = ()


@dataclass(frozen=True)
class Elementwise(TorchForms):
    """An elementwise function of one quantized tensor, declared once: its float function, whether its values are
    >= 0 (its quantizer is then unsigned), the torch modules, functions and tensor methods that are it, the settings
    it reads (module attributes or the call's arguments after the input, in order) and its float ONNX form
    (`onnx(builder, x, settings)`, QONNX's compute between quantizers). On a grid of at most 256 levels any such
    function is exactly a table of output integers (`qnn.integer.QLookup`), so this entry is all a new one needs."""

    name: str
    fn: Callable
    nonneg: bool
    onnx: Callable
    settings: tuple[str, ...] = ()

    def settings_of(self, m: nn.Module | None = None, args: tuple = (), kwargs: dict | None = None) -> dict:
        """The settings of a module `m`, or of a call with `args` after the input and `kwargs`."""
        if m is not None:
            return {k: getattr(m, k) for k in self.settings}
        kw = {k: v for k, v in (kwargs or {}).items() if k in self.settings}
        for k, v in zip(self.settings, args):
            kw.setdefault(k, v)
        return kw


#: name -> its entry (`elementwise` adds one)
ELEMENTWISE: dict[str, Elementwise] = {}


def elementwise(name: str, fn: Callable, nonneg: bool, onnx: Callable, modules: tuple = (), functions: tuple = (),
                methods: tuple = (), settings: tuple[str, ...] = ()) -> Elementwise:
    """Register an elementwise function (see `Elementwise`): `qnn.quantize`, the integer program and every export
    format take it from here."""
    if name in ELEMENTWISE:
        raise ValueError(f"elementwise function '{name}' is registered twice")
    e = ELEMENTWISE[name] = Elementwise(name, fn, nonneg, onnx, tuple(settings), modules=tuple(modules),
                                        functions=tuple(functions), methods=tuple(methods))
    return e


def elementwise_of(op: str, target) -> Elementwise | None:
    """The registered function that a float graph node is: `op` 'call_module' with the module's type (exactly: a
    subclass may compute something else), 'call_function' with the function, 'call_method' with the method's name."""
    field = {"call_module": "modules", "call_function": "functions", "call_method": "methods"}.get(op)
    for e in ELEMENTWISE.values():
        try:
            if field and target in getattr(e, field):
                return e
        except TypeError:  # an unhashable or uncomparable target
            return None
    return None


def _c(b, v):  # a float constant of the ONNX graph
    return b.const(np.float32(v), "c")


def _gelu_onnx(b, x, kw):
    if kw.get("approximate", "none") == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        # x^3 as Pow: a node reading one tensor twice (x * x) loses an input to qonnx's tensor renaming
        x3 = b.node("Pow", [x, _c(b, 3.0)], "cube")
        inner = b.node("Mul", [b.node("Add", [x, b.node("Mul", [x3, _c(b, 0.044715)], "m")], "a"),
                               _c(b, np.sqrt(2 / np.pi))], "m")
        t = b.node("Add", [b.node("Tanh", [inner], "tanh"), _c(b, 1.0)], "a")
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        t = b.node("Add", [b.node("Erf", [b.node("Mul", [x, _c(b, 1 / np.sqrt(2))], "m")], "erf"), _c(b, 1.0)], "a")
    return b.node("Mul", [b.node("Mul", [x, t], "m"), _c(b, 0.5)], "gelu")


elementwise("hardswish", F.hardswish, False, lambda b, x, kw: b.node("HardSwish", [x], "hswish"),
            modules=(nn.Hardswish,), functions=(F.hardswish,))
elementwise("hardsigmoid", F.hardsigmoid, True,
            lambda b, x, kw: b.node("HardSigmoid", [x], "hsig", alpha=1 / 6, beta=0.5),
            modules=(nn.Hardsigmoid,), functions=(F.hardsigmoid,))
elementwise("silu", F.silu, False, lambda b, x, kw: b.node("Mul", [x, b.node("Sigmoid", [x], "sig")], "silu"),
            modules=(nn.SiLU,), functions=(F.silu,))
elementwise("sigmoid", torch.sigmoid, True, lambda b, x, kw: b.node("Sigmoid", [x], "sig"),
            modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid",))
elementwise("gelu", F.gelu, False, _gelu_onnx, modules=(nn.GELU,), functions=(F.gelu,), settings=("approximate",))
elementwise("tanh", torch.tanh, False, lambda b, x, kw: b.node("Tanh", [x], "tanh"),
            modules=(nn.Tanh,), functions=(torch.tanh, F.tanh), methods=("tanh",))
elementwise("leaky_relu", F.leaky_relu, False,
            lambda b, x, kw: b.node("LeakyRelu", [x], "lrelu", alpha=float(kw.get("negative_slope", 0.01))),
            modules=(nn.LeakyReLU,), functions=(F.leaky_relu,), settings=("negative_slope",))
elementwise("elu", F.elu, False, lambda b, x, kw: b.node("Elu", [x], "elu", alpha=float(kw.get("alpha", 1.0))),
            modules=(nn.ELU,), functions=(F.elu,), settings=("alpha",))
# Mish (CSPDarknet / YOLOv4-style edge backbones): x tanh(softplus(x)), ONNX's Mish from opset 18
elementwise("mish", F.mish, False, lambda b, x, kw: b.node("Mul", [x, b.node("Tanh", [b.node("Softplus", [x], "sp")],
                                                                              "tanh")], "mish"),
            modules=(nn.Mish,), functions=(F.mish,))


class QuantElementwise(nn.Module):
    """An elementwise function of a quantized tensor, then its own activation quantizer (unsigned where the function
    is non-negative, else shifted). Training runs the real function (straight-through at the roundings); the
    integer program evaluates it as a table of the input grid's levels (`qnn.integer.QLookup`)."""

    def __init__(self, name: str, kwargs: dict | None = None):
        super().__init__()
        if name not in ELEMENTWISE:
            raise QNNError(f"unknown elementwise function '{name}'; known: {', '.join(ELEMENTWISE)}")
        self.name, self.kwargs = name, dict(kwargs or {})
        self.nonneg = ELEMENTWISE[name].nonneg
        self.quant = act_module("unsigned" if self.nonneg else "shifted")

    def fn(self, x: torch.Tensor) -> torch.Tensor:
        return ELEMENTWISE[self.name].fn(x, **self.kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.fn(x))

    def extra_repr(self) -> str:
        return self.name + (f", {self.kwargs}" if self.kwargs else "")

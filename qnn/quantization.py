"""`qnn.quantize(model, cfg)`: a float PyTorch CNN in, a switchable-precision Brevitas model out.

Modelled on torchao's `quantize_` and timm's `convert_*_model`: the float model is traced with torch.fx and each
module is swapped for its quantized counterpart on Brevitas layers with the toolkit's switchable quantizers
(`qnn.brevitas_quant`), with the integer recipe's requantizers inserted where the integer graph needs them:

- the input: a fixed 8-bit quantizer over `cfg.input_range` (the normalised input's range);
- Conv2d (any groups / stride / padding / dilation / bias) -> QuantConv2d, Linear -> QuantLinear: per-channel
  narrow-range int weights; the first conv and the last linear at `cfg.first_last_bits`; with `cfg.reduce_range`
  (the default) 8-bit weights on the 7-bit grid [-63, 63], as ONNX Runtime's own `reduce_range`: the exported int8
  model is then exact on x86 without AVX-VNNI too (no saturating u8 x s8 pair) and fast everywhere;
- BatchNorm2d -> one BatchNorm per bit-width (the switch picks it; folded at export);
- ReLU / ReLU6 (modules or functions) -> the unsigned activation quantizer (ReLU6 keeps its clamp at 6);
- residual adds, average / adaptive-average pooling: kept; max pooling, flatten / reshape / view, zero padding,
  slicing, dropout and identity pass through on the integer grid;
- then every float result (conv, BatchNorm, linear, add, pool) that reaches anything but an activation quantizer
  gets a requantizer (unsigned where non-negative, else shifted: uint8 + zero point), so each op of the integer
  graph is a fused integer one; with `residual_bits`, tensors that reach a residual add or the pool run at >= it.

Anything else is refused with one line naming the module and its type. A model already built from Brevitas layers
with these quantizers is returned as it is.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import brevitas.nn as bnn
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from qnn.brevitas_quant import (FixedInputQuant, SwitchableIntQuant, SwitchableShiftedActQuant,
                                SwitchableUnsignedActQuant, SwitchableWeightQuant, with_fixed_bits)
from qnn.config import parse_bits
from qnn.errors import QNNError
from qnn.layers import BIT_CHOICES, SwitchableMixin, bit_index
from qnn.validate import check_float


@dataclass
class QuantizeConfig:
    bits: list[int] | str = "2,4,8,32"             # the bit-widths the model will switch between (32 = float)
    first_last_bits: int | None = 8                 # first conv and last linear pinned here (None: follow the switch)
    residual_bits: int | None = None                # residual adds at >= this many bits (None: the switch's)
    input_range: tuple[float, float] = (-2.5, 2.5)  # the (normalised) input's range, for the fixed 8-bit quantizer
    reduce_range: bool = True                       # 8-bit weights on the 7-bit grid: int8 ONNX exact on every CPU

    def __post_init__(self) -> None:
        self.bits = parse_bits(self.bits)
        for name in ("first_last_bits", "residual_bits"):
            v = getattr(self, name)
            if v is not None and v not in BIT_CHOICES[:-1]:
                raise QNNError(f"{name} must be one of 2..8 or unset, got {v!r}")
        lo, hi = (check_float("input_range", v) for v in self.input_range)
        if not lo < hi:
            raise QNNError(f"input_range must be (low, high) with low < high, got {self.input_range}")
        self.input_range = (lo, hi)


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


class _ReLU6Quant(nn.Module):
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
        return _ReLU6Quant(min_bits)
    if kind == "unsigned":
        return bnn.QuantReLU(act_quant=_act_quant(kind, min_bits), return_quant_tensor=False)
    return bnn.QuantIdentity(act_quant=_act_quant(kind, min_bits))


_PASS_MODULES = (nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_AVG_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS_FUNCTIONS = {torch.flatten, torch.reshape, getattr, operator.getitem, F.dropout, F.max_pool2d, F.pad}
_PASS_METHODS = {"view", "reshape", "flatten", "size", "contiguous", "squeeze", "unsqueeze"}
_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD_FUNCTIONS = {operator.add, torch.add}
_AVG_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d}


def is_quantized(model: nn.Module) -> bool:
    """Built from Brevitas layers with the toolkit's quantizers, no float conv or linear left."""
    mods = list(model.modules())
    has_float = any(type(m) in (nn.Conv2d, nn.Linear) for m in mods)
    return not has_float and any(isinstance(m, SwitchableIntQuant) for m in mods)


def quantize(model: nn.Module, cfg: QuantizeConfig | None = None) -> nn.Module:
    """The switchable Brevitas model of the float CNN `model` (which is left unchanged)."""
    cfg = cfg or QuantizeConfig()
    if is_quantized(model):
        return model
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as e:  # FX raises many types (TraceError, TypeError on control flow, ...)
        raise QNNError(f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]}); write data-dependent control flow as modules") from None
    _Converter(gm, cfg).run()
    gm.recompile()
    gm.quantize_config = cfg  # type: ignore[attr-defined]
    return gm


class _Converter:
    """Swaps modules, then legalises the graph for the integer recipe (`_legalise`) and, with `residual_bits`,
    widens the residual stream (`_widen`)."""

    def __init__(self, gm: fx.GraphModule, cfg: QuantizeConfig):
        self.gm, self.cfg, self.graph, self.n = gm, cfg, gm.graph, 0
        self.mods = dict(gm.named_modules())
        order = [n for n in self.graph.nodes if n.op == "call_module"]
        weighted = [n.target for n in order if isinstance(self.mods[n.target], (nn.Conv2d, nn.Linear))]
        self.first = weighted[0] if weighted else None
        self.last = weighted[-1] if weighted else None
        self.acts: dict[str, tuple[str, bool]] = {}  # activation quantizer module -> (kind, relu6)

    def _add(self, module: nn.Module, prefix: str) -> str:
        name = f"{prefix}_{self.n}"
        self.n += 1
        self.gm.add_submodule(name, module)
        return name

    def _act(self, kind: str, prefix: str, min_bits: int | None = None, relu6: bool = False) -> str:
        name = self._add(act_module(kind, min_bits, relu6), prefix)
        self.acts[name] = (kind, relu6)
        return name

    def _replace(self, node: fx.Node, module: nn.Module) -> None:
        parent, _, attr = node.target.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, attr, module)

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "placeholder":
                name = self._add(bnn.QuantIdentity(act_quant=FixedInputQuant.let(input_range=self.cfg.input_range)),
                                 "input_quant")
                with self.graph.inserting_after(node):
                    new = self.graph.call_module(name, (node,))
                node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            elif node.op == "call_module":
                self._module(node)
            elif node.op == "call_function":
                self._function(node)
            elif node.op == "call_method" and node.target not in _PASS_METHODS:
                raise QNNError(f"unsupported tensor method '.{node.target}()' in the traced model; supported: "
                               f"{', '.join(sorted(_PASS_METHODS))}")
        self._legalise()
        if self.cfg.residual_bits:
            self._widen(self.cfg.residual_bits)
        self.graph.eliminate_dead_code()
        self.graph.lint()

    def _fixed(self, target: str):
        pin = self.cfg.first_last_bits
        quant = SwitchableWeightQuant.let(reduce_range=self.cfg.reduce_range)
        return with_fixed_bits(quant, pin) if pin and target in (self.first, self.last) else quant

    def _module(self, node: fx.Node) -> None:
        m = self.mods[node.target]
        if type(m) is nn.Conv2d:
            q = bnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                                dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode,
                                bias=m.bias is not None, weight_quant=self._fixed(node.target),
                                return_quant_tensor=False)
            self._copy(m, q)
        elif type(m) is nn.Linear:
            q = bnn.QuantLinear(m.in_features, m.out_features, m.bias is not None,
                                weight_quant=self._fixed(node.target), return_quant_tensor=False)
            self._copy(m, q)
        elif type(m) is nn.BatchNorm2d:
            q = SwitchableBatchNorm2d(m)
        elif type(m) in (nn.ReLU, nn.ReLU6):
            q = act_module("unsigned", relu6=type(m) is nn.ReLU6)
            self.acts[node.target] = ("unsigned", type(m) is nn.ReLU6)
        elif isinstance(m, _PASS_MODULES + _AVG_POOLS) or isinstance(m, (SwitchableIntQuant, SwitchableMixin)) \
                or type(m).__module__.startswith("brevitas."):
            return
        else:
            raise QNNError(f"cannot quantize module '{node.target}' of type {type(m).__name__}; supported: Conv2d, "
                           f"Linear, BatchNorm2d, ReLU, ReLU6, pooling, Flatten, Dropout, Identity and residual adds")
        self._replace(node, q)

    @staticmethod
    def _copy(src: nn.Module, dst: nn.Module) -> None:
        with torch.no_grad():
            dst.weight.copy_(src.weight)
            if src.bias is not None:
                dst.bias.copy_(src.bias)

    def _function(self, node: fx.Node) -> None:
        f = node.target
        if f in _RELU_FUNCTIONS or f is F.relu6:
            name = self._act("unsigned", "relu", relu6=f is F.relu6)
            node.op, node.target, node.kwargs = "call_module", name, {}
            node.args = node.args[:1]
        elif f in _ADD_FUNCTIONS and all(isinstance(a, fx.Node) for a in node.args[:2]) and not node.kwargs:
            return
        elif f not in _PASS_FUNCTIONS and f not in _AVG_POOL_FUNCTIONS:
            raise QNNError(f"unsupported operation {getattr(f, '__name__', f)!r} in the traced model; supported: "
                           f"relu, residual add, pooling, flatten/reshape")

    # ---- node roles in the swapped graph
    def _module_of(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _is_act(self, node: fx.Node) -> bool:
        return node.op == "call_module" and node.target in self.acts

    def _is_weighted(self, node: fx.Node) -> bool:
        return isinstance(self._module_of(node), (bnn.QuantConv2d, bnn.QuantLinear))

    def _is_avg_pool(self, node: fx.Node) -> bool:
        return isinstance(self._module_of(node), _AVG_POOLS) or (node.op == "call_function"
                                                                  and node.target in _AVG_POOL_FUNCTIONS)

    def _is_add(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in _ADD_FUNCTIONS

    def _is_pass(self, node: fx.Node) -> bool:
        m = self._module_of(node)
        return isinstance(m, _PASS_MODULES) or (node.op == "call_function" and node.target in _PASS_FUNCTIONS) \
            or (node.op == "call_method" and node.target in _PASS_METHODS)

    def _produces_float(self, node: fx.Node) -> bool:
        """Compute whose result is a float (wide accumulator) value: it must meet a quantizer before anything else."""
        return self._is_weighted(node) or isinstance(self._module_of(node), SwitchableBatchNorm2d) \
            or self._is_add(node) or self._is_avg_pool(node)

    def _nonneg(self, node: fx.Node) -> bool:
        """Whether the value is known non-negative (the unsigned grid fits it)."""
        if self._is_act(node):
            return self.acts[node.target][0] == "unsigned"
        if (self._is_pass(node) or self._is_avg_pool(node)) and node.args and isinstance(node.args[0], fx.Node):
            return self._nonneg(node.args[0])
        return False

    def _legalise(self) -> None:
        """Every float value (conv, BatchNorm, linear, add, average pool) is consumed only by its BatchNorm, an
        activation quantizer or the graph's output; any other consumer (a conv, an add operand, a pool, flatten...)
        gets a requantizer in between: unsigned where the value is non-negative, else shifted. This is what makes
        every op of the integer graph a fused integer one (QLinearConv, QLinearAdd, ...)."""
        for node in list(self.graph.nodes):
            if not self._produces_float(node):
                continue
            needs = [u for u in node.users if not (self._is_act(u) or u.op == "output" or (
                isinstance(self._module_of(u), SwitchableBatchNorm2d) and self._is_weighted(node)))]
            if needs:
                kind = "unsigned" if self._nonneg(node) else "shifted"
                name = self._act(kind, "requant")
                with self.graph.inserting_after(node):
                    q = self.graph.call_module(name, (node,))
                for u in needs:
                    u.replace_input_with(node, q)

    def _reach(self, node: fx.Node, chain: tuple = ()) -> list[tuple[fx.Node, tuple]]:
        """(consumer, pass nodes on the way) for every non-pass consumer of `node`'s value."""
        out = []
        for u in node.users:
            if self._is_pass(u):
                out += self._reach(u, chain + (u,))
            else:
                out.append((u, chain))
        return out

    def _widen(self, bits: int) -> None:
        """The wide residual stream: every activation quantizer whose value reaches a residual add or the pool, and
        the pool's requantizer, run at >= `bits`; where the same value also feeds a conv or linear, a twin quantizer of the same float value at
        the switch's bit-width feeds those (in the integer graph the producing op runs once per output grid)."""
        for node in list(self.graph.nodes):
            if not self._is_act(node):
                continue
            reach = self._reach(node)
            pooled = self._is_avg_pool(node.args[0])  # the pooled features stay wide too
            if not (pooled or any(self._is_add(u) or self._is_avg_pool(u) for u, _ in reach)):
                continue
            kind, relu6 = self.acts[node.target]
            self._replace(node, act_module(kind, bits, relu6))
            convs = [(u, chain) for u, chain in reach if self._is_weighted(u)]
            if pooled or not convs:  # the pooled features feed the (8-bit) classifier wide
                continue
            twin = self.graph.call_module(self._act(kind, "narrow", relu6=relu6), node.args)
            node.append(twin)
            for u, chain in convs:
                src, prev = twin, node
                for p in chain:  # the pass ops (max pool, flatten...) run again on the twin's grid
                    new = self.graph.node_copy(p, lambda a, prev=prev, src=src: src if a is prev else a)
                    src.append(new)
                    src, prev = new, p
                u.replace_input_with(prev, src)

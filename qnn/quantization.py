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
import warnings
from dataclasses import dataclass

import brevitas.nn as bnn
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from qnn.brevitas_import import brevitas_layers, copy_learned_scales_, to_float
from qnn.brevitas_quant import FixedInputQuant, SwitchableIntQuant, SwitchableWeightQuant, with_fixed_bits
from qnn.errors import QNNError
from qnn.integer import HINTS, SIZE_ARITHMETIC, IntegerProgram, float_construct, supported
from qnn.layers import SwitchableMixin, check_bits, check_pinned_bits, precision
from qnn.qmodules import QuantElementwise, SwitchableBatchNorm2d, act_module
from qnn.options import check_options, option
from qnn.validate import check_float


def _input_range(name: str, v) -> tuple[float, float]:
    try:
        lo, hi = (check_float(name, x) for x in v)
    except (TypeError, ValueError):
        raise QNNError(f"{name} must be (low, high), got {v!r}") from None
    if not lo < hi:
        raise QNNError(f"{name} must be (low, high) with low < high, got {v!r}")
    return lo, hi


@dataclass
class QuantizeConfig:
    """How `qnn.quantize` converts a float model (`TrainConfig` carries the same settings for `qnn train`)."""

    bits: list[int] | str = option("2,4,8,32", "the bit-widths the model switches between (32 = float)",
                                   check=check_bits)
    first_last_bits: int | None = option(8, "first conv and last linear pinned at this many bits, 2..8 (None: follow "
                                         "the switch)", lo=2, hi=8, check=check_pinned_bits)
    residual_bits: int | None = option(None, "residual adds at >= this many bits, 2..8 (None: the switch's)", lo=2,
                                       hi=8, check=check_pinned_bits)
    input_range: tuple[float, float] = option((-2.5, 2.5), "the normalised input's (low, high), for the fixed 8-bit "
                                              "input quantizer", check=_input_range)
    reduce_range: bool = option(True, "8-bit weights on the 7-bit grid: the int8 ONNX is exact on every CPU")

    def __post_init__(self) -> None:
        check_options(self)


def quantize(model: nn.Module, cfg: QuantizeConfig | None = None) -> nn.Module:
    """The switchable Brevitas model of the float CNN `model` (which is left unchanged)."""
    cfg = cfg or QuantizeConfig()
    if isinstance(model, fx.GraphModule) and hasattr(model, "quantize_config"):
        return model  # made by quantize already
    report = None
    if brevitas_layers(model):  # a model on Brevitas layers: its float form, then the scales it learned
        model, report = to_float(model)
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as e:  # FX raises many types (TraceError, TypeError on control flow, ...)
        raise QNNError(f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]}); write data-dependent control flow as modules") from None
    _Converter(gm, cfg).run()
    gm.recompile()
    gm.quantize_config = cfg  # type: ignore[attr-defined]
    if report is not None:
        copy_learned_scales_(gm, report)
        for note in report.notes:
            warnings.warn(f"Brevitas model: {note}", stacklevel=2)
    check_integer_form(gm, cfg)
    return gm


def check_integer_form(gm: fx.GraphModule, cfg: QuantizeConfig) -> None:
    """Lower the converted model to its integer program once, now, with the quantizers as initialised: every construct
    the export could not take is refused before the first training step, all of them in one message."""
    quantized = [b for b in cfg.bits if b != 32]
    if not quantized:
        return
    with precision(gm, min(quantized)):
        IntegerProgram(gm)


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
        errors = []
        for node in list(self.graph.nodes):
            try:
                self._convert(node)
            except QNNError as e:
                errors.append(str(e))
        if len(errors) > 1:
            raise QNNError(f"{len(errors)} parts of the model cannot be quantized: " + "; ".join(errors))
        if errors:
            raise QNNError(errors[0])
        self._legalise()
        self._share_concat_grids()
        if self.cfg.residual_bits:
            self._widen(self.cfg.residual_bits)
        self.graph.eliminate_dead_code()
        self.graph.lint()
        self.gm.delete_all_unused_submodules()

    def _convert(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            name = self._add(bnn.QuantIdentity(act_quant=FixedInputQuant.let(input_range=self.cfg.input_range)),
                             "input_quant")
            with self.graph.inserting_after(node):
                new = self.graph.call_module(name, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        elif node.op == "call_module":
            self._module(node)
        elif node.op in ("call_function", "call_method"):
            self._function(node)

    def _fixed(self, target: str):
        pin = self.cfg.first_last_bits
        quant = SwitchableWeightQuant.let(reduce_range=self.cfg.reduce_range)
        return with_fixed_bits(quant, pin) if pin and target in (self.first, self.last) else quant

    def _module(self, node: fx.Node) -> None:
        m = self.mods[node.target]
        if isinstance(m, (SwitchableIntQuant, SwitchableMixin)) or type(m).__module__.startswith("brevitas."):
            return  # quantized already
        c, e = float_construct(node, m)
        if c is None:
            raise QNNError(f"cannot quantize module '{node.target}' of type {type(m).__name__}"
                           f"{HINTS.get(type(m).__name__, '')}; supported: {', '.join(supported('modules'))}")
        if c.role == "layer" and isinstance(m, nn.Conv2d):
            q = bnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                                dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode,
                                bias=m.bias is not None, weight_quant=self._fixed(node.target),
                                return_quant_tensor=False)
            self._copy(m, q)
        elif c.role == "layer":
            q = bnn.QuantLinear(m.in_features, m.out_features, m.bias is not None,
                                weight_quant=self._fixed(node.target), return_quant_tensor=False)
            self._copy(m, q)
        elif c.role == "batchnorm":
            q = SwitchableBatchNorm2d(m)
        elif c.role == "activation":
            q = act_module("unsigned", relu6=type(m) is nn.ReLU6)
            self.acts[node.target] = ("unsigned", type(m) is nn.ReLU6)
        elif c.role == "elementwise":
            q = QuantElementwise(e.name, e.settings_of(m))
        else:
            return  # kept as it is: lowered as the module
        self._replace(node, q)

    @staticmethod
    def _copy(src: nn.Module, dst: nn.Module) -> None:
        with torch.no_grad():
            dst.weight.copy_(src.weight)
            if src.bias is not None:
                dst.bias.copy_(src.bias)

    def _function(self, node: fx.Node) -> None:
        """A function or tensor method: elementwise ones and ReLU become modules; the rest stay, once checked."""
        c, e = float_construct(node)
        if c is None or (c.role == "shape" and not self._is_shape_value(node)):
            what = f"tensor method '.{node.target}()'" if node.op == "call_method" else \
                f"operation {getattr(node.target, '__name__', node.target)!r}"
            raise QNNError(f"unsupported {what} in the traced model; supported: {', '.join(supported('functions'))}")
        if c.role == "elementwise":
            mod = self._add(QuantElementwise(e.name, e.settings_of(args=node.args[1:], kwargs=node.kwargs)), e.name)
            node.op, node.target, node.kwargs = "call_module", mod, {}
            node.args = node.args[:1]
        elif c.role == "activation":
            name = self._act("unsigned", "relu", relu6=node.target is F.relu6)
            node.op, node.target, node.kwargs = "call_module", name, {}
            node.args = node.args[:1]
        elif c.role in ("add", "mul") and not (all(isinstance(a, fx.Node) for a in node.args[:2]) and not node.kwargs) \
                and not self._is_shape_value(node):
            raise QNNError(f"'{node.name}': only an add or a product of two tensors the model computes has an integer "
                           f"form (not {getattr(node.target, '__name__', node.target)} with a constant or keywords)")
        elif c.role == "cat":
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            if not (isinstance(parts, (list, tuple)) and parts and all(isinstance(a, fx.Node) for a in parts)):
                raise QNNError(f"'{node.name}': concatenate a list of tensors computed by the model")

    # ---- node roles in the swapped graph
    def _is_shape_value(self, node: fx.Node) -> bool:
        """A size read off a tensor (x.size(), x.shape and their items) or integer arithmetic on sizes."""
        if node.op == "call_method" and node.target == "size":
            return True
        if node.op == "call_function" and node.target is getattr:
            return node.args[1] == "shape"
        if node.op == "call_function" and node.target in (operator.getitem, *SIZE_ARITHMETIC):
            nodes = [a for a in node.args if isinstance(a, fx.Node)]
            return bool(nodes) and all(self._is_shape_value(a) for a in nodes)
        return False

    def _module_of(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _is_act(self, node: fx.Node) -> bool:
        return node.op == "call_module" and node.target in self.acts

    def _is_weighted(self, node: fx.Node) -> bool:
        return isinstance(self._module_of(node), (bnn.QuantConv2d, bnn.QuantLinear))

    def _construct(self, node: fx.Node):
        """The registered construct of a node of the swapped graph that the conversion kept as it was, or None."""
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        return float_construct(node, self._module_of(node))[0]

    def _role(self, node: fx.Node) -> str | None:
        """Its role (`qnn.integer.ROLES`)."""
        c = self._construct(node)
        return c.role if c is not None else None

    def _is_avg_pool(self, node: fx.Node) -> bool:
        return self._role(node) == "avgpool"

    def _is_add(self, node: fx.Node) -> bool:
        return node.op == "call_function" and self._role(node) == "add"

    def _is_mul(self, node: fx.Node) -> bool:
        return node.op == "call_function" and self._role(node) == "mul"

    def _is_pass(self, node: fx.Node) -> bool:
        """Data movement, and reading a tensor's size (its value flows on to the reshape that uses it)."""
        c = self._construct(node)
        return c is not None and (c.role == "move" or c.name == "size")

    def _produces_float(self, node: fx.Node) -> bool:
        """Compute whose result is a float (wide accumulator) value: it must meet a quantizer before anything else."""
        return self._is_weighted(node) or isinstance(self._module_of(node), SwitchableBatchNorm2d) \
            or ((self._is_add(node) or self._is_mul(node)) and not self._is_shape_value(node)) or self._is_avg_pool(node)

    def _nonneg(self, node: fx.Node) -> bool:
        """Whether the value is known non-negative (the unsigned grid fits it)."""
        if self._is_act(node):
            return self.acts[node.target][0] == "unsigned"
        if isinstance(self._module_of(node), QuantElementwise):
            return self._module_of(node).nonneg
        if self._is_mul(node):
            return all(isinstance(a, fx.Node) and self._nonneg(a) for a in node.args[:2])
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

    def _is_cat(self, node: fx.Node) -> bool:
        return self._role(node) == "cat"

    def _grid_holders(self, node: fx.Node) -> list:
        """The quantizers that set the grid of `node`'s value: an activation quantizer node, an elementwise module
        (its output quantizer), or, through data movement and nested concatenations, those of their inputs."""
        if self._is_act(node):
            return [node]
        m = self._module_of(node)
        if isinstance(m, QuantElementwise):
            return [m]
        if self._is_cat(node):
            return [h for a in (node.args[0] if node.args else node.kwargs["tensors"]) for h in self._grid_holders(a)]
        if self._is_pass(node) and node.args and isinstance(node.args[0], fx.Node):
            return self._grid_holders(node.args[0])
        raise QNNError(f"'{node.name}' feeds a concatenation but has no activation quantizer of its own: end each "
                       "concatenated branch with an activation (ReLU, a quantizer, an elementwise function)")

    def _share_concat_grids(self) -> None:
        """Every tensor a concatenation joins is quantized by one shared quantizer: the concatenation then moves
        integers (one grid), as ONNX's Concat of uint8 tensors does. Unsigned when every branch is non-negative."""
        groups: list[list] = []
        for node in self.graph.nodes:
            if self._is_cat(node):
                hs = self._grid_holders(node)
                merged = [g for g in groups if any(h in g for h in hs)]
                group = list(dict.fromkeys(hs + [h for g in merged for h in g]))
                groups = [g for g in groups if g not in merged] + [group]
        for group in groups:
            kinds = [("unsigned" if h.nonneg else "shifted", False) if isinstance(h, QuantElementwise)
                     else self.acts[h.target] for h in group]
            relu6 = {r for _, r in kinds}
            if len(relu6) > 1:
                raise QNNError("a concatenation joins ReLU6 and other activations: one grid needs one clamp; use the "
                               "same activation on every branch")
            kind = "unsigned" if all(k == "unsigned" for k, _ in kinds) else "shifted"
            name = self._act(kind, "concat_quant", relu6=relu6.pop())
            for h in group:
                if isinstance(h, QuantElementwise):
                    h.quant = self.gm.get_submodule(name)
                    h.nonneg = kind == "unsigned"
                else:
                    h.target = name

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

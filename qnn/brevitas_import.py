"""Models written on stock Brevitas layers and quantizers, as Brevitas' own examples write them, brought into the
toolkit: `qnn.quantize` turns one into a switchable model whose scales at the model's own bit-width start from the
ones it learned, so QADT-R (or plain QAT) can fine-tune it and every command can evaluate, attack and deploy it.

How: each stock layer becomes its float layer with the same weights (`QuantConv2d` -> `Conv2d`, `QuantLinear` ->
`Linear`, `QuantReLU` -> `ReLU`, `QuantIdentity` -> `Identity`), the float model goes through the toolkit's own
conversion (which places the integer recipe's quantizers), then each learned scale is copied into the quantizer at
the same place and bit-width. What the integer recipe cannot take is refused, every layer at once, naming the
quantizer and why; what is changed to fit the recipe is said (`ImportReport.notes`), never silent.

What carries over exactly: weight scales of signed narrow-range weight quantizers with a zero zero point, per tensor
(`Int8WeightPerTensorFloat`) or per output channel (`Int8WeightPerChannelFloat`), at any bit-width 2-8; activation
scales of unsigned quantizers after a ReLU (`Uint8ActPerTensorFloat`). What the toolkit sets itself: the input
quantizer (fixed 8-bit over the normalised input's range: a leading `QuantIdentity` is replaced by it), quantizers
the recipe adds where Brevitas' model had none, and a signed activation quantizer after a ReLU (its half-empty grid
is not the recipe's unsigned one): those are calibrated on the first batch, as for a float model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from qnn.errors import QNNError

_WEIGHTED = ("QuantConv2d", "QuantLinear")
_ACTS = ("QuantReLU", "QuantIdentity")


@dataclass
class Learned:
    """Scales a layer learned, {bit-width: scale}: `kind` 'weight' (one per output channel), 'unsigned' or 'shifted'
    (an activation, one per tensor). A stock quantizer has one bit-width; a toolkit one each it was trained at."""

    kind: str
    scales: dict[int, torch.Tensor]

    @property
    def bits(self) -> int:
        return next(iter(self.scales))


@dataclass
class ImportReport:
    own_bits: int
    learned: dict[str, Learned] = field(default_factory=dict)  # module name in the float model -> its scale
    notes: list[str] = field(default_factory=list)


def brevitas_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Brevitas layers (`brevitas.nn.Quant*`), with Brevitas' quantizers or the toolkit's."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__module__.startswith("brevitas.nn") and type(m).__name__.startswith("Quant")]


def _toolkit_quant(m: nn.Module):
    from qnn.brevitas_quant import SwitchableIntQuant

    found = [q for q in m.modules() if isinstance(q, SwitchableIntQuant)]
    return found[0] if len(found) == 1 else None


def _toolkit(m: nn.Module) -> Learned | None:
    """The scales of a layer on the toolkit's own switchable quantizer: every bit-width it was initialised at."""
    from qnn.layers import BIT_CHOICES

    q = _toolkit_quant(m)
    if q is None or q.kind == "input":
        return None
    with torch.no_grad():
        scales = {b: q.log_scale[i].exp().flatten().clone() if q.kind == "weight" else q.log_scale[i].exp().reshape(())
                  for i, b in enumerate(BIT_CHOICES) if bool(q.initialized[i])}
    return Learned(q.kind, scales) if scales else None


def _injector_name(proxy) -> str:
    """The quantizer a Brevitas proxy was made from (`Int8WeightPerTensorFloat`, ...), for messages."""
    inj = proxy.quant_injector
    return inj.__name__ if isinstance(inj, type) else type(inj).__name__


def _bits(proxy) -> int:
    b = float(proxy.bit_width())
    if b != int(b) or not 2 <= b <= 8:
        raise ValueError(f"a bit-width of {b:g} (the integer recipe takes 2-8)")
    return int(b)


def _weight(name: str, m: nn.Module) -> Learned | None:
    wq = m.weight_quant
    if not wq.is_quant_enabled:
        return None  # a float weight: the toolkit quantizes it like a float model's
    what = _injector_name(wq)
    try:
        bits = _bits(wq)
    except ValueError as e:
        raise QNNError(f"'{name}' ({what}): {e}") from None
    if not wq.is_signed or not wq.is_narrow_range:
        raise QNNError(f"'{name}' ({what}): weights on a {'unsigned' if not wq.is_signed else 'full signed'} grid; the "
                       f"integer recipe takes signed narrow-range weights (narrow_range=True, as "
                       f"Int8WeightPerTensorFloat / Int8WeightPerChannelFloat)")
    with torch.no_grad():
        qw = m.quant_weight()
        zp = qw.zero_point
        if zp is not None and bool((torch.as_tensor(zp) != 0).any()):
            raise QNNError(f"'{name}' ({what}): weights with a zero point; the integer recipe takes symmetric ones")
        s = torch.as_tensor(qw.scale).detach().float().flatten()
    out_ch = m.weight.shape[0]
    if s.numel() not in (1, out_ch) or not bool(torch.isfinite(s).all() & (s > 0).all()):
        raise QNNError(f"'{name}' ({what}): a scale of shape {tuple(qw.scale.shape)}; the integer recipe takes one per "
                       f"tensor or one per output channel, finite and positive")
    return Learned("weight", {bits: s.expand(out_ch).clone()})


def _act(name: str, m: nn.Module, report: ImportReport) -> Learned | None:
    aq = m.act_quant
    if not aq.is_quant_enabled:
        return None
    what = _injector_name(aq)
    try:
        bits = _bits(aq)
    except ValueError as e:
        raise QNNError(f"'{name}' ({what}): {e}") from None
    if type(m).__name__ == "QuantIdentity":
        report.notes.append(f"'{name}' ({what}, {bits}-bit): the integer recipe places its own quantizers (a fixed "
                            f"8-bit one on the input); this one's scale is not used")
        return None
    if aq.is_signed:
        report.notes.append(f"'{name}' ({what}): a signed quantizer after a ReLU uses half its grid; the recipe's "
                            f"unsigned {bits}-bit quantizer there is calibrated afresh")
        return None
    with torch.no_grad():
        s = torch.as_tensor(aq.scale()).detach().float()
        zp = aq.zero_point()
    if s.numel() != 1 or not bool(torch.isfinite(s).all() & (s > 0).all()) or bool((torch.as_tensor(zp) != 0).any()):
        raise QNNError(f"'{name}' ({what}): the integer recipe takes one positive scale per activation tensor and a "
                       f"zero zero point, got scale shape {tuple(s.shape)}")
    return Learned("unsigned", {bits: s.reshape(())})


def to_float(model: nn.Module) -> tuple[nn.Module, ImportReport]:
    """(the float model: every stock Brevitas layer replaced by its float layer with the same weights, the report:
    the model's own bit-width and the scales it learned). Every layer that cannot come in is named in one message."""
    import brevitas.nn as bnn

    layers = brevitas_layers(model)
    learned: dict[str, Learned] = {}
    report = ImportReport(own_bits=0)
    errors = []
    for name, m in layers:
        kind = type(m).__name__
        if _toolkit_quant(m) is not None and kind in _WEIGHTED + _ACTS:
            got = _toolkit(m)
            if got is not None:
                learned[name] = got
            continue
        if kind not in _WEIGHTED + _ACTS:
            errors.append(f"'{name}' ({kind}): no integer form here; stock layers that come in: "
                          f"{', '.join(_WEIGHTED + _ACTS)} (others as their float layer, quantized by the toolkit)")
            continue
        try:
            if kind in _WEIGHTED:
                for proxy in ("input_quant", "output_quant"):
                    if getattr(m, proxy).is_quant_enabled:
                        raise QNNError(f"'{name}' ({kind}): an {proxy} on the layer itself; put a QuantIdentity or "
                                       f"QuantReLU there instead")
                got = _weight(name, m)
            else:
                got = _act(name, m, report)
        except QNNError as e:
            errors.append(str(e))
            continue
        if got is not None:
            learned[name] = got
    if errors:
        raise QNNError(f"{len(errors)} Brevitas layer(s) cannot come in: " + "; ".join(errors) if len(errors) > 1
                       else errors[0])
    stock = {n: v for n, v in learned.items() if len(v.scales) == 1 and _toolkit_quant(model.get_submodule(n)) is None}
    weights = [(n, v.bits) for n, v in stock.items() if v.kind == "weight"]
    body = {b for _, b in weights[1:-1]} | {v.bits for v in stock.values() if v.kind == "unsigned"}
    if len(body) > 1:  # a switchable model runs one bit-width a step (first and last layers aside)
        raise QNNError(f"the layers between the first and the last are at {sorted(body)} bits; a switchable model "
                       f"runs one bit-width at a time (the first and last layers may differ)")
    report.own_bits = body.pop() if body else (weights[0][1] if weights else 8)
    report.learned = learned

    fm = copy.deepcopy(model)
    for name, m in brevitas_layers(fm):
        if isinstance(m, bnn.QuantConv2d):
            f = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                          dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
        elif isinstance(m, bnn.QuantLinear):
            f = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, bnn.QuantReLU):
            f = nn.ReLU()
        else:
            f = nn.Identity()
        if hasattr(f, "weight"):
            with torch.no_grad():
                f.weight.copy_(m.weight)
                if m.bias is not None:
                    f.bias.copy_(m.bias)
        parent, _, attr = name.rpartition(".")
        setattr(fm.get_submodule(parent) if parent else fm, attr, f)
    return fm, report


def copy_learned_scales_(gm: nn.Module, report: ImportReport) -> None:
    """Start the converted model's quantizers at the stock model's own bit-width from the scales it learned: the
    weight quantizer of each weighted layer and the activation quantizer that replaced each QuantReLU, where the
    converted model runs that quantizer at the same bit-width on the same grid; the rest are said in the notes."""
    from qnn.brevitas_quant import SwitchableIntQuant
    from qnn.layers import _mark_init, bit_index

    mods = dict(gm.named_modules())
    for name, lr in report.learned.items():
        m = mods.get(name)
        quants = [q for q in (m.modules() if m is not None else ()) if isinstance(q, SwitchableIntQuant)
                  and q.kind == lr.kind]
        if len(quants) != 1:
            report.notes.append(f"'{name}': no {lr.kind} quantizer at that place after conversion; its learned scale "
                                f"is not used")
            continue
        q = quants[0]
        for bits, scale in lr.scales.items():
            runs_at = q.fixed_bits or bits
            if runs_at != bits:
                report.notes.append(f"'{name}': learned at {bits} bits, pinned at {runs_at} here "
                                    f"(--first-last-bits); calibrated afresh")
                continue
            if q.kind == "weight" and len(lr.scales) == 1 and q.grid_bits(bits) != bits:
                # reduce_range: a stock quantizer's 8-bit weights onto the 7-bit grid, over the same range
                scale = scale * (2 ** (bits - 1) - 1) / (2 ** (q.grid_bits(bits) - 1) - 1)
                report.notes.append(f"'{name}': 8-bit weights moved to the 7-bit grid [-63, 63] (reduce_range: exact "
                                    f"on every CPU's int8 kernels) over the same range; --no-reduce-range keeps "
                                    f"Brevitas' grid")
            idx = bit_index(bits)
            with torch.no_grad():
                q.log_scale.data[idx] = scale.reshape(q.log_scale.shape[1:]).log()
            _mark_init(q, "initialized", idx)

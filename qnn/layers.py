"""Bit-width switching and the fake-quant primitive shared by the switchable quantizers (`qnn.brevitas_quant`).

The bit-widths a layer can run at (`BIT_CHOICES`; `parse_bits` reads a set of them as users write it). One set of
float weights; every quantizer holds one scale per bit-width and every BatchNorm one copy per bit-width, all
allocated up front, so `set_bit_width_` only changes an index (no re-allocation). `fake_quant` is the single
autograd node (round, clamp, straight-through and LSQ gradients) inside each quantizer; the MSE-optimal clipping
functions initialise a bit-width's scale from the first tensor it sees.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn

from qnn.errors import QNNError

#: bit-widths a layer can run at; 32 means quantization off (float).
BIT_CHOICES: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 32)
FLOAT_BITS = 32


def bit_index(bits: int) -> int:
    if bits not in BIT_CHOICES:
        raise QNNError(f"bit-width {bits} is not allowed; choose from {list(BIT_CHOICES)}")
    return BIT_CHOICES.index(bits)


def check_pinned_bits(name: str, v: int | None) -> None:
    """A layer group held at a fixed integer bit-width (the first and last layers, the residual stream): 2..8 or
    None (follow the switch). 32 has no integer graph, so it is refused here rather than at export."""
    if v is not None and (isinstance(v, bool) or v not in BIT_CHOICES[:-1]):
        raise QNNError(f"{name} must be one of 2..8 or unset, got {v!r}")


def check_bits(name: str, v: Any) -> list[int]:
    """`parse_bits(v)` for the setting `name`, whose name its one-line error carries."""
    try:
        return parse_bits(v)
    except QNNError as e:
        raise QNNError(f"{name}: {e}") from None


def parse_bits(v: Any) -> list[int]:
    """'2,4,8,32' or [2, 4] -> [2, 4, 8, 32]; every entry must be in {2..8, 32}."""
    if isinstance(v, int):
        v = [v]
    if isinstance(v, str):
        v = [p for p in v.replace(" ", "").split(",") if p]
    try:
        if any(isinstance(b, (bool, float)) for b in v):
            raise ValueError
        bits = [int(b) for b in v]
    except (TypeError, ValueError):
        raise QNNError(f"bit-widths must be integers, got {v!r}") from None
    if not bits:
        raise QNNError("bit-width set is empty; give at least one of 2..8 or 32")
    bad = [b for b in bits if b not in BIT_CHOICES]
    if bad:
        raise QNNError(f"bit-width(s) {bad} not allowed; choose from 2..8 or 32")
    dup = sorted({b for b in bits if bits.count(b) > 1})
    if dup:
        raise QNNError(f"bit-width(s) {dup} given more than once in {bits}; list each once")
    return bits


class _FakeQuant(torch.autograd.Function):
    """Uniform fake quantization with a learned scale (LSQ, Esser et al. 2020) in one autograd node.

    Forward: clamp(round(x / s), lo, hi) * s.  Backward: straight-through inside the range, LSQ scale gradient.
    Keeping it one node keeps the elementwise overhead of QAT low (only x/s is saved).
    """

    @staticmethod
    def forward(ctx, x, scale, lo: float, hi: float, grad_factor: float):  # type: ignore[override]
        xs = x / scale
        q = torch.clamp(torch.round(xs), lo, hi)
        ctx.save_for_backward(xs, scale)
        ctx.lo, ctx.hi, ctx.gf = lo, hi, grad_factor
        return q * scale

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        xs, scale = ctx.saved_tensors
        inside = (xs >= ctx.lo) & (xs <= ctx.hi)
        gx = g * inside
        gs = None
        if ctx.needs_input_grad[1]:
            # d(out)/d(s) = round(xs) - xs inside, lo/hi outside (LSQ); rounded term recomputed, not stored.
            q = torch.clamp(torch.round(xs), ctx.lo, ctx.hi)
            d = torch.where(inside, q - xs, q)
            gsf = g * d
            if scale.numel() == 1:
                gs = gsf.sum().reshape(scale.shape) * ctx.gf
            else:  # per-channel along dim 0
                gs = gsf.reshape(gsf.shape[0], -1).sum(1).reshape(scale.shape) * ctx.gf
        return gx, gs, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float, grad_factor: float = 1.0) -> torch.Tensor:
    return _FakeQuant.apply(x, scale, lo, hi, grad_factor)


def _known_init(mod: nn.Module, buf_name: str, idx: int) -> bool:
    """Whether slot `idx` of the boolean buffer `buf_name` (a quantizer scale initialised) is set. The buffer lives on
    the model's device: reading it on a GPU is a host sync, once per quantizer and forward, which stalls the launch
    queue. A slot once seen set is remembered on the host (slots are only ever set, never cleared, except by loading a
    state dict, which forgets what was remembered: see `_forget_init`)."""
    known = _init_memo(mod)
    if (buf_name, idx) in known:
        return True
    if bool(getattr(mod, buf_name)[idx]):
        known.add((buf_name, idx))
        return True
    return False


def _init_memo(mod: nn.Module) -> set[tuple[str, int]]:
    """The (buffer name, slot) pairs known on the host to be set."""
    return mod.__dict__.setdefault("_init_known", set())


def _mark_init(mod: nn.Module, buf_name: str, idx: int) -> None:
    """Set slot `idx` of `buf_name` and remember it on the host at once: compiled code (torch.compile) that meets a
    slot the host does not know reads the tensor, a graph break at every quantizer."""
    getattr(mod, buf_name)[idx] = True
    _init_memo(mod).add((buf_name, idx))


def remember_init_(model: nn.Module) -> None:
    """Read every quantizer's initialised slots to the host once (e.g. after loading a checkpoint, before
    torch.compile), so that no forward reads them again."""
    for m in model.modules():
        flags = getattr(m, "initialized", None)
        if isinstance(m, SwitchableMixin) and isinstance(flags, torch.Tensor):
            _init_memo(m).update(("initialized", idx) for idx in flags.nonzero().flatten().tolist())


def _forget_init(mod: nn.Module, *args, **kwargs) -> None:
    """load_state_dict pre-hook: the loaded buffers may say otherwise than what the host remembered of them
    (`_known_init`)."""
    mod.__dict__.pop("_init_known", None)


class SwitchableMixin:
    """Everything that carries per-bit-width state; `set_bit_width_` walks these."""

    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS

    def switch_(self, w_bits: int, a_bits: int) -> None:
        bit_index(w_bits)
        bit_index(a_bits)
        # plain attributes, written past nn.Module.__setattr__'s parameter and module checks: this runs per step
        self.__dict__["w_bits"], self.__dict__["a_bits"] = w_bits, a_bits


@torch.no_grad()
def mse_act_scale(x: torch.Tensor, lo: float, hi: float, unsigned: bool) -> torch.Tensor:
    """Per-tensor scale by MSE-optimal clipping on a sample of the batch (our choice: better than max-init at 2-4
    bits). Samples with torch's global RNG above 100k values."""
    flat = x.detach().flatten().float()
    if flat.numel() > 100_000:
        flat = flat[torch.randint(0, flat.numel(), (100_000,), device=flat.device)]
    if unsigned:
        flat = flat.clamp(min=0)
    amax = flat.abs().max().clamp(min=1e-5)
    best, best_err = amax / hi, None
    for r in torch.linspace(0.05, 1.0, 40):
        s = amax * r / hi
        err = ((torch.clamp(torch.round(flat / s), lo, hi) * s - flat) ** 2).mean()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def mse_weight_scale(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-output-channel scale minimising quantization MSE over a grid of clip ratios (better than max at 2-4 bits)."""
    wf = w.detach().reshape(w.shape[0], -1)
    amax = wf.abs().amax(1).clamp(min=1e-8)
    best_s, best_err = amax / qmax, None
    for r in torch.linspace(0.2, 1.0, 33):
        s = (amax * r / qmax)[:, None]
        err = ((torch.clamp(torch.round(wf / s), -qmax, qmax) * s - wf) ** 2).sum(1)
        if best_err is None:
            best_err = err
            best_s = s[:, 0].clone()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s[:, 0], best_s)
    return best_s


def uncalibrated(model: nn.Module) -> bool:
    """True when some activation quantizer (the toolkit's own, or a switchable Brevitas one) has no scale yet at the
    model's current bit-width."""
    for m in model.modules():
        kind = getattr(m, "kind", None)
        if isinstance(m, SwitchableMixin) and kind in ("unsigned", "shifted") and m.a_bits != FLOAT_BITS:
            if not _known_init(m, "initialized", bit_index(m.bits)):
                return True
    return False


@torch.no_grad()
def ensure_calibrated_(model: nn.Module, x: torch.Tensor) -> None:
    """Initialise missing activation scales at the current bit-width with one train-mode forward (no grad)."""
    if uncalibrated(model):
        was = model.training
        model.train()
        model(x)
        model.train(was)


def all_modules(model: nn.Module) -> list[nn.Module]:
    """`model` and every module below it, each once (as `model.modules()`, in another order): without the names
    `modules()` builds, several times faster, which counts where the bit-width switches every step."""
    out, stack, seen = [model], [model], {id(model)}
    while stack:
        for child in stack.pop()._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
                stack.append(child)
    return out


def switchable_modules(model: nn.Module) -> list[SwitchableMixin]:
    return [m for m in all_modules(model) if isinstance(m, SwitchableMixin)]


def set_bit_width_(model: nn.Module, w_bits: int, a_bits: int | None = None) -> nn.Module:
    """Switch every quantized layer of `model` to `w_bits` weights and `a_bits` activations (32 = float), in place."""
    a_bits = w_bits if a_bits is None else a_bits
    for m in switchable_modules(model):
        m.switch_(w_bits, a_bits)
    model.current_bits = (w_bits, a_bits)  # type: ignore[attr-defined]
    return model


def get_bit_width(model: nn.Module) -> tuple[int, int]:
    return getattr(model, "current_bits", (FLOAT_BITS, FLOAT_BITS))


#: what, besides the bit-width, selects what a quantized model computes in eval mode: attributes of the model
#: (`qnn.models.quantized.QuantizedNet` sets the defaults), so that nothing outside the model decides it
EVAL_SETTINGS = {"integer": "integer_eval", "cpu": "target_cpu"}
_RESTORED = ("current_bits", *EVAL_SETTINGS.values())


@contextlib.contextmanager
def precision(model: nn.Module, bits: int | None = None, a_bits: int | None = None, *, integer: bool | None = None,
              cpu: str | None = None):
    """`with qnn.precision(model, 4): ...` runs `model` with 4-bit weights and activations (32: float) inside the block,
    and puts every layer back as it was when the block ends, by an exception too; blocks nest. `bits` None keeps the
    current bit-width (and still restores it: a helper that switches inside cannot leak a switch).

    `a_bits`: activations at another width than weights. `integer=False`: eval mode runs Brevitas' fake-quant form
    instead of the exported integer program. `cpu`: the CPU family (`qnn.kernels.reference.CPU_FAMILIES`) whose ONNX
    Runtime arithmetic the integer program follows; None: this machine's."""
    from qnn.kernels.reference import cpu_family

    if cpu is not None:
        cpu_family(cpu)  # checked before anything changes
    if bits is not None:
        bit_index(bits)
        bit_index(bits if a_bits is None else a_bits)
    modules = all_modules(model)  # one walk: this runs every training and attack step
    switches = [(m, m.w_bits, m.a_bits) for m in modules if isinstance(m, SwitchableMixin)]
    attrs = [(m, {a: m.__dict__[a] for a in _RESTORED if a in m.__dict__}) for m in modules
             if m is model or not m.__dict__.keys().isdisjoint(_RESTORED)]
    try:
        if bits is not None:
            a_bits = bits if a_bits is None else a_bits
            for m, _, _ in switches:
                m.switch_(bits, a_bits)
            model.current_bits = (bits, a_bits)
        for m, saved in attrs:
            for key, value in (("integer", integer), ("cpu", cpu)):
                if value is not None and EVAL_SETTINGS[key] in saved:
                    setattr(m, EVAL_SETTINGS[key], value)
        yield model
    finally:
        for m, w, a in switches:
            m.switch_(w, a)
        for m, saved in attrs:
            for a in _RESTORED:
                if a in saved:
                    m.__dict__[a] = saved[a]
                else:
                    m.__dict__.pop(a, None)

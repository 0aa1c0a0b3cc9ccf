"""Switchable-precision fake-quant layers.

One set of float weights; every layer holds per-bit-width quantizer scales and BatchNorm statistics,
all allocated up front, so `set_bit_width_` only changes an index (no re-allocation).

Why our own layers and not Brevitas': Brevitas has no run-time bit-width switch (its issue #702, the bit width is
a non-persistent buffer) and its default quantizers cost 1.6-2.8x a float step. The quantizer recipe is the one
the engineering notes verified fully integer in ONNX Runtime: unsigned activations after ReLU/pool, a shifted
(uint8 + zero point) quantizer before each residual add, symmetric narrow-range per-channel int weights, int32 bias,
BatchNorm folded into the per-channel weight scale at eval time so fake-quant computes what the integer graph does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.errors import QNNError

#: bit-widths a layer can run at; 32 means quantization off (float).
BIT_CHOICES: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 32)
FLOAT_BITS = 32


def bit_index(bits: int) -> int:
    if bits not in BIT_CHOICES:
        raise QNNError(f"bit-width {bits} is not allowed; choose from {list(BIT_CHOICES)}")
    return BIT_CHOICES.index(bits)


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
    known = mod.__dict__.setdefault("_init_known", set())
    if (buf_name, idx) in known:
        return True
    if bool(getattr(mod, buf_name)[idx]):
        known.add((buf_name, idx))
        return True
    return False


def _forget_init(mod: nn.Module, *args, **kwargs) -> None:
    """load_state_dict pre-hook: the loaded buffers may say otherwise than what the host remembered of them
    (`_known_init`, ActQuant's input zero point)."""
    mod.__dict__.pop("_init_known", None)
    mod.__dict__.pop("_zp_host", None)


class SwitchableMixin:
    """Everything that carries per-bit-width state; `set_bit_width_` walks these."""

    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS

    def switch_(self, w_bits: int, a_bits: int) -> None:
        bit_index(w_bits)
        bit_index(a_bits)
        self.w_bits, self.a_bits = w_bits, a_bits


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


class ActQuant(nn.Module, SwitchableMixin):
    """Per-tensor activation quantizer with one learned scale per bit-width.

    kind='unsigned': [0, 2^b-1], zero point 0 (after ReLU / pool; also acts as the ReLU).
    kind='shifted' : signed values stored as uint8 with zero point 2^(b-1), range [-2^(b-1), 2^(b-1)-1]
                     (tensors that can be negative before a residual add: the notes' integer recipe).
    kind='input'   : fixed 8-bit asymmetric quantizer over a known input range (not learned).
    The scale is initialised from the first training batch seen at that bit-width (MSE-optimal clipping), then
    learned (LSQ). Our choice: one-batch init rather than Brevitas' 300-step statistics, which cost time.
    """

    def __init__(self, kind: str = "unsigned", fixed_bits: int | None = None, input_range: tuple[float, float] | None = None,
                 min_bits: int | None = None):
        super().__init__()
        if kind not in ("unsigned", "shifted", "input"):
            raise ValueError(kind)
        self.kind = kind
        self.fixed_bits = fixed_bits
        self.min_bits = min_bits  # quantized runs use max(a_bits, min_bits): e.g. a wider residual stream
        n = len(BIT_CHOICES)
        self.log_scale = nn.Parameter(torch.zeros(n))
        self.register_buffer("initialized", torch.zeros(n, dtype=torch.bool))
        self.register_load_state_dict_pre_hook(_forget_init)
        if kind == "input":
            assert input_range is not None
            lo, hi = input_range
            s = (hi - lo) / 255.0
            self.log_scale.requires_grad_(False)
            self.log_scale.data.fill_(math.log(s))
            self.initialized.fill_(True)
            self.register_buffer("input_zp", torch.tensor(float(round(-lo / s))))

    @property
    def bits(self) -> int:
        if self.a_bits == FLOAT_BITS:
            return FLOAT_BITS
        b = self.fixed_bits or self.a_bits
        return max(b, self.min_bits) if self.min_bits else b

    def qrange(self, bits: int | None = None) -> tuple[float, float, float]:
        """(lo, hi, zero_point) of the integer grid at `bits`."""
        b = self.bits if bits is None else bits
        if self.kind == "unsigned":
            return 0.0, float(2**b - 1), 0.0
        if self.kind == "shifted":
            return float(-(2 ** (b - 1))), float(2 ** (b - 1) - 1), float(2 ** (b - 1))
        zp = self.__dict__.get("_zp_host")  # the buffer's value kept on the host (a device read is a sync)
        if zp is None:
            zp = self.__dict__["_zp_host"] = float(self.input_zp)
        return -zp, 255.0 - zp, zp

    def scale(self, bits: int | None = None) -> torch.Tensor:
        b = self.bits if bits is None else bits
        if self.kind == "input":
            b = 8
        return self.log_scale[bit_index(b)].exp()

    @torch.no_grad()
    def _init_scale(self, x: torch.Tensor, idx: int) -> None:
        lo, hi, _ = self.qrange()
        self.log_scale.data[idx] = torch.log(mse_act_scale(x, lo, hi, self.kind == "unsigned"))
        self.initialized[idx] = True


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits == FLOAT_BITS:
            return F.relu(x) if self.kind == "unsigned" else x
        b = 8 if self.kind == "input" else self.bits
        idx = bit_index(b)
        if not _known_init(self, "initialized", idx):
            if not self.training:
                raise QNNError(f"activation quantizer at {b} bits was never calibrated; train or calibrate first")
            self._init_scale(x, idx)
        lo, hi, zp = self.qrange(b)
        s = self.log_scale[idx].exp()
        gf = 1.0 / math.sqrt(x.numel() * hi) if self.training else 1.0
        if self.kind == "input":
            return fake_quant(x, s, lo, hi, 0.0)
        return fake_quant(x, s, lo, hi, gf)


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


class _QWeightMixin(SwitchableMixin):
    """Per-channel symmetric narrow-range weight quantization, one learned scale vector per bit-width."""

    weight: nn.Parameter
    fixed_w_bits: int | None

    def _init_wquant(self, out_ch: int, fixed_w_bits: int | None) -> None:
        self.fixed_w_bits = fixed_w_bits
        self.w_log_scale = nn.Parameter(torch.zeros(len(BIT_CHOICES), out_ch))
        self.register_buffer("w_initialized", torch.zeros(len(BIT_CHOICES), dtype=torch.bool))
        self.register_load_state_dict_pre_hook(_forget_init)

    @property
    def wbits(self) -> int:
        if self.w_bits == FLOAT_BITS:
            return FLOAT_BITS
        return self.fixed_w_bits or self.w_bits

    def w_qmax(self, bits: int | None = None) -> float:
        b = self.wbits if bits is None else bits
        return float(2 ** (b - 1) - 1)

    def w_scale(self, bits: int | None = None) -> torch.Tensor:
        b = self.wbits if bits is None else bits
        idx = bit_index(b)
        if not _known_init(self, "w_initialized", idx):
            with torch.no_grad():
                self.w_log_scale.data[idx] = torch.log(mse_weight_scale(self.weight, self.w_qmax(b)))
                self.w_initialized[idx] = True
        return self.w_log_scale[idx].exp()

    def int_weight(self, bits: int | None = None) -> torch.Tensor:
        """The integer weights (as float tensor) the deployed model stores."""
        b = self.wbits if bits is None else bits
        s = self.w_scale(b)
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        qm = self.w_qmax(b)
        return torch.clamp(torch.round(self.weight / s.reshape(shape)), -qm, qm)

    def qweight(self) -> torch.Tensor:
        if self.wbits == FLOAT_BITS:
            return self.weight
        s = self.w_scale()
        qm = self.w_qmax()
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        gf = 1.0 / math.sqrt(self.weight[0].numel() * qm) if self.training else 1.0
        return fake_quant(self.weight, s.reshape(shape), -qm, qm, gf)


class QConvBN(nn.Module, _QWeightMixin):
    """Conv2d (no bias) + BatchNorm with one BatchNorm per bit-width (switchable BN).

    Eval at a quantized bit-width computes the folded form the integer graph computes: integer weights, per-channel
    scale s_w*|gamma|/sigma, int32 bias on the grid s_in*s_w_eff. `in_scale` is the scale of the (already
    quantized) input, provided by the model.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int | None = None, fixed_w_bits: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.stride, self.padding = stride, (k // 2 if padding is None else padding)
        self.bns = nn.ModuleList(nn.BatchNorm2d(cout) for _ in BIT_CHOICES)
        self._init_wquant(cout, fixed_w_bits)

    @property
    def bn(self) -> nn.BatchNorm2d:
        # BN statistics follow the activation bit-width, the dominant source of the statistics shift.
        return self.bns[bit_index(self.a_bits)]

    def folded(self, in_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integer weights with sign folded, per-channel effective scale, int32 bias) at the current bit-width."""
        bn = self.bn
        inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        sign = torch.where(inv < 0, -1.0, 1.0)
        w_int = self.int_weight() * sign[:, None, None, None]
        s_eff = self.w_scale() * inv.abs()
        bias = bn.bias - bn.running_mean * inv
        b_int = torch.round(bias / (in_scale * s_eff))
        return w_int, s_eff, b_int

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.wbits != FLOAT_BITS and not self.training and in_scale is not None:
            w_int, s_eff, b_int = self.folded(in_scale)
            acc = F.conv2d(x, w_int, None, self.stride, self.padding)  # = s_in * integer accumulator
            return (acc + b_int[None, :, None, None] * in_scale) * s_eff[None, :, None, None]
        return self.bn(F.conv2d(x, self.qweight(), None, self.stride, self.padding))


class QLinear(nn.Module, _QWeightMixin):
    """Linear classifier; 8-bit weights by default; bias on the int32 grid s_in*s_w at quantized eval."""

    def __init__(self, fin: int, fout: int, fixed_w_bits: int | None = 8):
        super().__init__()
        lin = nn.Linear(fin, fout)
        self.weight, self.bias = lin.weight, lin.bias
        self._init_wquant(fout, fixed_w_bits)

    def int_bias(self, in_scale: torch.Tensor) -> torch.Tensor:
        return torch.round(self.bias / (in_scale * self.w_scale()))

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.wbits != FLOAT_BITS and in_scale is not None:
            s = self.w_scale()
            if self.training:
                return F.linear(x, self.qweight(), self.bias)
            return (F.linear(x, self.int_weight()) + self.int_bias(in_scale) * in_scale) * s
        return F.linear(x, self.qweight(), self.bias)


# ---- exact integer evaluation -------------------------------------------------------------------------------------
#: When True (default), a model in eval mode at a quantized bit-width and without autograd runs the integer
#: arithmetic of the exported graph exactly (see `IntegerEval`); with autograd (attacks) it runs the differentiable
#: fake-quant form, whose logits differ from the integer ones only by float rounding at requantization.
EXACT_INTEGER_EVAL = True


class exact_integer_eval:
    """Context manager / switch: `with exact_integer_eval(False): ...` evaluates with the float fake-quant form."""

    def __init__(self, on: bool = True):
        self.on, self.prev = on, None

    def __enter__(self):
        global EXACT_INTEGER_EVAL
        self.prev, EXACT_INTEGER_EVAL = EXACT_INTEGER_EVAL, self.on
        return self

    def __exit__(self, *exc):
        global EXACT_INTEGER_EVAL
        EXACT_INTEGER_EVAL = self.prev


def use_integer_path(model: nn.Module) -> bool:
    return EXACT_INTEGER_EVAL and not model.training and not torch.is_grad_enabled()


class IntegerEval:
    """The exported integer graph's arithmetic (ONNX Runtime / MLAS, as `kernels.reference`) in torch.

    Tensors are integers held in float32 and centred on their zero point (q - zp), so padding with 0 is padding with
    the zero point. Convolutions accumulate in float32, exact while partial sums stay below 2^24 (true for these
    networks; `kernels` and ORT use int32); requantization is rint(float32(acc) * float32(s_x*s_w/s_y)), half to
    even, saturated to the grid, as QLinearConv does.
    """

    @staticmethod
    def quantize_input(x: torch.Tensor, q: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
        zp = q.qrange(8)[2]
        s = q.scale()
        return torch.clamp(torch.round(x / s) + zp, 0.0, 255.0) - zp, s

    @staticmethod
    def requant(acc: torch.Tensor, mult: torch.Tensor, q: ActQuant) -> torch.Tensor:
        lo, hi, _ = q.qrange()
        m = mult.reshape(1, -1, *([1] * (acc.dim() - 2))) if mult.numel() > 1 else mult
        return torch.clamp(torch.round(acc * m), lo, hi)

    @staticmethod
    def conv(conv: "QConvBN", xc: torch.Tensor, s_x: torch.Tensor, q: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
        """QLinearConv: conv + int32 bias, requantized onto q's grid. Returns (centred ints, scale of q)."""
        w_int, s_eff, b_int = conv.folded(s_x)
        acc = F.conv2d(xc, w_int, b_int, conv.stride, conv.padding)
        s_y = q.scale()
        return IntegerEval.requant(acc, s_x * s_eff / s_y, q), s_y

    @staticmethod
    def add(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, q: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
        """QLinearAdd: rint(a*(sa/sy) + b*(sb/sy)) on q's grid."""
        s_y = q.scale()
        lo, hi, _ = q.qrange()
        return torch.clamp(torch.round(a * (sa / s_y) + b * (sb / s_y)), lo, hi), s_y

    @staticmethod
    def global_avg_pool(xc: torch.Tensor, s_x: torch.Tensor, q: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
        """QLinearGlobalAveragePool: rint(sum * (sx / (sy * HW)))."""
        hw = xc.shape[2] * xc.shape[3]
        s_y = q.scale()
        acc = xc.sum((2, 3))  # exact: integers < 2^24
        return IntegerEval.requant(acc, s_x / (s_y * torch.tensor(float(hw))), q), s_y

    @staticmethod
    def linear(lin: "QLinear", xc: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
        """QGemm with float output: float32(acc + int32 bias) * (s_x * s_w)."""
        return F.linear(xc, lin.int_weight(), lin.int_bias(s_x)) * (s_x * lin.w_scale())


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


def switchable_modules(model: nn.Module) -> list[SwitchableMixin]:
    return [m for m in model.modules() if isinstance(m, SwitchableMixin)]


def set_bit_width_(model: nn.Module, w_bits: int, a_bits: int | None = None) -> nn.Module:
    """Switch every quantized layer of `model` to `w_bits` weights and `a_bits` activations (32 = float), in place."""
    a_bits = w_bits if a_bits is None else a_bits
    for m in switchable_modules(model):
        m.switch_(w_bits, a_bits)
    model.current_bits = (w_bits, a_bits)  # type: ignore[attr-defined]
    return model


def get_bit_width(model: nn.Module) -> tuple[int, int]:
    return getattr(model, "current_bits", (FLOAT_BITS, FLOAT_BITS))

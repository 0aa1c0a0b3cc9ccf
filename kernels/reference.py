"""Numpy integer reference kernels with ONNX Runtime's (MLAS) arithmetic.

Integers accumulate exactly (int64 here, int32 in ORT; the exported graphs cannot overflow int32), requantization
multiplies the accumulator by one float32 multiplier and rounds half to even, as MLAS does.
Convolution runs as im2col + float64 matmul: exact for |values| < 2^53, far above any int32 accumulator.

One op is computed differently by ONNX Runtime on different CPU families: QLinearAdd (float FMA on x86-64, 22-bit
fixed point on aarch64). `qlinear_add` reproduces each; its `cpu=` (the interpreter's, and the model's `target_cpu`
through `qnn.precision(model, cpu=...)`) selects which one the exact evaluation follows, the host's by default.
"""

from __future__ import annotations

import platform
import struct

import numpy as np

F32 = np.float32
CPU_FAMILIES = ("x86_64", "aarch64")


def host_cpu_family() -> str:
    return "aarch64" if platform.machine().lower() in ("aarch64", "arm64") else "x86_64"


def cpu_family(family: str | None) -> str:
    """`family`, checked, or this machine's when None: whose ONNX Runtime arithmetic a kernel follows."""
    if family is None:
        return host_cpu_family()
    if family not in CPU_FAMILIES:
        raise ValueError(f"unknown CPU family {family!r}; choose from {', '.join(CPU_FAMILIES)}")
    return family


def quantize(x: np.ndarray, scale: float, zp: int, dtype=np.uint8) -> np.ndarray:
    """QuantizeLinear: saturate(round_half_even(x / scale) + zp)."""
    info = np.iinfo(dtype)
    q = np.rint(x.astype(F32) / F32(scale)) + zp
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale, zp, axis: int | None = None) -> np.ndarray:
    scale, zp = np.asarray(scale, F32), np.asarray(zp)
    if axis is not None and scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q.astype(np.int32) - zp.astype(np.int32)).astype(F32) * scale).astype(F32)


def requantize(acc: np.ndarray, multiplier: np.ndarray, zp: int, lo: int = 0, hi: int = 255) -> np.ndarray:
    """MLAS requantization: round_half_even(float32(acc) * multiplier) + zp, saturated."""
    v = np.rint(acc.astype(F32) * multiplier.astype(F32))
    return np.clip(v + zp, lo, hi).astype(np.uint8 if lo >= 0 else np.int8)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def conv_int(x_q: np.ndarray, x_zp: int, w_q: np.ndarray, w_zp: np.ndarray | int, bias: np.ndarray | None,
             stride=1, pad=0, dilation=1, groups: int = 1) -> np.ndarray:
    """Integer conv (NCHW, OIHW, zero padding with the input zero point, any stride / padding / dilation / groups):
    int64 accumulator incl. bias. `stride`, `pad`, `dilation`: an int or an (h, w) pair."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    n, c, h, w = x_q.shape
    o, cg, kh, kw = w_q.shape
    xi = x_q.astype(np.int64) - x_zp
    xp = np.pad(xi, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # padding value = zp -> 0 after subtraction
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    s = xp.strides
    cols = np.lib.stride_tricks.as_strided(xp, (n, c, kh, kw, oh, ow),
                                           (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw))
    og = o // groups
    # grouped im2col: (n, groups, cg*kh*kw, oh*ow) against (groups, og, cg*kh*kw); float64 matmul, exact below 2^53
    cols = cols.reshape(n, groups, cg * kh * kw, oh * ow).astype(np.float64)
    wi = (w_q.astype(np.int64) - np.asarray(w_zp).reshape(-1, 1, 1, 1)).astype(np.float64).reshape(groups, og, -1)
    acc = np.rint(np.matmul(wi[None], cols)).astype(np.int64).reshape(n, o, oh, ow)
    if bias is not None:
        acc = acc + bias.astype(np.int64).reshape(1, -1, 1, 1)
    return acc


def qlinear_conv(x_q, x_scale, x_zp, w_q, w_scale, w_zp, y_scale, y_zp, bias, stride, pad, dilation=1,
                 groups: int = 1) -> np.ndarray:
    acc = conv_int(x_q, int(x_zp), w_q, w_zp, bias, stride, pad, dilation, groups)
    mult = (F32(x_scale) * np.asarray(w_scale, F32) / F32(y_scale)).astype(F32)
    return requantize(acc, np.broadcast_to(mult.reshape(-1), (acc.shape[1],)).reshape(1, -1, 1, 1), int(y_zp))


def qladd_fixed_point(ra: np.float32, rb: np.float32) -> tuple[int, int, int] | None:
    """(shift, multiplier_a, multiplier_b) of MLAS' aarch64 QLinearAdd (MlasCalcQLinearAddParameters), or None where
    MLAS falls back to its scalar float path: a ratio outside [2^-14, 256), a shift outside [13, 31], or multipliers
    that do not fit 22 bits."""
    if not all(F32(2.0**-14) <= r < F32(256.0) for r in (ra, rb)):
        return None
    exponent = (struct.unpack("<I", struct.pack("<f", float(max(ra, rb))))[0] >> 23) - 127
    shift = 21 - exponent
    if not 13 <= shift <= 31:
        return None
    ma, mb = (int(np.rint(F32(r) * F32(2.0**shift))) for r in (ra, rb))
    if ma >= 1 << 22 or mb >= 1 << 22 or max(ma, mb) < 1 << 21:
        return None
    return shift, ma, mb


def qlinear_add(a_q, a_scale, a_zp, b_q, b_scale, b_zp, y_scale, y_zp, cpu: str | None = None) -> np.ndarray:
    """MLAS QLinearAdd on uint8 tensors of one shape, as CPU family `cpu` (default: this machine's) computes it.

    x86-64 (the AVX2 kernel): v = fma(a, ra, fma(b, rb, zy - fma(ra, za, rb * zb))) in float32 on the raw
    (uncentred) values, rounded half to even. The fixed part's inner fma is the compiler's contraction of
    `ra * za + rb * zb` in ORT's build: measured, it is what makes this bit-identical to ORT 1.32 on x86-64.
    aarch64 (NEON): acc = (a - za) * Ma + (b - zb) * Mb in int32, rounded shift right (half away from zero),
    + zy, saturated; or MLAS' scalar float path where `qladd_fixed_point` declines."""
    cpu = cpu_family(cpu)
    ra, rb = F32(a_scale) / F32(y_scale), F32(b_scale) / F32(y_scale)
    za, zb, zy = int(a_zp), int(b_zp), int(y_zp)
    if cpu == "x86_64":
        # float32 fma(x, y, z) = float32(x * y + z in float64): the product of an 8-bit integer and a float32 is
        # exact in float64, and so is the sum for these magnitudes, so the one rounding is the float32 one
        fixed = F32(zy) - F32(np.float64(ra) * za + np.float64(rb * F32(zb)))
        t = (b_q.astype(np.float64) * np.float64(rb) + np.float64(fixed)).astype(F32)
        v = (a_q.astype(np.float64) * np.float64(ra) + t.astype(np.float64)).astype(F32)
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)
    params = qladd_fixed_point(ra, rb)
    if params is None:
        va = F32(a_scale) * (a_q.astype(np.int32) - za).astype(F32)
        vb = F32(b_scale) * (b_q.astype(np.int32) - zb).astype(F32)
        vc = np.clip((va + vb) / F32(y_scale), F32(-zy), F32(255 - zy))
        return np.rint(vc + F32(zy)).astype(np.uint8)
    shift, ma, mb = params
    acc = (a_q.astype(np.int64) - za) * ma + (b_q.astype(np.int64) - zb) * mb
    acc -= acc < 0
    r = np.clip((acc + (1 << (shift - 1))) >> shift, -32768, 32767)
    return np.clip(np.clip(r + zy, -32768, 32767), 0, 255).astype(np.uint8)


def qlinear_mul(a_q, a_scale, a_zp, b_q, b_scale, b_zp, y_scale, y_zp) -> np.ndarray:
    """MLAS QLinearMul (the SSE2 and NEON kernels compute alike): the integer product (a - za) * (b - zb), exact in
    int32, times float32(sa * sb / sy) plus zy in float32 (two roundings, no FMA), rounded half to even, saturated
    to uint8. Broadcasts as numpy does."""
    ratio = F32(F32(a_scale) * F32(b_scale)) / F32(y_scale)
    prod = (a_q.astype(np.int32) - int(a_zp)) * (b_q.astype(np.int32) - int(b_zp))
    v = (prod.astype(F32) * F32(ratio)).astype(F32) + F32(y_zp)
    return np.clip(np.rint(v.astype(F32)), 0, 255).astype(np.uint8)


def qlinear_global_avg_pool(x_q, x_scale, x_zp, y_scale, y_zp) -> np.ndarray:
    """MLAS: (sum - zp * HW) * (sx / (sy * HW)), requantized."""
    n, c, h, w = x_q.shape
    hw = h * w
    acc = x_q.reshape(n, c, hw).astype(np.int64).sum(2) - int(x_zp) * hw
    mult = F32(x_scale) / (F32(y_scale) * F32(hw))
    return requantize(acc, np.asarray(mult, F32), int(y_zp)).reshape(n, c, 1, 1)


def pooled_size(h: int, w: int, k, stride, pad, ceil_mode: bool, dilation=1) -> tuple[int, int]:
    """Output size of a 2-D pool (PyTorch / ONNX rule: a ceil_mode window must start inside the input or its left
    padding)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(k), _pair(stride), _pair(pad), _pair(dilation)
    rnd = (lambda v: -(-v // 1)) if ceil_mode else (lambda v: v // 1)
    oh = int(rnd((h + 2 * ph - dh * (kh - 1) - 1) / sh)) + 1
    ow = int(rnd((w + 2 * pw - dw * (kw - 1) - 1) / sw)) + 1
    if ceil_mode:
        oh -= (oh - 1) * sh >= h + ph
        ow -= (ow - 1) * sw >= w + pw
    return oh, ow


def qlinear_avg_pool(x_q, x_scale, x_zp, y_scale, y_zp, k, stride, pad, ceil_mode: bool,
                     count_include_pad: bool) -> np.ndarray:
    """ONNX Runtime's QLinearAveragePool: a kernel covering the whole unpadded image is the global pool (its MLAS
    integer path); otherwise the dequantized values sx * (q - zp) are summed in float32 row by row, divided by the
    count (count_include_pad: the kernel's size, also for ceil_mode windows past the padded edge; else the window's
    in-image part), and quantized as rint(y / sy + zy), saturated to uint8."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(stride), _pair(pad)
    n, c, h, w = x_q.shape
    if (kh, kw) == (h, w) and (ph, pw) == (0, 0):
        return qlinear_global_avg_pool(x_q, x_scale, x_zp, y_scale, y_zp)
    oh, ow = pooled_size(h, w, (kh, kw), (sh, sw), (ph, pw), ceil_mode)
    d = F32(x_scale) * (x_q.astype(np.int32) - int(x_zp)).astype(F32)
    eh, ew = max(0, (oh - 1) * sh + kh - h - ph), max(0, (ow - 1) * sw + kw - w - pw)
    d = np.pad(d, ((0, 0), (0, 0), (ph, eh), (pw, ew)))  # cells outside the image add 0.0: the sum is unchanged
    inside = np.pad(np.ones((h, w), F32), ((ph, eh), (pw, ew)))
    acc = np.zeros((n, c, oh, ow), F32)
    count = np.zeros((oh, ow), F32)
    for i in range(kh):
        for j in range(kw):
            acc = (acc + d[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]).astype(F32)
            count += inside[i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
    if count_include_pad:
        count[:] = kh * kw
    y = (acc / count).astype(F32) / F32(y_scale) + F32(y_zp)
    return np.clip(np.rint(y.astype(F32)), 0, 255).astype(np.uint8)


def gemm_int(a_q, a_zp, b_q, b_zp, bias, trans_b: bool = True) -> np.ndarray:
    """Integer A @ B^T (+ int32 bias), int64."""
    ai = (a_q.astype(np.int64) - int(a_zp)).astype(np.float64)
    bi = (b_q.astype(np.int64) - np.asarray(b_zp).reshape(-1, 1) if trans_b else b_q.astype(np.int64)).astype(np.float64)
    acc = np.rint(ai @ (bi.T if trans_b else bi)).astype(np.int64)
    return acc if bias is None else acc + bias.astype(np.int64)


def qgemm(a_q, a_scale, a_zp, b_q, b_scale, b_zp, bias, y_scale, y_zp, trans_b: bool = True) -> np.ndarray:
    """QGemm with a quantized output: requantized like QLinearConv."""
    acc = gemm_int(a_q, a_zp, b_q, b_zp, bias, trans_b)
    mult = (F32(a_scale) * np.asarray(b_scale, F32) / F32(y_scale)).astype(F32)
    return requantize(acc, np.broadcast_to(mult.reshape(-1), (acc.shape[1],)).reshape(1, -1), int(y_zp))


def qgemm_float_out(a_q, a_scale, a_zp, b_q, b_scale, b_zp, bias, trans_b: bool = True) -> np.ndarray:
    """QGemm with float output: float32(int acc + int32 bias) * (sa * sb)."""
    acc = gemm_int(a_q, a_zp, b_q, b_zp, bias, trans_b)
    mult = (F32(a_scale) * np.asarray(b_scale, F32)).astype(F32)
    return (acc.astype(F32) * mult).astype(F32)


def max_pool(x: np.ndarray, k, stride, pad, dilation=1, ceil_mode: bool = False) -> np.ndarray:
    """MaxPool on the integer tensor; padding never wins (ONNX ignores padded positions). Ints or (h, w) pairs."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(k), _pair(stride), _pair(pad), _pair(dilation)
    n, c, h, w = x.shape
    oh, ow = pooled_size(h, w, k, stride, pad, ceil_mode, dilation)
    lo = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf
    eh, ew = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - h - ph), max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - w - pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, eh), (pw, ew)), constant_values=lo)
    out = np.full((n, c, oh, ow), lo, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw])
    return out

"""Numpy integer reference kernels with ONNX Runtime's (MLAS) arithmetic.

Integers accumulate exactly (int64 here, int32 in ORT; the exported graphs cannot overflow int32), requantization
multiplies the accumulator by one float32 multiplier and rounds half to even, as MLAS does.
Convolution runs as im2col + float64 matmul: exact for |values| < 2^53, far above any int32 accumulator.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


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


def conv_int(x_q: np.ndarray, x_zp: int, w_q: np.ndarray, w_zp: np.ndarray | int, bias: np.ndarray | None,
             stride: int, pad: int) -> np.ndarray:
    """Integer conv (NCHW, OIHW, zero padding with the input zero point): int64 accumulator incl. bias."""
    n, c, h, w = x_q.shape
    o, _, kh, kw = w_q.shape
    xi = x_q.astype(np.int64) - x_zp
    xp = np.pad(xi, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # padding value = zp -> 0 after subtraction
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    s = xp.strides
    cols = np.lib.stride_tricks.as_strided(xp, (n, c, kh, kw, oh, ow),
                                           (s[0], s[1], s[2], s[3], s[2] * stride, s[3] * stride))
    cols = cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw).astype(np.float64)
    wi = (w_q.astype(np.int64) - np.asarray(w_zp).reshape(-1, 1, 1, 1)).reshape(o, -1).astype(np.float64)
    acc = np.rint(cols @ wi.T).astype(np.int64).reshape(n, oh, ow, o).transpose(0, 3, 1, 2)
    if bias is not None:
        acc = acc + bias.astype(np.int64).reshape(1, -1, 1, 1)
    return acc


def qlinear_conv(x_q, x_scale, x_zp, w_q, w_scale, w_zp, y_scale, y_zp, bias, stride, pad) -> np.ndarray:
    acc = conv_int(x_q, int(x_zp), w_q, w_zp, bias, stride, pad)
    mult = (F32(x_scale) * np.asarray(w_scale, F32) / F32(y_scale)).astype(F32)
    return requantize(acc, np.broadcast_to(mult.reshape(-1), (acc.shape[1],)).reshape(1, -1, 1, 1), int(y_zp))


def qlinear_add(a_q, a_scale, a_zp, b_q, b_scale, b_zp, y_scale, y_zp) -> np.ndarray:
    """MLAS QLinearAdd: (a - za) * (sa/sy) + (b - zb) * (sb/sy), round half even, + zy."""
    ra, rb = F32(a_scale) / F32(y_scale), F32(b_scale) / F32(y_scale)
    v = (a_q.astype(np.int32) - int(a_zp)).astype(F32) * ra + (b_q.astype(np.int32) - int(b_zp)).astype(F32) * rb
    return np.clip(np.rint(v) + int(y_zp), 0, 255).astype(np.uint8)


def qlinear_global_avg_pool(x_q, x_scale, x_zp, y_scale, y_zp) -> np.ndarray:
    """MLAS: (sum - zp * HW) * (sx / (sy * HW)), requantized."""
    n, c, h, w = x_q.shape
    hw = h * w
    acc = x_q.reshape(n, c, hw).astype(np.int64).sum(2) - int(x_zp) * hw
    mult = F32(x_scale) / (F32(y_scale) * F32(hw))
    return requantize(acc, np.asarray(mult, F32), int(y_zp)).reshape(n, c, 1, 1)


def qgemm_float_out(a_q, a_scale, a_zp, b_q, b_scale, b_zp, bias, trans_b: bool = True) -> np.ndarray:
    """QGemm with float output: float32(int acc + int32 bias) * (sa * sb)."""
    ai = (a_q.astype(np.int64) - int(a_zp)).astype(np.float64)
    bi = (b_q.astype(np.int64) - np.asarray(b_zp).reshape(-1, 1) if trans_b else b_q.astype(np.int64)).astype(np.float64)
    acc = np.rint(ai @ (bi.T if trans_b else bi)).astype(np.int64)
    if bias is not None:
        acc = acc + bias.astype(np.int64)
    mult = (F32(a_scale) * np.asarray(b_scale, F32)).astype(F32)
    return (acc.astype(F32) * mult).astype(F32)


def max_pool(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    n, c, h, w = x.shape
    lo = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=lo)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.full((n, c, oh, ow), lo, dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride])
    return out

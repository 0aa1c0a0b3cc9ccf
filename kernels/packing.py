"""Low-bit packing: 2- and 4-bit signed weights into bytes, and the true model size at each bit-width.

ONNX Runtime stores sub-8-bit weights in int8 containers (it has no 2/4-bit conv kernels); these helpers show what
the weights occupy when packed, e.g. for a custom runtime or flash budget.
"""

from __future__ import annotations

import numpy as np

from qnn.errors import QNNError


def pack(w: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed integers in [-2^(b-1), 2^(b-1)-1] (b = 2 or 4) little-end-first into uint8."""
    if bits not in (2, 4, 8):
        raise QNNError(f"packing supports 2, 4 or 8 bits, got {bits}")
    w = np.asarray(w).astype(np.int64).ravel()
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if w.size and (w.min() < lo or w.max() > hi):
        raise QNNError(f"values outside the {bits}-bit range [{lo}, {hi}]")
    if bits == 8:
        return w.astype(np.int8).view(np.uint8)
    per = 8 // bits
    u = (w & ((1 << bits) - 1)).astype(np.uint8)
    u = np.concatenate([u, np.zeros((-len(u)) % per, np.uint8)]).reshape(-1, per)
    out = np.zeros(len(u), np.uint8)
    for i in range(per):
        out |= u[:, i] << (bits * i)
    return out


def unpack(p: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return p.view(np.int8)[:n].astype(np.int64)
    per = 8 // bits
    mask = (1 << bits) - 1
    u = np.stack([(p >> (bits * i)) & mask for i in range(per)], 1).reshape(-1)[:n].astype(np.int64)
    return np.where(u >= 2 ** (bits - 1), u - 2**bits, u)


def size_report(model, bits_list=(2, 4, 8)) -> dict:
    """Bytes of the weights packed at each bit-width (first/last layers at their own width) vs float32."""
    import brevitas.nn as bnn

    from qnn.brevitas_quant import quantizers

    layers = [m for m in model.modules() if isinstance(m, (bnn.QuantConv2d, bnn.QuantLinear))]
    n_float = sum(m.weight.numel() for m in layers)
    rep = {"float32_bytes": 4 * n_float, "n_weights": n_float, "packed": {}}
    for b in bits_list:
        tot = 0
        for m in layers:
            wb = quantizers(m.weight_quant)[0].fixed_bits or b
            wb = 8 if wb > 4 else (4 if wb > 2 else 2)
            tot += (m.weight.numel() * wb + 7) // 8 + 4 * m.weight.shape[0]  # packed ints + per-channel scales
        rep["packed"][str(b)] = {"bytes": tot, "vs_float": tot / (4 * n_float)}
    return rep

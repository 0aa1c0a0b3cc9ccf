"""Low-bit packing: 2- and 4-bit signed weights into bytes, the true model size at each bit-width, and the packed
weights of an exported model.

ONNX Runtime keeps sub-8-bit weights in int8 containers (it has no 2/4-bit conv kernels). A packed edge bundle ships
them packed (`pack_model_weights`) and the edge runner (`export/run_edge.py`) unpacks them into the session at load
time; the unpacking is defined there, in the standalone runner, and used here.
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
    from qnn.export.run_edge import unpack_signed

    if bits == 8:
        return p.view(np.int8)[:n].astype(np.int64)
    return unpack_signed(p, bits, n).astype(np.int64)


def pack_model_weights(model, file_name: str):
    """(model with its 2/4-bit weight initializers declared external and emptied, {name: packed bytes}, {name:
    spec}) for an exported integer model. A weight is an int8 (zero point 0) or uint8 (zero point 128) initializer
    of two or more dimensions read by a DequantizeLinear; it is packed at 2 or 4 bits when its values, divided by
    their lift (the power of two the export multiplied them by), fit that signed range, and left in the model
    otherwise (8-bit layers)."""
    import onnx
    from onnx import numpy_helper

    from qnn.export.run_edge import LIFTS  # the lifts the edge runner accepts

    zero_point = {n.input[0]: n.input[2] if len(n.input) > 2 else "" for n in model.graph.node
                  if n.op_type == "DequantizeLinear"}
    inits = {i.name: i for i in model.graph.initializer}
    packed, specs = {}, {}
    for name, zp_name in zero_point.items():
        t = inits.get(name)
        if t is None or len(t.dims) < 2 or t.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        signed = t.data_type == onnx.TensorProto.INT8
        zp = 0 if signed else 128
        zps = np.unique(numpy_helper.to_array(inits[zp_name])) if zp_name in inits else np.zeros(1)
        if zps.tolist() != [zp]:
            continue
        c = numpy_helper.to_array(t).astype(np.int64) - zp
        g = int(np.gcd.reduce(np.abs(c).ravel()))
        lift = min(g & -g, max(LIFTS)) if g else 1  # the weights' lift (qnn.integer.weight_lift): a power of two
        c = c // lift
        bits = next((b for b in (2, 4) if c.min() >= -(1 << (b - 1)) and c.max() < 1 << (b - 1)), None)
        if bits is None:
            continue
        packed[name] = pack(c, bits)
        specs[name] = {"bits": bits, "lift": lift, "shape": [int(d) for d in t.dims], "zero_point": zp,
                       "dtype": "int8" if signed else "uint8"}
        t.ClearField("raw_data")
        del t.int32_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", file_name), ("offset", "0"), ("length", str(int(np.prod(t.dims))))):
            e = t.external_data.add()
            e.key, e.value = k, v
    return model, packed, specs


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

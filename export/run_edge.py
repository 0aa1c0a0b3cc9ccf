#!/usr/bin/env python3
"""Run an edge bundle on this device (Raspberry Pi 4/5 with a 64-bit OS, or any CPU) with ONNX Runtime.

Imports only the Python standard library, numpy and onnxruntime; Python 3.9+.

    python3 run_edge.py --bundle BUNDLE_DIR [--threads 4] [--batch 32] [--json result.json]

Checks the bundle's sha256 manifest, prints the CPU (model, architecture, ISA flags such as asimddp / i8mm /
avx512_vnni), onnxruntime version and optimisation level, checks from ORT's own profile that every executed compute
node is an integer kernel, measures latency (p50/p90/p99 after warm-up) at batch 1 and --batch, throughput, peak RSS,
model size, then integer accuracy and patch ASR on the bundled images, and compares them with the figures of the
PyTorch model the bundle carries for this CPU family's arithmetic (x86-64 or aarch64: ONNX Runtime rounds
QLinearAdd differently on the two). Exits 1 when they differ by more than the tolerance or the graph is not integer,
2 on bad input. With --certify (a bundle from `qnn bundle --certify-patch-size`), also runs the certified inference
over the bundle's mask set and exits 1 unless every image's prediction and certificate equal PyTorch's.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

# the same sets as `qnn verify` (export/verify.py; a test holds them equal): this file must stand alone on the device.
# ORT's profiler names op types only: a Resize counts as movement here because the exporter writes nearest ones only,
# which `qnn verify` (reading the graph's attributes) checks
INTEGER_KERNELS = {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm", "QLinearMatMul", "MatMulInteger",
                   "ConvInteger", "QLinearAveragePool", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
                   "QLinearLeakyRelu"}
MOVEMENT = {"Clip", "Slice", "Pad", "Flatten", "Reshape", "MaxPool", "Identity", "Transpose", "Squeeze", "Unsqueeze",
            "Concat", "Shape", "Gather", "Cast", "Split", "Resize", "QuantizeLinear", "DequantizeLinear", "MemcpyFromHost", "MemcpyToHost"}


class EdgeError(Exception):
    pass


class Bundle:
    """A verified bundle folder. The rule, for every file the runner reads: it is named in the manifest's `files`
    with its sha256, its name is a plain file name inside the folder (no path separator, no '..', not absolute, not a
    symlink, resolving inside the folder), and its hash is checked before it is used. Files are read once, hashed,
    and the bytes that were hashed are the bytes used. A manifest that lacks any of this is refused."""

    ROLES = ("model", "eval", "expected")

    def __init__(self, d: str):
        if not os.path.isdir(d):
            raise EdgeError(f"bundle dir not found: {d}")
        self.dir = os.path.realpath(d)
        try:
            man = json.loads(self._read_plain("manifest.json"))
        except ValueError as e:
            raise EdgeError(f"{d}: unreadable manifest.json: {str(e)[:120]}") from None
        if not isinstance(man, dict):
            raise EdgeError(f"{d}: manifest.json must be a JSON object, got {type(man).__name__}")
        if man.get("format") not in BUNDLE_FORMATS:
            raise EdgeError(f"{d}: manifest format {man.get('format')!r} is not one this runner reads "
                            f"({', '.join(BUNDLE_FORMATS)}); use the run_edge.py of the qnn that wrote the bundle")
        files = man.get("files")
        if not isinstance(files, dict) or not files:
            raise EdgeError(f"{d}: manifest has no 'files' list of sha256s; every file must be listed and hashed")
        for name, h in files.items():
            if not (isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)):
                raise EdgeError(f"{d}: manifest entry {name!r} has no valid sha256")
        for role in self.ROLES:
            if not isinstance(man.get(role), str) or man[role] not in files:
                raise EdgeError(f"{d}: manifest's '{role}' must name a file listed (and hashed) in 'files'")
        self.manifest, self.hashes, self.data = man, dict(files), {}
        for name in sorted(files):  # every listed file is verified before anything is used
            data = self._read_plain(name)
            if hashlib.sha256(data).hexdigest() != files[name]:
                raise EdgeError(f"sha256 of {name} does not match the manifest (tampered or corrupt)")
            self.data[name] = data

    def _read_plain(self, name) -> bytes:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or "\0" in name or os.path.isabs(name):
            raise EdgeError(f"bundle file name {name!r} is not a plain file name inside the bundle")
        p = os.path.join(self.dir, name)
        if os.path.islink(p) or os.path.dirname(os.path.realpath(p)) != self.dir:
            raise EdgeError(f"bundle file {name!r} is a link or leads outside the bundle")
        if not os.path.isfile(p):
            raise EdgeError(f"bundle file missing: {name}")
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def read(self, name: str) -> bytes:
        """The verified bytes of a file listed in the manifest; an unlisted name is refused."""
        if name not in self.data:
            raise EdgeError(f"bundle file {name!r} is not listed (with its sha256) in the manifest")
        return self.data[name]

    def npz(self, name: str) -> dict:
        data = self.read(name)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # a corrupt zip raises zipfile.BadZipFile, a bad header ValueError, ...
            raise EdgeError(f"{name}: unreadable npz: {str(e)[:120]}") from None

    def json(self, name: str):
        data = self.read(name)
        try:
            return json.loads(data)
        except ValueError as e:
            raise EdgeError(f"{name}: unreadable JSON: {str(e)[:120]}") from None

    def path(self, name: str) -> str:
        """Where a verified file lies (for messages and results; it is never re-read from there)."""
        self.read(name)
        return os.path.join(self.dir, name)


def check_output_path(path: str, bundle: "Bundle", what: str) -> None:
    """An output file must be writable where it is asked for, and must not replace a file of the bundle."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise EdgeError(f"{what} {path} is a folder; give a file name")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise EdgeError(f"{what} {path}: folder {parent} does not exist or is not writable")
    if os.path.realpath(parent) == bundle.dir and (os.path.basename(path) in bundle.data
                                                   or os.path.basename(path) == "manifest.json"):
        raise EdgeError(f"{what} {path} would replace a file of the bundle; write it elsewhere")


def _number(v, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise EdgeError(f"{name} must be a finite number in [{lo}, {hi}], got {v!r}")
    return float(v)


def cpu_report() -> dict:
    model, flags = "", []
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k in ("model name", "cpu model", "hardware") and not model:
                model = v.strip()
            if k == "cpu part" and not model:
                model = {"0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd03": "Cortex-A53"}.get(v.strip(), "ARM part " + v.strip())
            if k in ("flags", "features") and not flags:
                flags = v.split()
    except OSError:
        pass
    keep = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "avx2", "avx512f", "avx512_vnni", "avx512vnni",
            "avx_vnni", "amx_int8", "amx_tile")
    return {"cpu_model": model or platform.processor(), "machine": platform.machine(), "isa_flags": [f for f in flags if f in keep],
            "n_cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "qemu_cpu": os.environ.get("QEMU_CPU")}


#: bundle formats this runner reads; v2 packed weights may carry a lift (v1 runners would ignore it)
BUNDLE_FORMATS = ("qnn-edge-bundle-v1", "qnn-edge-bundle-v2")


#: x86 flags whose int8 kernels (VPDPBUSD) accumulate u8 x s8 products in int32 directly
VNNI_FLAGS = ("avx512_vnni", "avx512vnni", "avx_vnni")


def int8_saturation_risk(meta: dict, plat: dict) -> str | None:
    """Why ONNX Runtime's int8 kernels could compute wrong integers for this model on this CPU, or None: on x86
    without VNNI, the u8 x s8 kernels add two products into a saturating int16 (VPMADDUBSW), safe for |w| <= 64.
    The exporter records the model's largest int8 |w| (`int8_weight_max`; absent in models from before it)."""
    w = meta.get("int8_weight_max")
    if w is None or plat["machine"].lower() not in ("x86_64", "amd64") or set(VNNI_FLAGS) & set(plat["isa_flags"]):
        return None
    try:
        w = int(w)
    except ValueError:
        raise EdgeError(f"model metadata int8_weight_max is not an integer: {w!r}") from None
    if w <= 64:
        return None
    return (f"this model stores int8 weights up to |w| = {w} and this x86 CPU has no AVX-VNNI: ONNX Runtime's u8 x s8 "
            f"kernels can saturate and compute wrong integers; export it with --weight-type auto, or train with "
            f"reduce_range (the default)")


def unpack_signed(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first n signed `bits`-bit integers (2 or 4) packed little-end-first into the bytes `packed`, as int16."""
    per, mask = 8 // bits, (1 << bits) - 1
    u = np.stack([(packed >> (bits * i)) & mask for i in range(per)], 1).reshape(-1)[:n].astype(np.int16)
    return np.where(u >= 1 << (bits - 1), u - (1 << bits), u)


EXPECTED_LOGITS = "expected_logits.npz"
#: what packed weights may be multiplied by: the export lifts sub-8-bit weights by a power of two (2-bit ones by 64)
LIFTS = (1, 2, 4, 8, 16, 32, 64)
#: the most values one packed weight tensor may declare (a 2**28-weight conv is far beyond any edge model)
MAX_PACKED_VALUES = 1 << 28
#: the largest |w| a packed weight may unpack to: what the export writes, and what no int8 kernel can saturate on
PACKED_MAX_W = 64


def packed_weights(bundle: "Bundle") -> dict:
    """{initializer name: int8/uint8 weights} unpacked from the bundle's packed 2/4-bit weights (none when the
    model carries its weights itself). Each entry is checked against its declared bits, shape and container."""
    spec = bundle.manifest.get("packed_weights")
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not isinstance(spec.get("tensors"), dict) or not isinstance(spec.get("file"), str):
        raise EdgeError("manifest's 'packed_weights' must name a file and describe its tensors")
    z, out = bundle.npz(spec["file"]), {}
    for name, t in spec["tensors"].items():
        ok = isinstance(t, dict) and type(t.get("bits")) is int and t["bits"] in (2, 4) \
            and isinstance(t.get("shape"), list) and t["shape"] \
            and all(type(d) is int and d > 0 for d in t["shape"]) \
            and (t.get("dtype"), t.get("zero_point")) in (("int8", 0), ("uint8", 128)) \
            and type(t.get("zero_point")) is int and type(t.get("lift", 1)) is int and t.get("lift", 1) in LIFTS
        if not ok:
            raise EdgeError(f"packed weight {name!r}: needs bits 2 or 4, a shape, dtype int8 (zero point 0) or uint8 "
                            f"(zero point 128), and a lift in {list(LIFTS)}")
        n = math.prod(t["shape"])  # Python's integers: a hostile shape cannot wrap around as int64 would
        if n > MAX_PACKED_VALUES:
            raise EdgeError(f"packed weight {name!r}: shape {t['shape']} holds {n} values, more than any model's "
                            f"weight tensor ({MAX_PACKED_VALUES})")
        p = z.get(name)
        if p is None or p.dtype != np.uint8 or p.shape != ((n * t["bits"] + 7) // 8,):
            raise EdgeError(f"{spec['file']}: {name!r} missing or not {(n * t['bits'] + 7) // 8} packed bytes")
        w = unpack_signed(p, t["bits"], n).astype(np.int32) * t.get("lift", 1)
        if np.abs(w).max() > PACKED_MAX_W:
            raise EdgeError(f"packed weight {name!r}: unpacks beyond |w| = {PACKED_MAX_W} (bits {t['bits']}, lift "
                            f"{t.get('lift', 1)}), which no export writes")
        out[name] = (w + t["zero_point"]).astype(t["dtype"]).reshape(t["shape"])
    return out


def weight_bits(meta: dict, bundle: "Bundle") -> int:
    """The bit-width of the model's weights, read from the model itself: its packed tensors' bits where the bundle
    packs them (2/4-bit), else the exported model's own record (`w_bits` in its metadata)."""
    packed = (bundle.manifest.get("packed_weights") or {}).get("tensors") or {}
    if packed:
        return max(t["bits"] for t in packed.values())
    try:
        b = int(meta.get("w_bits", ""))
    except ValueError:
        b = 0
    if not 2 <= b <= 8:
        raise EdgeError(f"model metadata w_bits {meta.get('w_bits')!r} is not a bit-width in 2..8")
    return b


def compare_logits(got: dict, ref, key: str) -> dict:
    """Per set (clean, each patch): images whose integer logits equal the reference's bit for bit."""
    out = {}
    for name, lg in got.items():
        r = ref.get(f"{key}{name}")
        if r is None or r.shape != lg.shape or r.dtype != np.float32:
            raise EdgeError(f"{EXPECTED_LOGITS}: '{key}{name}' missing or not float32 logits of shape {list(lg.shape)}")
        out[name] = int((lg == r).all(1).sum())
    return out


def make_session(model: bytes, threads: int, profile: bool = False, weights: dict | None = None):
    """An ORT session; `weights` supplies initializers the model declares as external (packed bundles)."""
    so = ort.SessionOptions()
    values = [ort.OrtValue.ortvalue_from_numpy(w) for w in (weights or {}).values()]
    if values:
        so.add_external_initializers(list(weights), values)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "edge")
    try:
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        sess._external_weights = values  # ORT may keep pointing at them: they live as long as the session
        return sess
    except Exception as e:
        raise EdgeError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:160]}") from None


def executed_ops(model: bytes, x: np.ndarray, weights: dict | None = None) -> dict:
    """Op types ORT actually executed (from its profiler), and the float compute ops among them."""
    s = make_session(model, 1, profile=True, weights=weights)
    run_batches(s, x)
    prof = s.end_profiling()
    ops: dict = {}
    for ev in json.load(open(prof)):
        a = ev.get("args", {})
        if ev.get("cat") == "Node" and "op_name" in a and ev.get("name", "").endswith("_kernel_time"):
            ops[a["op_name"]] = ops.get(a["op_name"], 0) + 1
    for f in glob.glob(os.path.join(os.path.dirname(prof), "*")):
        os.unlink(f)
    float_ops = sorted(o for o in ops if o not in INTEGER_KERNELS and o not in MOVEMENT)
    # the only QuantizeLinear allowed is the input one
    if ops.get("QuantizeLinear", 0) > 1:
        float_ops.append("QuantizeLinear(x%d)" % ops["QuantizeLinear"])
    if ops.get("DequantizeLinear", 0) > 1:
        float_ops.append("DequantizeLinear(x%d)" % ops["DequantizeLinear"])
    return {"executed_ops": ops, "float_compute_ops": float_ops, "fully_integer": not float_ops}


def normalise(x_uint8_nhwc: np.ndarray, mean, std) -> np.ndarray:
    x = x_uint8_nhwc.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((x - m) / s).astype(np.float32)


def apply_patch(x01: np.ndarray, patch: np.ndarray, mask: np.ndarray, loc: np.ndarray) -> np.ndarray:
    """Same exact paste as qnn.attacks.patch.apply_patch, in numpy (NCHW, pixels in [0,1])."""
    out = x01.copy()
    ph, pw = mask.shape[-2:]
    m = mask.reshape(1, ph, pw).astype(np.float32)
    for i, (r, c) in enumerate(loc):
        region = out[i, :, r:r + ph, c:c + pw]
        out[i, :, r:r + ph, c:c + pw] = region * (1 - m) + patch * m
    return out


def run_batches(sess, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    try:
        return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    except Exception as e:  # onnxruntime's own failure (bad graph, shape) is the bundle's fault
        raise EdgeError(f"onnxruntime failed to run the model: {str(e).splitlines()[0][:160]}") from None


def latency(sess, x: np.ndarray, batch: int, warmup: int, iters: int) -> dict:
    name = sess.get_inputs()[0].name
    xb = np.ascontiguousarray(np.resize(x, (batch,) + x.shape[1:]))
    for _ in range(warmup):
        sess.run(None, {name: xb})
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, {name: xb})
        ts.append((time.perf_counter() - t0) * 1e3)
    ts = np.array(ts)
    return {"batch": batch, "p50_ms": float(np.percentile(ts, 50)), "p90_ms": float(np.percentile(ts, 90)),
            "p99_ms": float(np.percentile(ts, 99)), "throughput_img_s": float(batch / (np.median(ts) / 1e3)), "iters": iters}


def asr(clean_pred, adv_pred, y, targeted, target):
    if targeted:
        keep = y != target
        return 100.0 * float((adv_pred[keep] == target).mean()) if keep.any() else 0.0
    ok = clean_pred == y
    return 100.0 * float((adv_pred[ok] != y[ok]).mean()) if ok.any() else 0.0


def _expected(preds: dict, key: str, n: int) -> np.ndarray:
    p = preds.get(key)
    if p is None or p.shape != (n,):
        raise EdgeError(f"expected_predictions.npz: '{key}' missing or not one prediction per image")
    return p


def _check_expected(exp, name: str) -> None:
    """The fake-quant figures the bundle carries: every field the runner uses, of its type and range."""
    def fail(what):
        raise EdgeError(f"{name}: {what}")

    if not isinstance(exp, dict) or not isinstance(exp.get("patches"), dict):
        fail("expected results must be an object with a 'patches' mapping")
    if not isinstance(exp.get("bits"), int) or isinstance(exp["bits"], bool):
        fail(f"'bits' must be an integer, got {exp.get('bits')!r}")
    n_cls = exp.get("num_classes")
    if n_cls is not None and (not isinstance(n_cls, int) or isinstance(n_cls, bool) or n_cls < 1):
        fail(f"'num_classes' must be a positive integer, got {n_cls!r}")
    _number(exp.get("clean_acc_pct"), f"{name}: clean_acc_pct", 0, 100)
    for p, e in exp["patches"].items():
        if not isinstance(e, dict):
            fail(f"patch {p!r} must be an object")
        _number(e.get("asr_pct"), f"{name}: asr_pct of {p}", 0, 100)
        if not isinstance(e.get("targeted"), bool):
            fail(f"patch {p!r}: 'targeted' must be true or false")
        t = e.get("target_class")
        if e["targeted"] and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
            fail(f"patch {p!r}: 'target_class' must be a class index, got {t!r}")
    fams = exp.get("by_cpu_family", {})
    if not isinstance(fams, dict) or not all(isinstance(f, dict) and isinstance(f.get("asr_pct"), dict)
                                             for f in fams.values()):
        fail("'by_cpu_family' must map a CPU family to its clean_acc_pct and asr_pct")
    for fam, f in fams.items():
        _number(f.get("clean_acc_pct"), f"{name}: clean_acc_pct of {fam}", 0, 100)
        for p in exp["patches"]:
            _number(f["asr_pct"].get(p), f"{name}: asr_pct of {p} on {fam}", 0, 100)


def cpu_family() -> str:
    """The CPU family whose ONNX Runtime arithmetic this device runs (QLinearAdd rounds differently on aarch64)."""
    return "aarch64" if platform.machine().lower() in ("aarch64", "arm64") else "x86_64"


def expectations(exp: dict) -> tuple[str, str, float, dict]:
    """(family the figures are for, prediction key prefix, clean accuracy, {patch: ASR}): this device's family's
    figures when the bundle has them, else the bundle's top-level ones (the building host's family)."""
    fam = cpu_family()
    f = exp.get("by_cpu_family", {}).get(fam)
    if f is not None:
        return fam, f"{fam}.", f["clean_acc_pct"], f["asr_pct"]
    return exp.get("cpu_family", "x86_64"), "", exp["clean_acc_pct"], {p: e["asr_pct"] for p, e in exp["patches"].items()}


def _checked_patch(name: str, z: dict, x_shape) -> tuple:
    """(patch, mask, loc) of a bundled patch, checked: finite pixels in [0, 1], shapes that fit the images."""
    patch, mask, loc = z.get("patch"), z.get("mask"), z.get("loc")
    if patch is None or mask is None or loc is None:
        raise EdgeError(f"patch_{name}.npz: needs patch, mask and loc arrays")
    n, _, H, W = x_shape
    if any(not np.issubdtype(v.dtype, np.number) for v in (patch, mask, loc)):
        raise EdgeError(f"patch_{name}.npz: patch, mask and loc must be numeric arrays")
    if patch.ndim != 3 or patch.shape[0] != x_shape[1] or 0 in patch.shape or mask.shape[-2:] != patch.shape[1:] \
            or loc.shape != (n, 2):
        raise EdgeError(f"patch_{name}.npz: shapes patch {patch.shape}, mask {mask.shape}, loc {loc.shape} do not "
                        f"fit {n} images")
    if not (np.isfinite(patch).all() and np.isfinite(mask).all()) or patch.min() < 0 or patch.max() > 1:
        raise EdgeError(f"patch_{name}.npz: patch pixels must be finite and in [0, 1]")
    ph, pw = patch.shape[1:]
    if not np.issubdtype(loc.dtype, np.integer) or (loc < 0).any() or (loc[:, 0] > H - ph).any() \
            or (loc[:, 1] > W - pw).any():
        raise EdgeError(f"patch_{name}.npz: patch locations outside the {H}x{W} images")
    return patch.astype(np.float32), mask, loc


# ---- certified inference (--certify, issue #37) ----------------------------------------------------------------------
# The bundle's mask set (masks.json, written by `qnn bundle --certify-patch-size`) and PyTorch's certified inference
# per image and CPU family (expected_certify.npz). The decisions below are copies of qnn/certify.py's (this file
# cannot import qnn; a test holds them equal). A masked pixel is 0.0 after normalisation: the model's mean in pixels,
# which the input quantizer maps exactly to its zero point, as in PyTorch.

MASKS_FORMAT = "qnn-mask-set-v1"
CERTIFY_METHODS = ("patchcleanser", "certmask")
#: the most masks a set may hold: PatchCleanser's CIFAR set has 36, and double masking certifies with N(N-1)/2
#: two-mask images per image beyond the N one-mask ones
MAX_MASKS = 1024


def _short(v) -> str:
    r = repr(v) if not isinstance(v, int) or abs(v) < 10 ** 30 else f"an integer of {len(str(abs(v)))} digits"
    return r if len(r) <= 60 else r[:57] + "..."


def _int_in(v, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise EdgeError(f"{what} must be an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def _int_pair(v, what: str, lo: int, his) -> tuple:
    if not isinstance(v, list) or len(v) != 2:
        raise EdgeError(f"{what} must be a list of 2 integers, got {_short(v)}")
    return tuple(_int_in(e, what, lo, hi) for e, hi in zip(v, his))


def mask_cover(rects: np.ndarray, image_size, patch_size) -> np.ndarray:
    """(L, N) bool: mask n holds the whole patch at location l (row-major over top-left corners); qnn's MaskSet.cover."""
    (H, W), (ph, pw) = image_size, patch_size
    u, v = np.arange(H - ph + 1)[:, None], np.arange(W - pw + 1)[:, None]
    rows = (rects[:, 0] <= u) & (rects[:, 1] >= u + ph)
    cols = (rects[:, 2] <= v) & (rects[:, 3] >= v + pw)
    return (rows[:, None, :] & cols[None, :, :]).reshape(-1, len(rects))


def load_mask_set(bundle: "Bundle", image_size) -> dict:
    """The bundle's mask set, every field checked: method, sizes, counts, every rect inside the images, and (for
    PatchCleanser, whose certificate needs it) every patch location inside some mask."""
    spec = bundle.manifest.get("certify")
    if spec is None:
        raise EdgeError("--certify: this bundle carries no mask set; build it with qnn bundle --certify-patch-size P "
                        "(--mask-positions K --method patchcleanser|certmask)")
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in ("masks", "expected")):
        raise EdgeError("manifest's 'certify' must name its 'masks' and 'expected' files")
    name = spec["masks"]
    try:
        m = json.loads(bundle.read(name))
    except (ValueError, RecursionError) as e:  # RecursionError: a hostile nesting depth
        raise EdgeError(f"{name}: unreadable JSON: {str(e)[:120]}") from None
    if not isinstance(m, dict) or m.get("format") != MASKS_FORMAT:
        raise EdgeError(f"{name}: not a mask set of format {MASKS_FORMAT!r}")
    H, W = (int(s) for s in image_size)
    if m.get("method") not in CERTIFY_METHODS:
        raise EdgeError(f"{name}: method must be one of {', '.join(CERTIFY_METHODS)}, got {_short(m.get('method'))}")
    if _int_pair(m.get("image_size"), f"{name}: image_size", 1, (H, W)) != (H, W):
        raise EdgeError(f"{name}: image_size {m['image_size']} is not the bundle's images' [{H}, {W}]")
    ph, pw = _int_pair(m.get("patch_size"), f"{name}: patch_size", 1, (H - 1, W - 1))
    _int_pair(m.get("positions"), f"{name}: positions", 2, (H, W))
    cov = _int_in(m.get("axis_coverage"), f"{name}: axis_coverage", 1, 1 if m["method"] == "patchcleanser"
                  else max(m["positions"]))
    rects = m.get("rects")
    if not isinstance(rects, list):
        raise EdgeError(f"{name}: rects must be a list of masks [y0, y1, x0, x1], got {_short(rects)}")
    if not 1 <= len(rects) <= MAX_MASKS:
        raise EdgeError(f"{name}: {len(rects)} rects; a mask set holds 1 to {MAX_MASKS} masks")
    _int_in(m.get("n_masks"), f"{name}: n_masks (the number of rects)", len(rects), len(rects))
    for i, r in enumerate(rects):
        if not isinstance(r, list) or len(r) != 4 or any(type(e) is not int for e in r):
            raise EdgeError(f"{name}: rect {i} must be 4 integers [y0, y1, x0, x1], got {_short(r)}")
        if not (0 <= r[0] < r[1] <= H and 0 <= r[2] < r[3] <= W):
            raise EdgeError(f"{name}: rect {i} {r} is not a non-empty [y0, y1, x0, x1] inside the {H}x{W} images")
    r = np.asarray(rects, dtype=np.int64)
    cover = mask_cover(r, (H, W), (ph, pw))
    lowest = int(cover.sum(1).min())
    if m["method"] == "patchcleanser" and lowest < 1:
        u, v = divmod(int(np.flatnonzero(~cover.any(1))[0]), W - pw + 1)
        raise EdgeError(f"{name}: no mask holds a {ph}x{pw} patch at ({u}, {v}): PatchCleanser's certificate "
                        f"would not hold")
    if "min_coverage" in m and m["min_coverage"] != lowest:
        raise EdgeError(f"{name}: min_coverage {_short(m['min_coverage'])} is not its rects' ({lowest})")
    masks = np.zeros((len(r), H, W), dtype=bool)
    for i, (y0, y1, x0, x1) in enumerate(r):
        masks[i, y0:y1, x0:x1] = True
    return {"file": name, "expected": spec["expected"], "method": m["method"], "patch_size": [ph, pw],
            "positions": list(m["positions"]), "axis_coverage": cov, "n_masks": len(r), "min_coverage": lowest,
            "masks": masks, "cover": cover}


def plurality(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(B, N) labels -> (B,) the most frequent, ties to the smallest label (qnn.certify.plurality)."""
    counts = (pred[..., None] == np.arange(num_classes)).sum(-2)
    return counts.argmax(-1)


def read_pairs(first: np.ndarray, num_classes: int, evaluate, chunk: int = 64) -> np.ndarray:
    """(B, N (N - 1) / 2) two-mask labels double masking reads, -1 for the others, each evaluated once by
    `evaluate(images, i, j)` (qnn.certify.read_pairs): every pair of an image whose first round agreed, a chunk at a
    time up to the first chunk that disagrees; else the rows of its disagreeing masks in order until one agrees."""
    B, N = first.shape
    i, j = np.triu_indices(N, 1)
    pairs = np.full((B, len(i)), -1, dtype=np.int64)
    pred = plurality(first, num_classes)
    split = first != pred[:, None]
    alive = np.flatnonzero(~split.any(1))
    for s in range(0, len(i), chunk):
        if not len(alive):
            break
        cols = np.arange(s, min(s + chunk, len(i)))
        img, col = np.repeat(alive, len(cols)), np.tile(cols, len(alive))
        pairs[img, col] = evaluate(img, i[col], j[col])
        alive = alive[(pairs[alive][:, cols] == pred[alive, None]).all(1)]
    index = np.full((N, N), -1, dtype=np.int64)  # (i, j) -> pair column, both orders
    index[i, j] = index[j, i] = np.arange(len(i))
    tried = np.zeros_like(split)
    pending = np.flatnonzero(split.any(1))
    while len(pending):
        left = split[pending] & ~tried[pending]
        pending = pending[left.any(1)]
        if not len(pending):
            break
        mask = (left[left.any(1)]).argmax(1)                       # each image's next disagreeing mask
        tried[pending, mask] = True
        row = index[mask][np.arange(N)[None, :] != mask[:, None]].reshape(len(pending), N - 1)
        img, col = np.repeat(pending, N - 1), row.reshape(-1)
        todo = pairs[img, col] < 0
        pairs[img[todo], col[todo]] = evaluate(img[todo], i[col[todo]], j[col[todo]])
        agrees = (pairs[pending[:, None], row] == first[pending, mask][:, None]).all(1)
        pending = pending[~agrees]
    return pairs


def pair_table(first: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(B, N, N) symmetric two-mask table: one-mask labels on the diagonal, np.triu_indices order, -1 where
    `read_pairs` left a pair out (qnn.certify)."""
    B, N = first.shape
    i, j = np.triu_indices(N, 1)
    t = np.empty((B, N, N), dtype=first.dtype)
    t[:, np.arange(N), np.arange(N)] = first
    t[:, i, j] = pairs
    t[:, j, i] = pairs
    return t


def double_masking(first: np.ndarray, table: np.ndarray, num_classes: int):
    """PatchCleanser's double masking (qnn.certify.double_masking): (prediction, certified, inference forwards)."""
    B, N = first.shape
    if table.shape != (B, N, N) or not (table[:, np.arange(N), np.arange(N)] == first).all():
        raise ValueError("table must be (B, N, N) with the one-mask predictions on its diagonal")
    pred = plurality(first, num_classes)
    forwards = np.full(B, N, dtype=np.int64)
    for b in range(B):
        done = np.zeros(N, dtype=bool)
        for i in np.flatnonzero(first[b] != pred[b]):
            done[i] = True
            if (table[b, i] == first[b, i]).all():
                pred[b] = first[b, i]
                break
        k = int(done.sum())
        forwards[b] += k * (N - 1) - k * (k - 1) // 2
    certified = (table == pred[:, None, None]).all((1, 2))
    return pred, certified, forwards


def one_round_vote(first: np.ndarray, cover: np.ndarray, num_classes: int):
    """The one-round vote and its worst-case certificate (qnn.certify.one_round_vote): (prediction, certified)."""
    pred = plurality(first, num_classes)
    onehot = (first[..., None] == np.arange(num_classes)).astype(np.int64)
    votes = np.einsum("ln,bnc->blc", cover.astype(np.int64), onehot)
    rival = votes + (cover.shape[1] - cover.sum(1))[None, :, None]
    own = np.take_along_axis(votes, pred[:, None, None], 2)
    labels = np.arange(num_classes)[None, None, :]
    holds = (own > rival) | ((own == rival) & (pred[:, None, None] < labels)) | (labels == pred[:, None, None])
    return pred, holds.all((1, 2))


def masked_labels(sess, x: np.ndarray, masks: np.ndarray, img: np.ndarray, a: np.ndarray, b: np.ndarray
                  ) -> np.ndarray:
    """(M,) ORT labels (first maximum, as torch's argmax) of the normalised images x[img[k]] with the union
    masks[a[k]] | masks[b[k]] set to 0.0, built a chunk of about 16 MB at a time."""
    per = max(1, (1 << 22) // x[0].size)
    out = np.empty(len(img), dtype=np.int64)
    for s in range(0, len(img), per):
        k = slice(s, s + per)
        xm = np.where((masks[a[k]] | masks[b[k]])[:, None], np.float32(0), x[img[k]])
        out[k] = run_batches(sess, xm).argmax(1)
    return out


def certify_np(sess, x: np.ndarray, ms: dict, num_classes: int):
    """(prediction, certified, inference forwards, certificate forwards) per image, as qnn.certify.certify: every
    masked image at most once (the one-mask ones, then for PatchCleanser the pairs `read_pairs` reads), in chunks
    of images."""
    masks, N = ms["masks"], ms["n_masks"]
    diag = np.arange(N)
    step = max(1, min(128, (1 << 24) // (N * N + ms["cover"].shape[0] * num_classes)))
    parts = []
    for s in range(0, len(x), step):
        xs = x[s:s + step]
        B = len(xs)
        first = masked_labels(sess, xs, masks, np.repeat(np.arange(B), N), np.tile(diag, B),
                              np.tile(diag, B)).reshape(B, N)
        if ms["method"] == "patchcleanser":
            pairs = read_pairs(first, num_classes, lambda img, a, b: masked_labels(sess, xs, masks, img, a, b))
            parts.append((*double_masking(first, pair_table(first, pairs), num_classes), N + (pairs >= 0).sum(1)))
        else:
            p, c = one_round_vote(first, ms["cover"], num_classes)
            parts.append((p, c, np.full(B, N, dtype=np.int64), np.full(B, N, dtype=np.int64)))
    return tuple(np.concatenate([q[k] for q in parts]) for k in range(4))


def defended_inference(sess, x1: np.ndarray, ms: dict, num_classes: int) -> tuple:
    """The deployed defended prediction of one normalised image (3, H, W) and its masked forwards: the one-mask
    images in one batch, then (PatchCleanser) each disagreeing mask's second round in mask order, running only the
    pairs no earlier round ran, until one agrees. What a device does per image; `certify_np` checks it."""
    masks = ms["masks"]
    N = len(masks)
    first = run_batches(sess, np.where(masks[:, None], np.float32(0), x1[None])).argmax(1)
    pred, forwards = int(plurality(first[None], num_classes)[0]), N
    if ms["method"] != "patchcleanser":
        return pred, forwards
    seen: dict = {}  # (i, j), i < j: the two-mask label
    for i in np.flatnonzero(first != pred):
        todo = [j for j in range(N) if j != i and (min(i, j), max(i, j)) not in seen]
        if todo:
            xm = np.where((masks[i] | masks[todo])[:, None], np.float32(0), x1[None])
            seen.update({(min(i, j), max(i, j)): int(v) for j, v in zip(todo, run_batches(sess, xm).argmax(1))})
            forwards += len(todo)
        if all(seen[(min(i, j), max(i, j))] == first[i] for j in range(N) if j != i):
            return int(first[i]), forwards
    return pred, forwards


def _expected_certificates(z: dict, name: str, key: str, n: int, ms: dict, num_classes: int) -> tuple:
    """PyTorch's (prediction, certified, inference forwards) per image for this family, checked."""
    N = ms["n_masks"]
    top = N + (N * (N - 1) // 2 if ms["method"] == "patchcleanser" else 0)
    out = []
    for k, kind, lo, hi in (("pred", "int", 0, num_classes - 1), ("certified", "bool", 0, 1),
                            ("inference_forwards", "int", N, top)):
        v = z.get(f"{key}{k}")
        ok = v is not None and v.shape == (n,) and (v.dtype == np.bool_ if kind == "bool"
                                                    else np.issubdtype(v.dtype, np.integer))
        if not ok or (kind == "int" and n and (v.min() < lo or v.max() > hi)):
            raise EdgeError(f"{name}: '{key}{k}' missing or not one {kind} per image"
                            + (f" in [{lo}, {hi}]" if kind == "int" else ""))
        out.append(v.astype(np.int64) if kind == "int" else v)
    return tuple(out)


def run_certify(sess, bundle: "Bundle", ms: dict, x: np.ndarray, y: np.ndarray, key: str, num_classes: int,
                timed: int) -> dict:
    """The certified inference with ORT, compared image by image with PyTorch's; the defended inference's latency
    per image over `timed` images after one warm-up (none when 0)."""
    name = ms["expected"]
    e_pred, e_cert, e_fw = _expected_certificates(bundle.npz(name), name, key, len(y), ms, num_classes)
    pred, cert, fw, cfw = certify_np(sess, x, ms, num_classes)
    differ = (pred != e_pred) | (cert != e_cert) | (fw != e_fw)
    N = ms["n_masks"]
    res = {"method": ms["method"], "masks_file": ms["file"], "patch_size": ms["patch_size"],
           "positions": ms["positions"], "axis_coverage": ms["axis_coverage"], "n_masks": N,
           "min_coverage": ms["min_coverage"], "n_images": int(len(y)),
           "clean_acc_pct": 100.0 * float((pred == y).mean()),
           "certified_acc_pct": 100.0 * float((cert & (pred == y)).mean()),
           "expected_clean_acc_pct": 100.0 * float((e_pred == y).mean()),
           "expected_certified_acc_pct": 100.0 * float((e_cert & (e_pred == y)).mean()),
           "forwards_per_image_certify": float(cfw.mean()),
           "forwards_per_image_certify_worst": N + (N * (N - 1) // 2 if ms["method"] == "patchcleanser" else 0),
           "forwards_per_image_inference_mean": float(fw.mean()),
           "pred_equal": int((pred == e_pred).sum()), "certified_equal": int((cert == e_cert).sum()),
           "forwards_equal": int((fw == e_fw).sum()), "n_differ": int(differ.sum()),
           "differing_images": [int(i) for i in np.flatnonzero(differ)[:20]],
           "predictions": pred.tolist(), "certified": "".join("1" if c else "0" for c in cert)}
    if timed:
        k = min(timed, len(x))
        defended_inference(sess, x[0], ms, num_classes)  # warm-up
        ts, lazy_ok = [], 0
        for i in range(k):
            t0 = time.perf_counter()
            p, f = defended_inference(sess, x[i], ms, num_classes)
            ts.append((time.perf_counter() - t0) * 1e3)
            lazy_ok += int(p == pred[i] and f == fw[i])
        ts = np.array(ts)
        res["latency"] = {"images": k, "warmup_images": 1, "mean_ms": float(ts.mean()),
                          "p50_ms": float(np.percentile(ts, 50)), "p90_ms": float(np.percentile(ts, 90)),
                          "max_ms": float(ts.max()), "forwards_mean": float(fw[:k].mean()),
                          "note": "one image at a time: masking (numpy), the one-mask batch, then the second rounds "
                                  "it needs"}
        # the per-image inference a device deploys must decide as the batched certification did
        res["inference_agrees"] = lazy_ok
        res["inference_checked"] = k
    res["pass"] = res["n_differ"] == 0 and res.get("inference_agrees") == res.get("inference_checked")
    return res


def _print_certify(c: dict, fam: str) -> None:
    n = c["n_images"]
    print(f"\ncertify  : {c['method']}, {c['n_masks']} masks for a {c['patch_size'][0]}x{c['patch_size'][1]} patch "
          f"({c['positions'][0]}x{c['positions'][1]} positions"
          + (f", axis coverage {c['axis_coverage']}" if c["method"] == "certmask" else "")
          + f"), {c['forwards_per_image_certify']:.1f} masked images per image to certify (mean; "
          f"{c['forwards_per_image_certify_worst']} at most), "
          f"{c['forwards_per_image_inference_mean']:.1f} per defended inference (mean)")
    print("\n| metric | PyTorch | integer (ORT) |\n|---|---|---|")
    print(f"| defended clean accuracy % | {c['expected_clean_acc_pct']:.2f} | {c['clean_acc_pct']:.2f} |")
    print(f"| certified accuracy % | {c['expected_certified_acc_pct']:.2f} | {c['certified_acc_pct']:.2f} |")
    same = n - c["n_differ"]
    print(f"\ncertificates: {same}/{n} images equal to PyTorch's ({fam}): predictions {c['pred_equal']}/{n}, "
          f"certificates {c['certified_equal']}/{n}, forwards {c['forwards_equal']}/{n}"
          + (f"; {c['n_differ']} image(s) differ: {c['differing_images']}" if c["n_differ"] else ""))
    if "latency" in c:
        lt = c["latency"]
        print(f"defended : {lt['p50_ms']:.3f} ms p50 per image (mean {lt['mean_ms']:.3f}, p90 {lt['p90_ms']:.3f}; "
              f"{lt['forwards_mean']:.1f} forwards; {lt['images']} images after {lt['warmup_images']} warm-up); "
              f"the per-image inference decides as the batched one on {c['inference_agrees']}/"
              f"{c['inference_checked']}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage block
        raise EdgeError(f"{message} (see --help)")


def main(argv=None) -> int:
    ap = _Parser(description="Run a qnn edge bundle with ONNX Runtime (integer model).")
    ap.add_argument("--bundle", required=True, help="bundle folder written by qnn bundle (manifest.json inside)")
    ap.add_argument("--threads", default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--batch", type=int, default=32, help="larger batch for latency/throughput (batch 1 always runs)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs before each latency measurement")
    ap.add_argument("--iters", type=int, default=50, help="timed runs at batch 1 (half as many at --batch)")
    ap.add_argument("--tolerance", type=float, help="override the bundle's accuracy/ASR tolerance (points, 0-100)")
    ap.add_argument("--skip-latency", action="store_true", help="correctness only (e.g. under emulation)")
    ap.add_argument("--save-logits", help="write the integer logits and the inputs that produced them (npz: <set>, "
                                          "input_<set>) for cross-platform comparison")
    ap.add_argument("--certify", action="store_true",
                    help="also run the certified inference with the bundle's mask set (qnn bundle "
                         "--certify-patch-size) and check each image's prediction and certificate against PyTorch's")
    ap.add_argument("--certify-latency-images", type=int, default=10,
                    help="images the defended inference is timed on, one at a time after a warm-up (default 10; "
                         "--skip-latency skips it)")
    ap.add_argument("--json", help="write the result JSON here")
    try:
        return _run(ap.parse_args(argv))
    except EdgeError as e:
        print(f"run_edge: error: {e}", file=sys.stderr)
        return 2


def _run(a) -> int:
    try:
        threads = int(a.threads) if a.threads is not None else (os.cpu_count() or 1)
    except ValueError:
        raise EdgeError(f"--threads must be a positive integer, got {a.threads!r}") from None
    if threads <= 0 or threads > 1024:
        raise EdgeError(f"--threads must be in 1..1024, got {threads}")
    if a.batch <= 0 or a.iters <= 0 or a.warmup < 0:
        raise EdgeError(f"--batch and --iters must be > 0 and --warmup >= 0, got {a.batch}, {a.iters}, {a.warmup}")
    if not 1 <= a.certify_latency_images <= 100000:
        raise EdgeError(f"--certify-latency-images must be in 1..100000, got {a.certify_latency_images}")
    bundle = Bundle(a.bundle)
    if a.certify and bundle.manifest.get("certify") is None:
        load_mask_set(bundle, (0, 0))  # refuses, saying how to build one
    for path, what in ((a.json, "--json"), (a.save_logits, "--save-logits")):
        if path:
            check_output_path(path, bundle, what)
    man = bundle.manifest
    exp = bundle.json(man["expected"])
    _check_expected(exp, man["expected"])
    tol = _number(a.tolerance if a.tolerance is not None else exp.get("tolerance_pct", 0.5), "tolerance", 0.0, 100.0)
    model, weights = bundle.read(man["model"]), packed_weights(bundle)
    sess = make_session(model, threads, weights=weights)
    meta = sess.get_modelmeta().custom_metadata_map
    risk = int8_saturation_risk(meta, cpu_report())
    if risk:
        raise EdgeError(risk)
    bits = weight_bits(meta, bundle)
    if exp.get("bits") != bits:
        raise EdgeError(f"{man['expected']} gives figures for {exp.get('bits')}-bit, but the model's weights are "
                        f"{bits}-bit: they are not this model's")
    try:
        norm = json.loads(meta.get("input_normalisation", "{}"))
        mean, std = (np.asarray(norm[k], np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    except (ValueError, KeyError, TypeError):
        raise EdgeError("model metadata has no valid input_normalisation (a mean and std per channel)") from None
    ev = bundle.npz(man["eval"])
    x_u8, y = ev.get("x"), ev.get("y")
    if x_u8 is None or y is None or x_u8.dtype != np.uint8 or x_u8.ndim != 4 or y.ndim != 1 \
            or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x_u8) or len(y) == 0 or y.min() < 0:
        raise EdgeError(f"{man['eval']}: needs uint8 images x (NHWC) and one integer label y per image")
    y = y.astype(np.int64)
    in_shape = sess.get_inputs()[0].shape
    if len(x_u8.shape) != 4 or list(in_shape[1:]) != [x_u8.shape[3], x_u8.shape[1], x_u8.shape[2]]:
        raise EdgeError(f"model input shape {in_shape} disagrees with the bundled data {list(x_u8.shape)} (NHWC)")
    if mean.shape[1] != x_u8.shape[3] or std.shape[1] != x_u8.shape[3]:
        raise EdgeError(f"model metadata normalises {mean.shape[1]} / {std.shape[1]} channels (mean / std), the images "
                        f"have {x_u8.shape[3]}")
    x01 = x_u8.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    x = ((x01 - mean) / std).astype(np.float32)
    masks = load_mask_set(bundle, x.shape[2:]) if a.certify else None
    census = executed_ops(model, x[:2], weights)
    logits = run_batches(sess, x)
    n_cls = exp.get("num_classes") or int(y.max()) + 1
    if logits.ndim != 2 or logits.shape[0] != len(y) or logits.shape[1] != n_cls or logits.shape[1] <= y.max():
        raise EdgeError(f"model output shape {list(logits.shape)} does not fit {len(y)} images of {n_cls} classes")
    pred = logits.argmax(1)
    exp_pred = bundle.npz("expected_predictions.npz")
    fam, key, clean_ref, asr_ref = expectations(exp)
    res = {"bundle": bundle.dir, "platform": cpu_report(), "threads": threads,
           "optimisation_level": "ORT_ENABLE_EXTENDED", "model_bytes": len(model),
           "bits": bits, "n_images": int(len(y)), "graph": census, "tolerance_pct": tol,
           "expected_for_cpu_family": fam}
    acc_int = 100.0 * float((pred == y).mean())
    rows = [("clean accuracy %", clean_ref, acc_int,
             100.0 * float((pred == _expected(exp_pred, f"{key}clean", len(y))).mean()))]
    all_logits = {"clean": logits, "input_clean": x}
    for name, e in exp["patches"].items():
        z = bundle.npz(f"patch_{name}.npz")
        xp01 = apply_patch(x01, *_checked_patch(name, z, x01.shape))
        xp = ((xp01 - mean) / std).astype(np.float32)
        lp = run_batches(sess, xp)
        all_logits[f"patch_{name}"], all_logits[f"input_patch_{name}"] = lp, xp
        ap_ = lp.argmax(1)
        rows.append((f"ASR % [{name}]", asr_ref[name], asr(pred, ap_, y, e["targeted"], e["target_class"]),
                     100.0 * float((ap_ == _expected(exp_pred, f"{key}patch_{name}", len(y))).mean())))
    res["comparison"] = [{"metric": r[0], "fake_quant": r[1], "integer": r[2], "top1_agreement_pct": r[3],
                          "abs_diff": abs(r[1] - r[2])} for r in rows]
    if a.save_logits:
        _write_atomic(a.save_logits, lambda f: np.savez(f, **all_logits))
    if not a.skip_latency:
        res["latency"] = [latency(sess, x, 1, a.warmup, a.iters), latency(sess, x, a.batch, max(2, a.warmup // 2), max(5, a.iters // 2))]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res["peak_rss_mb"] = peak / 1024.0 if sys.platform != "darwin" else peak / 2**20
    if EXPECTED_LOGITS in man["files"]:
        got = {k: v for k, v in all_logits.items() if not k.startswith("input_")}
        res["logits_identical"] = compare_logits(got, bundle.npz(EXPECTED_LOGITS), key)
    if masks is not None:
        res["certify"] = run_certify(sess, bundle, masks, x, y, key, logits.shape[1],
                                     0 if a.skip_latency else a.certify_latency_images)
    ok = census["fully_integer"] and all(c["abs_diff"] <= tol for c in res["comparison"]) \
        and all(v == len(y) for v in res.get("logits_identical", {}).values()) \
        and res.get("certify", {}).get("pass", True)
    res["pass"] = ok

    p = res["platform"]
    print(f"device   : {p['cpu_model']} ({p['machine']}, {p['n_cpus']} cpus, flags: {' '.join(p['isa_flags']) or '-'})"
          + (f" [emulated {p['qemu_cpu']}]" if p["qemu_cpu"] else ""))
    print(f"runtime  : onnxruntime {p['onnxruntime']}, {res['optimisation_level']}, {threads} threads, python {p['python']}")
    print(f"expected : fake-quant figures for {fam}'s arithmetic")
    print(f"model    : {res['model_bytes'] / 1024:.1f} KiB, {res['bits']}-bit weights/activations (int8 kernels"
          f"{', weights packed' if weights else ''})")
    print(f"graph    : {'fully integer' if census['fully_integer'] else 'FLOAT OPS: ' + ', '.join(census['float_compute_ops'])}"
          f" ({', '.join(f'{k} x{v}' for k, v in sorted(census['executed_ops'].items()))})")
    print("\n| metric | fake-quant | integer (ORT) | top-1 agreement % | |diff| |\n|---|---|---|---|---|")
    for c in res["comparison"]:
        print(f"| {c['metric']} | {c['fake_quant']:.2f} | {c['integer']:.2f} | {c['top1_agreement_pct']:.2f} | {c['abs_diff']:.2f} |")
    if "latency" in res:
        print("\n| batch | p50 ms | p90 ms | p99 ms | images/s |\n|---|---|---|---|---|")
        for l in res["latency"]:
            print(f"| {l['batch']} | {l['p50_ms']:.3f} | {l['p90_ms']:.3f} | {l['p99_ms']:.3f} | {l['throughput_img_s']:.1f} |")
    if "logits_identical" in res:
        n = res["n_images"]
        print("\nlogits   : " + ", ".join(f"{k} {v}/{n} bit-identical" for k, v in res["logits_identical"].items())
              + f" to the fake-quant model's ({fam})")
    else:
        print("\nlogits   : the bundle carries no reference logits (built by an earlier version): not compared")
    if "certify" in res:
        _print_certify(res["certify"], fam)
    print(f"\npeak RSS {res['peak_rss_mb']:.1f} MB; tolerance {tol} points: {'PASS' if ok else 'FAIL'}")
    if a.json:
        _write_atomic(a.json, lambda f: f.write(json.dumps(res, indent=2).encode()))
    return 0 if ok else 1


def _write_atomic(path: str, write) -> None:
    """Write beside, then rename into place: an earlier file survives a crash mid-write."""
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".run_edge.", suffix=".tmp")
    except OSError as e:
        raise EdgeError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, read-only: one line, the earlier file unchanged
            raise EdgeError(f"cannot write {path}: {e.strerror or e}") from None
        raise


if __name__ == "__main__":
    sys.exit(main())

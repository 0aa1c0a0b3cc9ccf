#!/usr/bin/env python3
"""Run an edge bundle on this device (Raspberry Pi 4/5 with a 64-bit OS, or any CPU) with ONNX Runtime.

Imports only the Python standard library, numpy and onnxruntime; Python 3.9+.

    python3 run_edge.py --bundle BUNDLE_DIR [--threads 4] [--batch 32] [--json result.json]

Checks the bundle's sha256 manifest, prints the CPU (model, architecture, ISA flags such as asimddp / i8mm /
avx512_vnni), onnxruntime version and optimisation level, checks from ORT's own profile that every executed compute
node is an integer kernel, measures latency (p50/p90/p99 after warm-up) at batch 1 and --batch, throughput, peak RSS,
model size, then integer accuracy and patch ASR on the bundled images, and compares them with the fake-quant
figures the bundle carries. Exits 1 when they differ by more than the tolerance or the graph is not integer,
2 on bad input.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

INTEGER_KERNELS = {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm", "QLinearMatMul", "MatMulInteger",
                   "ConvInteger", "QLinearAveragePool", "QLinearMul", "QLinearConcat"}
MOVEMENT = {"Clip", "Slice", "Pad", "Flatten", "Reshape", "MaxPool", "Identity", "Transpose", "Squeeze", "Unsqueeze",
            "Concat", "Shape", "Gather", "QuantizeLinear", "DequantizeLinear", "MemcpyFromHost", "MemcpyToHost"}


class EdgeError(Exception):
    pass


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_bundle(d: str) -> dict:
    if not os.path.isdir(d):
        raise EdgeError(f"bundle dir not found: {d}")
    mp = os.path.join(d, "manifest.json")
    if not os.path.isfile(mp):
        raise EdgeError(f"{d}: not a bundle (no manifest.json)")
    try:
        man = json.load(open(mp))
    except ValueError as e:
        raise EdgeError(f"{mp}: unreadable manifest: {e}") from None
    for f, h in man.get("files", {}).items():
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            raise EdgeError(f"bundle file missing: {f}")
        if sha256(p) != h:
            raise EdgeError(f"sha256 of {f} does not match the manifest (tampered or corrupt)")
    return man


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


def make_session(model_path: str, threads: int, profile: bool = False):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "edge")
    try:
        return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EdgeError(f"{model_path}: onnxruntime cannot load the model: {str(e).splitlines()[0][:160]}") from None


def executed_ops(model_path: str, x: np.ndarray) -> dict:
    """Op types ORT actually executed (from its profiler), and the float compute ops among them."""
    s = make_session(model_path, 1, profile=True)
    s.run(None, {s.get_inputs()[0].name: x})
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
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
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
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run a qnn edge bundle with ONNX Runtime (integer model).")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--batch", type=int, default=32, help="larger batch for latency/throughput (batch 1 always runs)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tolerance", type=float, help="override the bundle's accuracy/ASR tolerance (points)")
    ap.add_argument("--skip-latency", action="store_true", help="correctness only (e.g. under emulation)")
    ap.add_argument("--save-logits", help="write integer logits (npz) for cross-platform comparison")
    ap.add_argument("--json", help="write the result JSON here")
    a = ap.parse_args(argv)
    try:
        return _run(a)
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
    if a.batch <= 0:
        raise EdgeError(f"--batch must be > 0, got {a.batch}")
    d = a.bundle
    man = check_bundle(d)
    exp = json.load(open(os.path.join(d, man["expected"])))
    tol = a.tolerance if a.tolerance is not None else float(exp.get("tolerance_pct", 0.5))
    model_path = os.path.join(d, man["model"])
    sess = make_session(model_path, threads)
    meta = sess.get_modelmeta().custom_metadata_map
    norm = json.loads(meta.get("input_normalisation", "{}"))
    with np.load(os.path.join(d, man["eval"]), allow_pickle=False) as z:
        x_u8, y = z["x"], z["y"].astype(np.int64)
    in_shape = sess.get_inputs()[0].shape
    if len(x_u8.shape) != 4 or list(in_shape[1:]) != [x_u8.shape[3], x_u8.shape[1], x_u8.shape[2]]:
        raise EdgeError(f"model input shape {in_shape} disagrees with the bundled data {list(x_u8.shape)} (NHWC)")
    x = normalise(x_u8, norm["mean"], norm["std"])
    x01 = x_u8.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    census = executed_ops(model_path, x[:2])
    logits = run_batches(sess, x)
    pred = logits.argmax(1)
    with np.load(os.path.join(d, "expected_predictions.npz"), allow_pickle=False) as z:
        exp_pred = {k: z[k] for k in z.files}
    res = {"bundle": os.path.abspath(d), "platform": cpu_report(), "threads": threads,
           "optimisation_level": "ORT_ENABLE_EXTENDED", "model_bytes": os.path.getsize(model_path),
           "bits": exp["bits"], "n_images": int(len(y)), "graph": census, "tolerance_pct": tol}
    acc_int = 100.0 * float((pred == y).mean())
    rows = [("clean accuracy %", exp["clean_acc_pct"], acc_int, 100.0 * float((pred == exp_pred["clean"]).mean()))]
    all_logits = {"clean": logits}
    for name, e in exp["patches"].items():
        with np.load(os.path.join(d, f"patch_{name}.npz"), allow_pickle=False) as z:
            xp01 = apply_patch(x01, z["patch"], z["mask"], z["loc"])
        m = np.asarray(norm["mean"], np.float32).reshape(1, 3, 1, 1)
        s = np.asarray(norm["std"], np.float32).reshape(1, 3, 1, 1)
        lp = run_batches(sess, ((xp01 - m) / s).astype(np.float32))
        all_logits[f"patch_{name}"] = lp
        ap_ = lp.argmax(1)
        rows.append((f"ASR % [{name}]", e["asr_pct"], asr(pred, ap_, y, e["targeted"], e["target_class"]),
                     100.0 * float((ap_ == exp_pred[f"patch_{name}"]).mean())))
    res["comparison"] = [{"metric": r[0], "fake_quant": r[1], "integer": r[2], "top1_agreement_pct": r[3],
                          "abs_diff": abs(r[1] - r[2])} for r in rows]
    if a.save_logits:
        np.savez(a.save_logits, **all_logits)
    if not a.skip_latency:
        res["latency"] = [latency(sess, x, 1, a.warmup, a.iters), latency(sess, x, a.batch, max(2, a.warmup // 2), max(5, a.iters // 2))]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res["peak_rss_mb"] = peak / 1024.0 if sys.platform != "darwin" else peak / 2**20
    ok = census["fully_integer"] and all(c["abs_diff"] <= tol for c in res["comparison"])
    res["pass"] = ok

    p = res["platform"]
    print(f"device   : {p['cpu_model']} ({p['machine']}, {p['n_cpus']} cpus, flags: {' '.join(p['isa_flags']) or '-'})"
          + (f" [emulated {p['qemu_cpu']}]" if p["qemu_cpu"] else ""))
    print(f"runtime  : onnxruntime {p['onnxruntime']}, {res['optimisation_level']}, {threads} threads, python {p['python']}")
    print(f"model    : {res['model_bytes'] / 1024:.1f} KiB, {exp['bits']}-bit weights/activations (int8 kernels)")
    print(f"graph    : {'fully integer' if census['fully_integer'] else 'FLOAT OPS: ' + ', '.join(census['float_compute_ops'])}"
          f" ({', '.join(f'{k} x{v}' for k, v in sorted(census['executed_ops'].items()))})")
    print(f"\n| metric | fake-quant | integer (ORT) | top-1 agreement % | |diff| |\n|---|---|---|---|---|")
    for c in res["comparison"]:
        print(f"| {c['metric']} | {c['fake_quant']:.2f} | {c['integer']:.2f} | {c['top1_agreement_pct']:.2f} | {c['abs_diff']:.2f} |")
    if "latency" in res:
        print("\n| batch | p50 ms | p90 ms | p99 ms | images/s |\n|---|---|---|---|---|")
        for l in res["latency"]:
            print(f"| {l['batch']} | {l['p50_ms']:.3f} | {l['p90_ms']:.3f} | {l['p99_ms']:.3f} | {l['throughput_img_s']:.1f} |")
    print(f"\npeak RSS {res['peak_rss_mb']:.1f} MB; tolerance {tol} points: {'PASS' if ok else 'FAIL'}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, a.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

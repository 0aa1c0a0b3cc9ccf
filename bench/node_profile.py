"""Where an integer model's time goes: ONNX Runtime's profiler per op type, and the share of the int8 GEMM peak the
whole model and its convolutions alone reach.

    python bench/node_profile.py [--models resnet20,resnet18] [--bits 8] [--batch 32] [--threads 2]

The model is the default export (`qnn export --format int`) of a zoo model with random weights (latency does not
depend on their values). ORT (ORT_ENABLE_ALL, as a deployment runs it) runs --runs batches with its profiler on;
each op type's kernel time per batch is summed over its nodes. The share of peak is MACs per batch / time / the MAC
rate of a large QLinearConv on this CPU (`bench/latency.py:int8_peak`, timed in the same rounds as the model): for
the whole run (wall time without the profiler) and for the QLinearConv / QGemm kernels alone, so that what the
convolutions lose and what the rest costs are told apart. Writes {--out}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, interleaved_ms, markdown_table, write_results  # noqa: E402
from qnn.bench.latency import PEAK_KERNEL, count_macs, int8_peak  # noqa: E402

#: the op types that do the multiply-accumulates
MAC_OPS = ("QLinearConv", "QGemm", "QLinearMatMul")


def op_times(session, x, runs: int, warmup: int = 3) -> tuple[dict[str, float], dict[str, int]]:
    """Kernel ms per batch and node count of each op type, from ORT's profile of `runs` batches after `warmup`
    (the profile covers the session's whole life: only nodes inside the last `runs` model runs count)."""
    import os

    for _ in range(warmup + runs):
        session.run(None, {"input": x})
    prof = session.end_profiling()
    us: dict[str, float] = {}
    nodes: dict[str, set] = {}
    with open(prof) as f:
        events = json.load(f)
    os.unlink(prof)
    timed = sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in events if ev.get("name") == "model_run")[-runs:]
    if len(timed) != runs:
        raise RuntimeError(f"ORT's profile shows {len(timed)} model runs, expected at least {runs}")
    for ev in events:
        a = ev.get("args", {})
        if ev.get("cat") == "Node" and "op_name" in a and ev.get("name", "").endswith("_kernel_time") \
                and any(t0 <= ev["ts"] <= t1 for t0, t1 in timed):
            us[a["op_name"]] = us.get(a["op_name"], 0.0) + ev["dur"]
            nodes.setdefault(a["op_name"], set()).add(ev["name"])
    return {k: v / runs / 1e3 for k, v in us.items()}, {k: len(v) for k, v in nodes.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet18", help="zoo models, comma-separated (default resnet20,resnet18)")
    ap.add_argument("--bits", type=int, default=8, help="bit-width of the export (default 8)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--runs", type=int, default=20, help="profiled batches (default 20; a quarter for 224x224)")
    ap.add_argument("--out", default="results/node_profile", help="output path without extension")
    a = ap.parse_args(argv)
    if a.bits not in range(2, 9) or a.batch < 1 or a.threads < 1 or a.runs < 1:
        print("node_profile: error: --bits must be 2..8 and --batch, --threads, --runs positive", file=sys.stderr)
        return 2
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    from qnn.export.onnx_export import export_model
    from qnn.layers import ensure_calibrated_, precision
    from qnn.models import create_model

    warnings.filterwarnings("ignore")
    peak_run, peak_macs = int8_peak(a.threads)
    report, rows = {}, []
    with tempfile.TemporaryDirectory() as td:
        for name in a.models.split(","):
            torch.manual_seed(0)
            model = create_model(name)
            size = model.in_size
            with precision(model, a.bits):
                ensure_calibrated_(model, torch.rand(8, model.in_channels, size, size))
            with precision(model, 32):  # the float forward runs the layers (hooks); same shapes
                macs = count_macs(model.eval(), size) * a.batch
            path = export_model(model, a.bits, "int", Path(td) / f"{name}.onnx")
            x = np.random.default_rng(0).standard_normal((a.batch, model.in_channels, size, size)).astype(np.float32)
            sessions = {}
            for profile in (False, True):
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                so.enable_profiling = profile
                so.profile_file_prefix = str(Path(td) / name)
                sessions[profile] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            runs = a.runs if size <= 64 else max(3, a.runs // 4)
            t = interleaved_ms({"model": lambda: sessions[False].run(None, {"input": x}), "peak": peak_run}, 3, runs)
            wall_ms, peak = t["model"], peak_macs / (t["peak"] / 1e3)
            ms, count = op_times(sessions[True], x, runs)
            node_ms = sum(ms.values())
            mac_ms = sum(v for k, v in ms.items() if k in MAC_OPS)
            r = {"macs_per_batch": macs, "wall_ms": wall_ms, "int8_peak_mac_per_s": peak, "node_ms": node_ms,
                 "op_ms": ms, "op_nodes": count,
                 "share_of_peak_wall": macs / (wall_ms / 1e3) / peak,
                 "share_of_peak_mac_ops": macs / (mac_ms / 1e3) / peak,
                 "outside_nodes_ms": wall_ms - node_ms}
            report[name] = r
            for k in sorted(ms, key=ms.get, reverse=True):
                rows.append([name, k, count[k], f"{ms[k]:.2f}", f"{100 * ms[k] / node_ms:.1f}%"])
            rows.append([name, "(wall - kernels: scheduling, threads)", "", f"{r['outside_nodes_ms']:.2f}", ""])
            print(f"{name}: wall {wall_ms:.2f} ms per batch, kernels {node_ms:.2f} ms, share of int8 peak "
                  f"{100 * r['share_of_peak_wall']:.0f}% (MAC kernels alone {100 * r['share_of_peak_mac_ops']:.0f}%)",
                  flush=True)
    command = command_line("bench/node_profile.py", argv)
    summary = markdown_table(["model", "wall ms", "GMAC/s", "int8 peak GMAC/s", "share of int8 peak",
                              "MAC kernels' share of peak", "MAC kernels' ms",
                              "other kernels' ms"],
                             [[n, f"{r['wall_ms']:.2f}", f"{r['macs_per_batch'] / r['wall_ms'] / 1e6:.1f}",
                               f"{r['int8_peak_mac_per_s'] / 1e9:.1f}",
                               f"{100 * r['share_of_peak_wall']:.0f}%",
                               f"{100 * r['share_of_peak_mac_ops']:.0f}%",
                               f"{sum(v for k, v in r['op_ms'].items() if k in MAC_OPS):.2f}",
                               f"{sum(v for k, v in r['op_ms'].items() if k not in MAC_OPS):.2f}"]
                              for n, r in report.items()])
    md = (f"Where the time goes: default integer export at {a.bits} bits, batch {a.batch}, {a.threads} threads, ORT "
          f"profiler (ms per batch). Int8 peak: {PEAK_KERNEL}, timed in the same rounds as "
          f"the model (wall ms). "
          f"Command: `{command}`\n\n" + summary + "\n\n"
          + markdown_table(["model", "op type", "nodes", "ms per batch", "share of kernel time"], rows))
    write_results(a.out, {"command": command, "models": report, "config": vars(a),
                          "threads": a.threads}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

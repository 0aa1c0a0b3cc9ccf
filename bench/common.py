"""Helpers shared by benchmark programs: environment record (git SHA, versions, CPU, ISA flags), table output."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from qnn.outputs import markdown_table  # noqa: F401  (re-exported: the benchmarks' table format)


def cpu_info() -> dict:
    model, flags = platform.processor() or "", []
    try:
        txt = Path("/proc/cpuinfo").read_text()
        for line in txt.splitlines():
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k in ("model name", "cpu model") and not model:
                model = v.strip()
            if k in ("flags", "features") and not flags:
                flags = v.split()
    except OSError:
        pass
    interesting = [f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx512vnni", "amx_int8", "amx_tile",
                                              "asimd", "asimddp", "i8mm", "sve", "bf16", "avx_vnni")]
    return {"cpu_model": model, "machine": platform.machine(), "isa_flags": interesting, "n_cpus": os.cpu_count()}


def environment(threads: int | None = None) -> dict:
    from qnn.train import versions

    import onnx

    return {**versions(), "onnx": onnx.__version__, **cpu_info(), "threads": threads}


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran `script` with `argv` (None: this process' arguments), as a results file records it."""
    import shlex
    import sys

    return f"python {script} " + shlex.join(sys.argv[1:] if argv is None else argv)


def interleaved_ms(fns: dict, warmup: int, rounds: int, settle: int = 1, pause_s: float = 0.05) -> dict[str, float]:
    """Median ms of each callable, timed in rounds that run every callable in turn, in rotating order: peers measured
    this way see the same machine state (clock, neighbours), so their ratios hold on a noisy machine.

    Each turn first sleeps `pause_s`, so that the previous callable's thread pool has stopped spinning (ONNX
    Runtime's idle workers spin after a run and take cores from whatever runs next: measured here, a 1024^3 GEMM
    read 16-19 ms after a model's run and 10 ms after a 50 ms pause), then runs the callable `settle` times untimed,
    so that its timed run finds its own data in the caches, as a deployment running one model does."""
    import statistics
    import time

    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(pause_s)
            for _ in range(settle):
                fns[n]()
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def write_results(out: str, payload: dict, md: str) -> None:
    """Print the markdown and write {out}.json (payload + environment) and {out}.md, each atomically."""
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json

    print(md)
    atomic_write_json(out + ".json", {**payload, "environment": environment(payload.get("threads"))})
    atomic_write_bytes(out + ".md", md.encode())


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

"""Time of one training step (batch 128) of a zoo model (ResNet-20 by default) for float and for fake-quant QAT at 8,
4 and 2 bits, measured in one run with the precisions interleaved, and the ratio fake-quant / float. Target: ratio <= 1.25 at every bit-width.

    python bench/train_speed.py --threads 2 [--compile] [--model mobilenetv2_cifar]
    python bench/train_speed.py --device cuda --profile   # on a GPU; --profile adds the 4-bit step's top operators

Warm-up steps first (scale init, allocator), then the median of timed steps. Writes results/train_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import environment, markdown_table  # noqa: E402


def step_times(models: dict, x, y, warmup: int, iters: int, compile_: bool, sync=lambda: None) -> dict[int, float]:
    """Median ms of one training step of each {bits: model}, the precisions interleaved step by step (after `warmup`
    steps of each) so that machine drift during the run reaches every precision alike."""
    import torch
    import torch.nn.functional as F

    from qnn.layers import remember_init_
    from qnn.train import init_scales_

    steps = {}
    for bits, model in models.items():
        init_scales_(model, [bits], x)  # as `qnn train` does before it compiles (model_at set `bits`)
        remember_init_(model)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        steps[bits] = (torch.compile(model) if compile_ else model, opt)

    def step(bits: int) -> float:
        fwd, opt = steps[bits]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(x), y).backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    for bits in models:
        for _ in range(warmup):
            step(bits)
    ts: dict[int, list[float]] = {bits: [] for bits in models}
    for _ in range(iters):
        for bits in models:
            ts[bits].append(step(bits))
    return {bits: statistics.median(t) * 1e3 for bits, t in ts.items()}


def model_at(name: str, bits: int, x):
    """A fresh model at `bits` on x's device, scales initialised (first forward) and their state seen once (second)."""
    from qnn.layers import set_bit_width_
    from qnn.models import create_model

    model = create_model(name).to(x.device)
    set_bit_width_(model, bits)
    model.train()
    model(x)
    model(x)
    return model


def profile_step(model, x, y) -> dict:
    """torch.profiler over five training steps: the operator table, and device-to-host copies per step (each one is a
    host sync: the CPU waits for the device's queue to drain, so kernel launches stop overlapping)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as p:
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
    ev = p.key_averages()
    d2h = sum(e.count for e in ev if e.key == "aten::_local_scalar_dense")
    sort = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    return {"host_syncs": d2h // 5, "table": ev.table(sort_by=sort, row_limit=15, max_name_column_width=40)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", help="zoo model (default resnet20; 32x32 input)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--batch", type=int, default=128, help="batch size of the timed steps (random 32x32 images) "
                    "(default 128)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per precision (default 5)")
    ap.add_argument("--iters", type=int, default=15, help="timed steps per precision; their median is reported "
                    "(default 15)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (fuses the elementwise work)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--image-size", type=int, default=None, help="input side for a model file's model (default: "
                    "the model's own, else 32)")
    ap.add_argument("--profile", action="store_true", help="also print the top operators of five 4-bit steps "
                    "(torch.profiler) and how many device-to-host copies (host syncs) one step makes")
    ap.add_argument("--out", default="results/train_speed", help="results path without extension (.json and .md are "
                    "written; _MODEL, _compiled and _cuda are appended when they apply; default results/train_speed)")
    a = ap.parse_args(argv)
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("train_speed: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    from qnn.checkpoint import atomic_write_bytes, atomic_write_json
    from qnn.models import create_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    kw = {"in_size": a.image_size} if a.image_size else {}
    models = {bits: create_model(a.model, **kw).to(dev) for bits in (32, 8, 4, 2)}
    m = models[32]  # batches of the shape and classes the model takes
    size = m.in_size or 32  # a user's model that does not say takes CIFAR's side
    x = torch.rand(a.batch, m.in_channels, size, size).to(dev)
    y = torch.randint(0, m.num_classes, (a.batch,)).to(dev)
    res = step_times(models, x, y, a.warmup, a.iters, a.compile, sync)
    for bits, ms in res.items():
        print(f"{'float' if bits == 32 else f'{bits}-bit'}: {ms:.1f} ms/step", flush=True)
    prof = profile_step(model_at(a.model, 4, x), x, y) if a.profile else None
    rows = [[("float" if b == 32 else f"W{b}A{b}"), ms, ms / res[32]] for b, ms in res.items()]
    where = f"{a.threads} threads" if dev == "cpu" else f"{dev} ({torch.cuda.get_device_name()})"
    named = "" if a.model == "resnet20" else f" --model {a.model}"
    md = (f"{a.model} training step, batch {a.batch}, {where}, median of {a.iters}, precisions interleaved step by step "
          f"(compile={a.compile}). Command: `python bench/train_speed.py --threads {a.threads} --iters {a.iters}{named}"
          f"{' --compile' if a.compile else ''}{'' if dev == 'cpu' else f' --device {a.device}'}`\n\n"
          + markdown_table(["precision", "ms / step", "ratio vs float"], rows)
          + (f"\nOne 4-bit step makes {prof['host_syncs']} device-to-host copies (host syncs). Top operators of five "
             f"4-bit steps:\n\n```\n{prof['table']}\n```\n" if prof else ""))
    print(md)
    out = a.out + ("" if a.model == "resnet20" else f"_{a.model}") + ("_compiled" if a.compile else "") + ("" if dev == "cpu" else "_cuda")
    atomic_write_json(out + ".json", {"model": a.model, "ms_per_step": {str(k): v for k, v in res.items()},
                                      "ratio": {str(k): v / res[32] for k, v in res.items()}, "batch": a.batch,
                                      "iters": a.iters, "compile": a.compile, "device": dev,
                                      "host_syncs_per_4bit_step": prof["host_syncs"] if prof else None,
                                      "environment": environment(a.threads)})
    atomic_write_bytes(out + ".md", md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time of one ResNet-20 training step (batch 128) for float and for fake-quant QAT at 8, 4 and 2 bits, all
measured in one run, and the ratio fake-quant / float. Target: ratio <= 1.25 at every bit-width.

    python bench/train_speed.py --threads 2 [--compile]

Warm-up steps first (scale init, allocator), then the median of timed steps. Writes results/train_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table  # noqa: E402


def step_time(model, x, y, bits: int, warmup: int, iters: int, compile_: bool) -> float:
    import torch
    import torch.nn.functional as F

    from qnn.layers import set_bit_width_

    set_bit_width_(model, bits)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = torch.compile(model) if compile_ else model
    ts = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(x), y).backward()
        opt.step()
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (fuses the elementwise work)")
    ap.add_argument("--out", default="results/train_speed")
    a = ap.parse_args(argv)
    import torch

    from qnn.checkpoint import atomic_write_bytes, atomic_write_json
    from qnn.models import create_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x, y = torch.rand(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))
    res = {}
    for bits in (32, 8, 4, 2):
        model = create_model("resnet20")
        res[bits] = step_time(model, x, y, bits, a.warmup, a.iters, a.compile)
        print(f"{'float' if bits == 32 else f'{bits}-bit'}: {res[bits]:.1f} ms/step", flush=True)
    rows = [[("float" if b == 32 else f"W{b}A{b}"), ms, ms / res[32]] for b, ms in res.items()]
    md = (f"ResNet-20 training step, batch {a.batch}, {a.threads} threads, median of {a.iters} "
          f"(compile={a.compile}). Command: `python bench/train_speed.py --threads {a.threads} --iters {a.iters}"
          f"{' --compile' if a.compile else ''}`\n\n" + markdown_table(["precision", "ms / step", "ratio vs float"], rows))
    print(md)
    out = a.out + ("_compiled" if a.compile else "")
    atomic_write_json(out + ".json", {"ms_per_step": {str(k): v for k, v in res.items()},
                                      "ratio": {str(k): v / res[32] for k, v in res.items()}, "batch": a.batch,
                                      "iters": a.iters, "compile": a.compile, "environment": environment(a.threads)})
    atomic_write_bytes(out + ".md", md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

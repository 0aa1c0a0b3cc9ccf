"""What the int32 bias's rounding costs: clean accuracy of a checkpoint at each bit-width in four forms, the
fake-quant form training uses (BatchNorm's bias moved onto its integer grid), the same with BatchNorm's float bias,
the exact integer program (what ONNX Runtime computes), and that program with its bias left unrounded; and, per
layer, the largest rounding error of the bias in steps of the layer's output.

ONNX's QLinearConv / QGemm take the bias as int32 on the accumulator's grid s_x * s_w. With coarse inputs and weights
(2 bits) that grid is coarse too, and the rounded bias shifts every output of a channel by up to half of it: a share
of the output's step that a fake-quant form with a float BatchNorm bias never sees in training (a checkpoint trained
that way loses ~1 point at 2 bits in the integer model; `qnn.quantization.SwitchableBatchNorm2d` now trains with the
rounded bias).

    python bench/bias_rounding.py --checkpoint runs/qat_resnet20_brevitas/switchable_r8_kd_e5/model.pt --bits 2,4,8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import environment, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="qnn checkpoint (required)")
    ap.add_argument("--bits", default="2,4,8", help="comma-separated bit-widths, each 2..8 (default 2,4,8)")
    ap.add_argument("--dataset", default="cifar10", help="dataset: synthetic, cifar10 or imagefolder (default cifar10)")
    ap.add_argument("--data-dir", default="../shared/data/cifar10",
                    help="dataset folder (default ../shared/data/cifar10)")
    ap.add_argument("--n", type=int, default=10000, help="test images, the first N (default 10000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default="results/bias_rounding", help="results path without extension (.json and .md "
                    "are written; default results/bias_rounding)")
    a = ap.parse_args(argv)
    import torch

    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
    from qnn.config import parse_bits
    from qnn.data import load_dataset
    from qnn.errors import QNNError
    from qnn.integer import IntegerProgram, QConv
    from qnn.layers import FLOAT_BITS, exact_integer_eval, set_bit_width_
    from qnn.quantization import SwitchableBatchNorm2d

    torch.set_num_threads(a.threads)
    try:
        bits_list = parse_bits(a.bits)
        if FLOAT_BITS in bits_list:
            raise QNNError("--bits: the bias is rounded at quantized bit-widths only (2..8)")
        model, _ = load_checkpoint(a.checkpoint)
        x, y = load_dataset(a.dataset, "test", a.data_dir).subset(a.n).tensors()
    except QNNError as e:
        print(f"bias_rounding: error: {e}", file=sys.stderr)
        return 2
    model.eval()
    xn = (x - model._mean) / model._std

    def accuracy(run) -> float:
        with torch.no_grad():
            pred = torch.cat([run(i) for i in range(0, len(x), 500)]).argmax(1)
        return 100 * float((pred == y).float().mean())

    results, rows = {}, []
    for b in bits_list:
        set_bit_width_(model, b)
        bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
        with exact_integer_eval(False):
            fake = accuracy(lambda i: model(x[i:i + 500]))
            links = [bn.unlink_() for bn in bns]
            fake_float_bias = accuracy(lambda i: model(x[i:i + 500]))
        for bn, link in zip(bns, links):
            if link is not None:
                bn.link_(*link)
        prog = IntegerProgram(model.body)
        integer = accuracy(lambda i: prog.run(xn[i:i + 500]))
        convs = [op for op in prog.ops if isinstance(op, QConv) and op.out is not None]
        worst = [float((0.5 * op.in_grid.scale * op.s_w / op.out.scale).max()) for op in convs]
        for op in convs:
            op.b_int = op.b_real
        unrounded = accuracy(lambda i: prog.run(xn[i:i + 500]))
        results[str(b)] = {"acc_fake_quant_pct": fake, "acc_fake_quant_float_bias_pct": fake_float_bias,
                           "acc_integer_pct": integer,
                           "acc_integer_unrounded_bias_pct": unrounded, "worst_bias_error_out_steps": worst}
        rows.append([b, fake, fake_float_bias, integer, unrounded, integer - unrounded, max(worst)])
        print(f"{b} bits: fake-quant {fake:.2f} (float bias {fake_float_bias:.2f}), integer {integer:.2f}, "
              f"unrounded bias {unrounded:.2f}", flush=True)
    command = "python bench/bias_rounding.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"Clean accuracy %, {a.checkpoint}, {len(y)} test images. Command: `{command.strip()}`\n\n"
          + markdown_table(["bits", "fake-quant form", "fake-quant, float bias", "integer (ORT's arithmetic)",
                            "integer, bias unrounded",
                            "cost of the rounding (points)", "largest bias error (output steps)"], rows))
    print(md)
    atomic_write_json(a.out + ".json", {"checkpoint": a.checkpoint, "n": len(y), "results": results,
                                        "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

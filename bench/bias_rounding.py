"""What the int32 bias's rounding costs: clean accuracy of a checkpoint at each bit-width in four forms, the
fake-quant form training uses, the exact integer program (what ONNX Runtime computes), the same program with its
bias rounded onto the unlifted accumulator grid (the export before weights were lifted), and with its bias left
unrounded; and, per layer, the largest rounding error of the bias in steps of the layer's output, both ways.

ONNX's QLinearConv / QGemm take the bias as int32 on the accumulator's grid s_x * s_w. With coarse inputs and weights
(2 bits) that grid is coarse too, and a bias rounded onto it shifts every output of a channel by up to half of it:
a share of the output's step that the fake-quant form, with its float BatchNorm bias, never sees in training. The
export therefore lifts sub-8-bit weights by a power of two (`qnn.integer.weight_lift`: 64 at 2 bits, scale / 64),
the same real weights on a grid that much finer, and the bias with them.

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
    from qnn.data import load_dataset
    from qnn.errors import QNNError
    from qnn.integer import IntegerProgram, QConv
    from qnn.layers import FLOAT_BITS, exact_integer_eval, parse_bits, set_bit_width_

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
        with exact_integer_eval(False):
            fake = accuracy(lambda i: model(x[i:i + 500]))
        prog = IntegerProgram(model.body)
        integer = accuracy(lambda i: prog.run(xn[i:i + 500]))
        convs = [op for op in prog.ops if isinstance(op, QConv) and op.out is not None]
        lifted = [op.b_int for op in convs]
        worst = [float((0.5 * op.s_bias / op.out.scale).max()) for op in convs]
        worst_unlifted = [w * op.lift for w, op in zip(worst, convs)]
        for op in convs:  # the bias on the unlifted grid: lift times coarser
            op.b_int = torch.round(op.b_real / op.lift) * op.lift
        unlifted = accuracy(lambda i: prog.run(xn[i:i + 500]))
        for op in convs:
            op.b_int = op.b_real
        unrounded = accuracy(lambda i: prog.run(xn[i:i + 500]))
        for op, b_int in zip(convs, lifted):
            op.b_int = b_int
        results[str(b)] = {"acc_fake_quant_pct": fake, "acc_integer_pct": integer,
                           "acc_integer_unlifted_bias_pct": unlifted, "acc_integer_unrounded_bias_pct": unrounded,
                           "worst_bias_error_out_steps": worst, "worst_unlifted_bias_error_out_steps": worst_unlifted}
        rows.append([b, fake, integer, unlifted, unrounded, integer - unrounded, unlifted - unrounded,
                     max(worst), max(worst_unlifted)])
        print(f"{b} bits: fake-quant {fake:.2f}, integer {integer:.2f}, unlifted bias {unlifted:.2f}, unrounded bias "
              f"{unrounded:.2f}", flush=True)
    command = "python bench/bias_rounding.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"Clean accuracy %, {a.checkpoint}, {len(y)} test images. Command: `{command.strip()}`\n\n"
          + markdown_table(["bits", "fake-quant form", "integer (ORT's arithmetic)", "integer, unlifted bias",
                            "integer, bias unrounded", "cost of the rounding (points)", "cost unlifted (points)",
                            "largest bias error (output steps)", "largest unlifted (output steps)"], rows))
    print(md)
    atomic_write_json(a.out + ".json", {"checkpoint": a.checkpoint, "n": len(y), "results": results,
                                        "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fake-quant (PyTorch) vs integer ONNX Runtime parity on clean and patched images.

    python bench/parity.py --checkpoint runs/qat_resnet20_brevitas/switchable_r8_kd_e5/model.pt --bits 8,4,2 \
        --dataset cifar10 --data-dir ../shared/data/cifar10 [--n 10000] [--patch-iters 300]

For each bit-width: export the integer model, run both backends on the test set and on the same patched images
(universal patches crafted on the fake-quant model: 6x6 and 8x8 square, random placement, and an 8x8 circle),
report top-1 agreement, max |logit diff| in LSBs of the output scale, ASR on both backends side by side, and
optionally the numpy integer interpreter's bit-exactness on --interp-n images. Writes results/parity.{json,md}.

"Fake-quant" is the PyTorch model in eval mode: without autograd it runs the integer graph's arithmetic exactly
(qnn.integer.IntegerProgram). The column "float-form agreement" is the differentiable fake-quant form that attacks use
(float requantization), to show what float rounding alone changes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import environment, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="qnn checkpoint to export and compare (required)")
    ap.add_argument("--bits", default="8,4,2", help="comma-separated bit-widths to export and compare, each 2..8 or "
                    "32 (default 8,4,2)")
    ap.add_argument("--dataset", default="cifar10", help="dataset: synthetic, cifar10 or imagefolder (default cifar10)")
    ap.add_argument("--data-dir", default="../shared/data/cifar10",
                    help="dataset folder (default ../shared/data/cifar10)")
    ap.add_argument("--n", type=int, default=10000, help="test images compared, the first N (default 10000)")
    ap.add_argument("--n-attack", type=int, default=1000, help="training images the universal patches are crafted on, "
                    "the first N (default 1000)")
    ap.add_argument("--patch-iters", type=int, default=300,
                    help="optimisation iterations per universal patch (default 300)")
    ap.add_argument("--interp-n", type=int, default=1000, help="images for the interpreter bit-exactness check (0 = off)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--out", default="results/parity", help="results path without extension (.json and .md are "
                    "written; default results/parity)")
    a = ap.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from qnn.export.onnx_export import export_model, normalise
    from qnn.kernels.interpreter import IntegerInterpreter
    from qnn.attacks.patch import PatchConfig, apply_patch, asr_metrics, make_mask, optimize_universal_patch, placement_locations
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
    from qnn.data import load_dataset
    from qnn.errors import QNNError
    from qnn.integer import IntegerProgram
    from qnn.layers import parse_bits, precision

    torch.set_num_threads(a.threads)
    try:
        bits_list = parse_bits(a.bits)
        model, obj = load_checkpoint(a.checkpoint)
        test = load_dataset(a.dataset, "test", a.data_dir).subset(a.n)
        train = load_dataset(a.dataset, "train", a.data_dir).subset(a.n_attack)
    except QNNError as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return 2
    x, y = test.tensors()
    xa, ya = train.tensors()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.intra_op_num_threads = a.threads
    patch_cfgs = {"square6_random": PatchConfig(patch_shape=(6, 6), iterations=a.patch_iters),
                  "square8_random": PatchConfig(patch_shape=(8, 8), iterations=a.patch_iters),
                  "circle8_random": PatchConfig(patch_shape=(8, 8), shape="circle", iterations=a.patch_iters)}
    results, rows = {}, []

    def fq_logits(inp, exact=True):
        with torch.no_grad(), precision(model, integer=exact):
            return torch.cat([model(inp[i:i + 500]) for i in range(0, len(inp), 500)]).numpy()

    def agree(p, q) -> float:
        return 100 * float((p.argmax(1) == q.argmax(1)).mean())

    def ort_logits(sess, inp):
        xn = normalise(inp.numpy(), model.mean, model.std)
        return np.concatenate([sess.run(None, {"input": xn[i:i + 500]})[0] for i in range(0, len(xn), 500)])

    for b in bits_list:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as td:
            onnx_path = export_model(model, b, "int", Path(td) / "m.onnx")
            sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
            with precision(model, b):
                model.eval()
                lsb = IntegerProgram(model.body).logit_lsb()
                lf, lo = fq_logits(x), ort_logits(sess, x)
                r = {"clean": {"top1_agreement_pct": agree(lf, lo), "float_form_agreement_pct": agree(fq_logits(x, False), lo),
                               "logits_bit_identical_pct": 100 * float((lf == lo).all(1).mean()),
                               "max_logit_diff_lsb": float(np.abs(lf - lo).max() / lsb),
                               "acc_fake_quant_pct": 100 * float((lf.argmax(1) == y.numpy()).mean()),
                               "acc_integer_pct": 100 * float((lo.argmax(1) == y.numpy()).mean())}, "patches": {}}
                if a.interp_n:
                    xn = normalise(x[: a.interp_n].numpy(), model.mean, model.std)
                    li = IntegerInterpreter(onnx_path).run(xn)
                    r["interpreter_bit_exact_pct"] = 100 * float((li == lo[: a.interp_n]).all(1).mean())
                print(f"{b} bits: clean images compared ({time.perf_counter() - t0:.0f}s); crafting "
                      f"{len(patch_cfgs)} patches", flush=True)
                for name, pc in patch_cfgs.items():
                    patch, _ = optimize_universal_patch(model, xa, ya, pc, progress=True)
                    loc = placement_locations(model, x, y, patch, pc)
                    xp = apply_patch(x, patch, make_mask(pc.shape, *pc.patch_shape), loc)
                    pf, po = fq_logits(xp), ort_logits(sess, xp)
                    mf = asr_metrics(lf.argmax(1), pf.argmax(1), y.numpy())
                    mo = asr_metrics(lo.argmax(1), po.argmax(1), y.numpy())
                    r["patches"][name] = {"top1_agreement_pct": agree(pf, po), "float_form_agreement_pct": agree(fq_logits(xp, False), po),
                                          "logits_bit_identical_pct": 100 * float((pf == po).all(1).mean()),
                                          "max_logit_diff_lsb": float(np.abs(pf - po).max() / lsb),
                                          "asr_fake_quant_pct": mf["asr_pct"], "asr_integer_pct": mo["asr_pct"],
                                          "asr_abs_diff": abs(mf["asr_pct"] - mo["asr_pct"])}
        r["seconds"] = time.perf_counter() - t0
        results[str(b)] = r
        c = r["clean"]
        rows.append([b, "clean", c["top1_agreement_pct"], c["logits_bit_identical_pct"], c["max_logit_diff_lsb"],
                     c["acc_fake_quant_pct"], c["acc_integer_pct"], "-", c["float_form_agreement_pct"]])
        for name, p in r["patches"].items():
            rows.append([b, name, p["top1_agreement_pct"], p["logits_bit_identical_pct"], p["max_logit_diff_lsb"],
                         p["asr_fake_quant_pct"], p["asr_integer_pct"], p["asr_abs_diff"], p["float_form_agreement_pct"]])
        print(f"{b} bits done ({r['seconds']:.0f}s)", flush=True)
    command = ("python bench/parity.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    md = (f"Fake-quant vs ONNX Runtime integer, {a.checkpoint}, {len(y)} test images. Command: `{command}`\n\n"
          "For `clean` rows the two value columns are accuracy %, for patch rows ASR % (fake-quant, integer).\n\n"
          + markdown_table(["bits", "input", "top-1 agreement %", "logits bit-identical %", "max |logit diff| (LSB)",
                            "fake-quant", "integer", "|ASR diff| pts", "float-form agreement %"], rows))
    interp = {k: v.get("interpreter_bit_exact_pct") for k, v in results.items()}
    md += f"\nNumpy integer interpreter vs ONNX Runtime, logits bit-identical on {a.interp_n} images: {interp}\n"
    print(md)
    atomic_write_json(a.out + ".json", {"command": command, "checkpoint": a.checkpoint, "n": len(y), "results": results,
                                        "environment": environment(a.threads)})
    atomic_write_bytes(a.out + ".md", md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

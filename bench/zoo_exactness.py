"""Which models come in, and whether their deployed integer model is exact: every zoo model and the test suite's user
models at 8, 4 and 2 bits: PyTorch eval == ONNX Runtime == the numpy interpreter (`np.array_equal` on the logits) and
every executed node an integer kernel (`qnn verify`). Models refused by `qnn.quantize` get their one-line reason.

    python bench/zoo_exactness.py [--n 16] [--width 0.25] [--out results/zoo_exactness]

Scales are calibrated on random images (two training-mode passes), as the export tests do: exactness is a property of
the arithmetic, not of trained weights. 224x224 models run at --size (default 64; they are fully convolutional).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import command_line, markdown_table, write_results  # noqa: E402

IMAGENET_SIZED = ("resnet18", "mobilenetv2", "mobilenetv3_small", "efficientnet_lite0", "efficientnet_b0")
WIDTH_MODELS = ("mobilenetv2", "mobilenetv3", "efficientnet", "squeezenet")
USER_FILE = "tests/qnn/user_models.py"
QONNX_IMAGES = 4  # qonnx's executor runs node by node in Python: a few images show that the file runs


def candidates(width: float, size: int) -> dict:
    """{name: factory} of every zoo model and the user models the tests use."""
    from qnn.models import create_model, list_models
    from qnn.models.quantized import QuantizedNet

    out = {}
    for n in list_models():
        kw = {"num_classes": 10}
        if n in IMAGENET_SIZED:
            kw["in_size"] = size
        if n.startswith(WIDTH_MODELS):
            kw["width_mult"] = width
        out[n] = lambda n=n, kw=kw: create_model(n, **kw)
    from tests.export.test_integer_program import Functional, Movement, Shortcuts
    from tests.qnn import user_models

    for name in ("tiny_cnn", "with_softplus"):
        out[f"{USER_FILE}:{name}"] = lambda name=name: create_model(f"{USER_FILE}:{name}", num_classes=10, in_size=16)
    out["test: Functional (elementwise calls, concat, avg_pool2d, gate)"] = lambda: QuantizedNet(Functional(), 10, 16)
    out["test: Shortcuts (option-A shortcut forms)"] = lambda: QuantizedNet(Shortcuts(), 10, 16)
    out["test: Movement (ShuffleNet-V2 unit, split, permute, upsample)"] = lambda: QuantizedNet(Movement(), 10, 16)
    for name in ("brevitas_stock_cnn", "brevitas_per_channel_cnn", "brevitas_toolkit_cnn", "grayscale_28"):
        getattr(user_models, name)  # the test file defines each
        out[f"{USER_FILE}:{name}"] = lambda name=name: create_model(f"{USER_FILE}:{name}", num_classes=10, in_size=28)
    return out


def check(make, bits: int, n: int) -> dict:
    from qnn.errors import QNNError

    try:
        m = make()
    except QNNError as e:
        return {"accepted": False, "reason": str(e)}
    try:
        return _exactness(m, bits, n)
    except Exception as e:  # a model the pipeline takes in but cannot run yet
        return {"accepted": False, "reason": f"accepted, then failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def _exactness(m, bits: int, n: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from qnn.export.onnx_export import export_model
    from qnn.export.verify import verify
    from qnn.kernels.interpreter import IntegerInterpreter
    from qnn.layers import precision

    torch.manual_seed(bits)
    c, s = m.in_channels, m.in_size
    with precision(m, bits):
        m.train()
        with torch.no_grad():
            for _ in range(2):
                m(torch.rand(8, c, s, s))
        m.eval()
        x = torch.rand(n, c, s, s)
        with torch.no_grad():
            ref = m(x).numpy()
        with tempfile.TemporaryDirectory() as td:
            p = export_model(m, bits, "int", Path(td) / "m.onnx")
            xn = ((x - m._mean) / m._std).numpy()
            got = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": xn})[0]
            interp = IntegerInterpreter(p).run(xn)
            v = verify(p)
            qonnx = _qonnx_run(m, bits, Path(td) / "q.onnx", xn[:QONNX_IMAGES], ref[:QONNX_IMAGES])
        return {"accepted": True, "exact_ort": bool(np.array_equal(ref, got)), "exact_interpreter": bool(np.array_equal(ref, interp)),
                "fully_integer": bool(v["fully_integer"]), "float_ops": v.get("float_compute_ops", []), "ops": v["ops"],
                **qonnx}


def _qonnx_run(m, bits: int, path: Path, xn, ref) -> dict:
    """The `qnn export --format qonnx` file run as written in qonnx's own executor on a few images: whether it runs,
    and its top-1 agreement with the integer model (QONNX computes in float between its Quant nodes: close, not
    bit-identical; tests/export/test_integer_program.py::test_qonnx_file_runs_in_qonnx_as_written)."""
    import numpy as np
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    from qnn.export.onnx_export import export_model

    try:
        wrapped = cleanup_model(ModelWrapper(str(export_model(m, bits, "qonnx", path))))
        inp, outp = wrapped.graph.input[0].name, wrapped.graph.output[0].name
        out = np.concatenate([execute_onnx(wrapped, {inp: xn[i:i + 1]})[outp] for i in range(len(xn))])
    except Exception as e:  # qonnx raises many types; the table says which
        return {"qonnx_runs": False, "qonnx_error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    return {"qonnx_runs": True, "qonnx_top1_agreement_pct": 100.0 * float((out.argmax(1) == ref.argmax(1)).mean())}


def table(res: dict, bits: list[int]) -> str:
    """The results as a markdown table (also docs/results.md's, via bench/render_docs.py)."""
    rows = []
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    for name, per in res.items():
        first = per[str(bits[0])]
        if not first["accepted"]:
            rows.append([f"`{name}`", "refused", "-", "-", first["reason"][:160]])
            continue
        rows.append([f"`{name}`", " / ".join(yes(per[str(b)]["exact_ort"] and per[str(b)]["exact_interpreter"]) for b in bits),
                     " / ".join(yes(per[str(b)]["fully_integer"]) for b in bits),
                     " / ".join(yes(per[str(b)].get("qonnx_runs")) for b in bits), ""])
    return markdown_table(["model", "exact", "integer only", "QONNX runs in qonnx", "refused because"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="random images compared per model and bit-width (default 16)")
    ap.add_argument("--width", type=float, default=0.25, help="width multiplier of the MobileNet / EfficientNet / "
                    "SqueezeNet models (default 0.25)")
    ap.add_argument("--size", type=int, default=64, help="input size of the 224x224 models (default 64)")
    ap.add_argument("--bits", default="8,4,2", help="comma-separated bit-widths, each 2..8 (default 8,4,2)")
    ap.add_argument("--out", default="results/zoo_exactness", help="results path without extension")
    a = ap.parse_args(argv)
    bits = [int(b) for b in a.bits.split(",")]
    if a.n < 1 or not (0 < a.width <= 4) or a.size < 16 or any(b not in range(2, 9) for b in bits):
        print("zoo_exactness: error: --n >= 1, 0 < --width <= 4, --size >= 16, --bits in 2..8", file=sys.stderr)
        return 2
    res = {}
    for name, make in candidates(a.width, a.size).items():
        res[name] = {}
        for b in bits:
            r = check(make, b, a.n)
            res[name][str(b)] = r
            if not r["accepted"]:
                print(f"{name}: refused: {r['reason'][:100]}", flush=True)
                break
            print(f"{name} {b} bits: exact {r['exact_ort'] and r['exact_interpreter']}, integer-only {r['fully_integer']}, "
                  f"qonnx runs {r.get('qonnx_runs')}", flush=True)
    md = (f"Models in, and their integer models exact, at {' / '.join(map(str, bits))} bits: PyTorch eval == ONNX Runtime "
          f"== numpy interpreter on {a.n} random images (`np.array_equal`), every executed node an integer kernel, and "
          f"the QONNX export run as written in qonnx's executor on {QONNX_IMAGES} of them (it computes in float between "
          "its Quant nodes: close, not bit-identical). "
          f"Width {a.width} for the MobileNet / EfficientNet / SqueezeNet models; 224x224 models at {a.size}x{a.size}. "
          f"Command: `{command_line('bench/zoo_exactness.py', argv)}`\n\n"
          + table(res, bits))
    write_results(a.out, {"results": res, "config": vars(a), "threads": None}, md)
    return 0 if all(r.get("exact_ort", True) and r.get("exact_interpreter", True) and r.get("qonnx_runs", True)
                    for per in res.values() for r in per.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

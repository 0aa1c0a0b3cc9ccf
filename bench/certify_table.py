"""Certified patch robustness of ResNet-20 on CIFAR-10 at the cpu budget, for the deployed integer model (#37): per
model, method, bit-width and patch size, the defended clean accuracy and certified accuracy computed in PyTorch, the
same certification run through ONNX Runtime's integer model image by image (predictions, certificates and forwards
must all be equal), the defended inference's ms per image on ORT, and two cross-checks on the certified images: a
per-image patch attack at every cell, the `cpu` protocol's attack ensemble at one.

    python bench/certify_table.py --plan                 # the cells left
    python bench/certify_table.py                        # resumes cell by cell
    python bench/certify_table.py --n 20 --bits 32,4 --patch-sizes 6 --methods patchcleanser --out /tmp/ct  # minutes

Models: `--masking` (trained by `qnn train --defense masking`, see bench/certify_resnet20.sh) and `--qat` (the defense
table's undefended QAT model, seed 0). Each finished cell is written to OUT.json at once; a re-run skips the cells
whose settings and checkpoint match and refuses a file made with other settings. The markdown and the plot are
rendered from the JSON. ORT timing needs a quiet machine: pause other jobs first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from qnn.bench.common import command_line, markdown_table  # noqa: E402

FORMAT = 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masking", default="runs/certify/masking/model.pt", help="the masking-trained checkpoint")
    ap.add_argument("--qat", help="the undefended QAT checkpoint (default: the defense table's none_s0 model)")
    ap.add_argument("--dataset", default="cifar10", help="cifar10 (default) or synthetic (tests)")
    ap.add_argument("--data-dir", default="../shared/data/cifar10", help="CIFAR-10 folder")
    ap.add_argument("--n", type=int, default=1000, help="the first N test images (default 1000)")
    ap.add_argument("--bits", default="32,8,4,2", help="bit-widths (default 32,8,4,2; ORT runs those below 32)")
    ap.add_argument("--patch-sizes", default="4,6", help="square patch sides (default 4,6)")
    ap.add_argument("--methods", default="patchcleanser,certmask", help="certification methods")
    ap.add_argument("--mask-positions", type=int, default=6, help="mask positions per axis (default 6)")
    ap.add_argument("--axis-coverage", type=int, default=2, help="certmask's coverage per axis (default 2)")
    ap.add_argument("--latency-images", type=int, default=50, help="images timed one by one on ORT (default 50)")
    ap.add_argument("--cross-check-iters", type=int, default=5, help="per-image attack steps on certified images")
    ap.add_argument("--ensemble-at", default="4:6", help="BITS:PATCH where the attack ensemble cross-checks the "
                    "certified images (default 4:6; 'none' to skip)")
    ap.add_argument("--protocol", default="cpu", help="evaluation protocol of the ensemble cross-check (default cpu)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ORT threads (default 2)")
    ap.add_argument("--out", default="results/certify_resnet20", help="results path without extension")
    ap.add_argument("--plan", action="store_true", help="print the cells left and exit")
    a = ap.parse_args(argv)
    from qnn.errors import QNNError

    try:
        return _run(a, command_line("bench/certify_table.py", argv))
    except QNNError as e:
        print(f"certify_table: error: {e}", file=sys.stderr)
        return 2


def _ints(text: str, what: str) -> list[int]:
    from qnn.errors import QNNError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QNNError(f"{what} must be comma-separated integers, got {text!r}") from None


def _models(a) -> dict[str, Path]:
    from qnn.errors import QNNError

    qat = a.qat or next(iter(sorted(Path("runs/defense_equal_compute").glob("none_s0_*/model.pt"))), None)
    out = {"masking": Path(a.masking), "qat": Path(qat) if qat else None}
    for name, p in out.items():
        if p is None or not p.is_file():
            raise QNNError(f"--{name} checkpoint not found ({p}); train it first (bash bench/certify_resnet20.sh)")
    return out


def _run(a, command: str) -> int:
    import torch

    from qnn.certify import METHODS, mask_set
    from qnn.checkpoint import atomic_write_json, load_checkpoint, sha256_file, trained_bits
    from qnn.data import load_dataset
    from qnn.errors import QNNError
    from qnn.outputs import read_results_json
    from qnn.train import versions

    bits, sizes = _ints(a.bits, "--bits"), _ints(a.patch_sizes, "--patch-sizes")
    methods = [m for m in a.methods.split(",") if m]
    if any(m not in METHODS for m in methods):
        raise QNNError(f"--methods: choose from {', '.join(METHODS)}, got {a.methods!r}")
    if not 1 <= a.n <= 10000:
        raise QNNError(f"--n must be in 1..10000, got {a.n}")
    models = _models(a)
    ensemble = None if a.ensemble_at == "none" else tuple(_ints(a.ensemble_at.replace(":", ","), "--ensemble-at"))
    if ensemble is not None and len(ensemble) != 2:
        raise QNNError(f"--ensemble-at must be BITS:PATCH such as 4:6, or none; got {a.ensemble_at!r}")
    for name, path in models.items():  # every cell's bit-width trained, every mask set possible: before any work
        model, obj = load_checkpoint(str(path))
        untrained = [b for b in bits if b != 32 and b not in trained_bits(obj)]
        if untrained:
            raise QNNError(f"--{name} {path} was not trained at {untrained} bits (trained: {trained_bits(obj)})")
        side = int(getattr(model, "in_size", None) or 32)
        for method in methods:
            for p in sizes:
                mask_set(method, (side, side), p, a.mask_positions, a.axis_coverage if method == "certmask" else 1)
    settings = {"format": FORMAT, "dataset": a.dataset, "n_images": a.n, "images": f"the first {a.n} test images",
                "mask_positions": a.mask_positions, "axis_coverage": a.axis_coverage,
                "cross_check_iters": a.cross_check_iters, "latency_images": a.latency_images}
    shas = {name: sha256_file(p) for name, p in models.items()}
    path = Path(a.out + ".json")
    res = read_results_json(path) if path.exists() else {"settings": settings, "cells": {}}
    if res.get("settings") != settings:
        raise QNNError(f"{path} was made with other settings ({res.get('settings')}); give another --out")
    cells = [(m, meth, b, p) for m in models for meth in methods for b in bits for p in sizes]
    key = lambda c: "/".join(map(str, c))  # noqa: E731
    left = [c for c in cells if res["cells"].get(key(c), {}).get("checkpoint_sha256") != shas[c[0]]]
    print(f"certify_table: {len(left)} of {len(cells)} cells left", file=sys.stderr)
    if a.plan:
        for c in left:
            print(key(c))
        return 0
    torch.set_num_threads(a.threads)
    ens_bits, ens_patch = ensemble or (None, None)
    for c in left:
        name, method, b, p = c
        model, obj = load_checkpoint(str(models[name]))
        test = load_dataset(a.dataset, "test", a.data_dir, like=model)
        if a.n > len(test):
            raise QNNError(f"--n {a.n}: the test set has {len(test)} images")
        x, y = test.subset(a.n).tensors()
        side = x.shape[-1]
        ms = mask_set(method, (side, side), p, a.mask_positions, a.axis_coverage if method == "certmask" else 1)
        t0 = time.perf_counter()
        cell = {"model": name, "checkpoint": str(models[name]), "checkpoint_sha256": shas[name],
                "defense": obj.get("defense"), "method": method, "bits": b, "patch_size": p, "n_masks": len(ms),
                **_pytorch(model, x, y, ms, b, a)}
        if b != 32:
            cell["ort"] = _ort(model, x, y, ms, b, cell, a)
        if (b, p) == (ens_bits, ens_patch) and method == "patchcleanser":
            cell["ensemble_cross_check"] = _ensemble_check(model, x, y, ms, b, cell, trained_bits(obj), a)
        cell["seconds"] = time.perf_counter() - t0
        res["cells"][key(c)] = cell
        res.update(command=command, versions=versions(), seed=0, threads=a.threads)
        atomic_write_json(path, res)
        _write_report(res, a.out)
        ort = cell.get("ort", {})
        print(f"{key(c)}: clean {cell['clean_acc_pct']:.1f}% certified {cell['certified_acc_pct']:.1f}%"
              + (f", ORT equal on {ort['n_equal']}/{a.n}" if ort else "") + f" ({cell['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    _write_report(res, a.out)
    bad = [k for k, c in res["cells"].items() if c.get("ort", {}).get("n_equal", a.n) != a.n
           or c["cross_check"]["violations"] or c.get("ensemble_cross_check", {}).get("violations")]
    if bad:
        print(f"certify_table: FAILED cells {bad}: ORT differs from PyTorch or a certified image fell", file=sys.stderr)
        return 1
    return 0


def _pytorch(model, x, y, ms, bits: int, a) -> dict:
    from qnn.certify import attack_cross_check, certify
    from qnn.kernels.reference import host_cpu_family
    from qnn.layers import precision

    import torch

    with precision(model, bits, cpu=host_cpu_family()):
        t0 = time.perf_counter()
        cert = certify(model, x, ms, bits)
        s = cert.summary(y.numpy())
        s["certify_seconds"] = time.perf_counter() - t0
        with torch.no_grad():
            plain = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]).numpy()
        cc = attack_cross_check(model, x, y, ms, bits, cert, a.cross_check_iters) if a.cross_check_iters else \
            {"violations": 0, "skipped": True}
    return {**s, "undefended_clean_acc_pct": 100.0 * float((plain == y.numpy()).mean()), "cross_check": cc,
            "cpu_family": host_cpu_family(), "predictions": cert.pred.tolist(),
            "certified": "".join("1" if v else "0" for v in cert.certified),
            "inference_forwards": cert.inference_forwards.tolist()}


def _ort(model, x, y, ms, bits: int, cell: dict, a) -> dict:
    """The same certification through ONNX Runtime's integer model, image by image, and the defended inference's
    latency per image (one at a time, after one warm-up)."""
    from qnn.export import run_edge as E
    from qnn.certify import fill_pixels
    from qnn.errors import QNNError
    from qnn.export.onnx_export import export_model
    from qnn.export.verify import verify

    with tempfile.TemporaryDirectory() as td:
        onnx_path = export_model(model, bits, "int", Path(td) / "m.onnx")
        census = verify(onnx_path)
        sess = E.make_session(Path(onnx_path).read_bytes(), a.threads)
    xn = ((x - model._mean) / model._std).numpy().astype(np.float32)
    if ((fill_pixels(model).view(1, -1, 1, 1) - model._mean) / model._std).abs().max().item() != 0.0:
        raise QNNError("the mask fill does not normalise to 0.0: ORT's masked images would differ from PyTorch's")
    spec = {"method": ms.method, "masks": ms.masks(), "n_masks": len(ms), "cover": ms.cover()}
    t0 = time.perf_counter()
    pred, cert, fw, cfw = E.certify_np(sess, xn, spec, int(model.num_classes))
    seconds = time.perf_counter() - t0
    want_pred, want_cert = np.array(cell["predictions"]), np.array([c == "1" for c in cell["certified"]])
    want_fw = np.array(cell["inference_forwards"])
    equal = (pred == want_pred) & (cert == want_cert) & (fw == want_fw)
    ts = []
    k = min(a.latency_images, len(xn))
    if k:
        E.defended_inference(sess, xn[0], spec, int(model.num_classes))
        for i in range(k):
            t = time.perf_counter()
            E.defended_inference(sess, xn[i], spec, int(model.num_classes))
            ts.append((time.perf_counter() - t) * 1e3)
    return {"n_equal": int(equal.sum()), "differing_images": np.flatnonzero(~equal)[:20].tolist(),
            "clean_acc_pct": 100.0 * float((pred == y.numpy()).mean()),
            "certified_acc_pct": 100.0 * float((cert & (pred == y.numpy())).mean()),
            "fully_integer": bool(census["fully_integer"]), "certify_seconds": seconds,
            "forwards_per_image_certify": float(cfw.mean()),
            "latency_ms_p50": float(np.percentile(ts, 50)) if ts else None,
            "latency_ms_mean": float(np.mean(ts)) if ts else None, "latency_images": k}


def _ensemble_check(model, x, y, ms, bits: int, cell: dict, trained: list[int], a) -> dict:
    """The `cpu` protocol's universal patches, crafted against the undefended model at `bits` on its crafting
    images, pasted on the certified images at three placements: the defended labels must all hold."""
    import torch

    from qnn.attacks.patch import PatchConfig, apply_patch, make_mask
    from qnn.certify import certify
    from qnn.data import load_dataset
    from qnn.evaluation import craft, get_protocol, score_locations
    from qnn.layers import precision

    proto = get_protocol(a.protocol)
    train = load_dataset(a.dataset, "train", a.data_dir, like=model)
    craft_set = train.subset(proto.n_craft).tensors()
    ok = np.flatnonzero(np.array([c == "1" for c in cell["certified"]]) & (np.array(cell["predictions"]) == y.numpy()))
    base = PatchConfig(patch_shape=tuple(ms.patch_size), image_size=tuple(ms.image_size), seed=0,
                       num_classes=int(model.num_classes))
    out = {"protocol": proto.name, "n_certified": int(len(ok)), "placements": proto.placements, "members": {}}
    xs, ys = x[ok], y[ok]
    if not len(ok):
        return {**out, "violations": 0}
    for member in proto.members:
        patch = craft(model, bits, member, base, craft_set, trained, proto)
        mask = make_mask(base.shape, *base.patch_shape)
        fooled = wrong = 0
        for loc in score_locations(len(xs), base, proto.placements):
            xp = apply_patch(xs, patch, mask, loc)
            with torch.no_grad(), precision(model, bits):
                fooled += int((model(xp).argmax(1) != ys).sum())
            wrong += int((certify(model, xp, ms, bits, certificates=False).pred != ys.numpy()).sum())
        out["members"][member.name] = {"undefended_fooled": fooled, "defended_wrong": wrong}
    out["violations"] = sum(m["defended_wrong"] for m in out["members"].values())
    return out


def _write_report(res: dict, out: str) -> None:
    from qnn.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(out + ".md"), render(res).encode())
    _plot(res, Path(out + ".png"))


def render(res: dict) -> str:
    """The markdown report: its heading and `tables`."""
    s = res["settings"]
    head = (f"# Certified patch robustness of the deployed integer ResNet-20\n\n{s['images']}, {s['mask_positions']} "
            f"mask positions per axis (CertMask coverage {s['axis_coverage']} per axis). Clean and certified "
            "accuracy computed in PyTorch's integer-exact evaluation; the same certification run through ONNX "
            "Runtime's integer model must give every image's prediction, certificate and forward count (ORT equal). "
            f"Command: `{res.get('command', '')}`\n\n")
    return head + tables(res)


def tables(res: dict) -> str:
    """Every cell, then the attack ensemble's cross-check."""
    s = res["settings"]
    rows = []
    for c in res["cells"].values():
        o = c.get("ort")
        rows.append([c["model"], c["method"], "float" if c["bits"] == 32 else c["bits"], c["patch_size"],
                     c["undefended_clean_acc_pct"], c["clean_acc_pct"], c["certified_acc_pct"],
                     f"{o['n_equal']}/{s['n_images']}" if o else "-",
                     "-" if not o or o["latency_ms_p50"] is None else round(o["latency_ms_p50"], 1),
                     round(c["forwards_per_image_inference_mean"], 1), round(c["forwards_per_image_certify"], 1),
                     c["cross_check"]["violations"]])
    table = markdown_table(["model", "method", "bits", "patch", "undefended clean %", "defended clean %",
                            "certified %", "ORT equal", "ORT ms/image (p50)", "forwards/image (inference)",
                            "forwards/image (certify)", "attacked certified images wrong"], rows)
    ens = [[c["model"], c["bits"], c["patch_size"], e["n_certified"], m, v["undefended_fooled"], v["defended_wrong"]]
           for c in res["cells"].values() if (e := c.get("ensemble_cross_check")) for m, v in e["members"].items()]
    if ens:
        table += ("\nThe attack ensemble (`cpu` protocol, universal patches against the undefended model, 3 "
                  "placements) on the certified images:\n\n"
                  + markdown_table(["model", "bits", "patch", "certified images", "attack", "undefended fooled",
                                    "defended wrong"], ens))
    return table


def _plot(res: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qnn.checkpoint import atomic_write_bytes

    groups: dict = {}
    for c in res["cells"].values():
        groups.setdefault((c["model"], c["method"], c["patch_size"]), []).append((c["bits"], c["certified_acc_pct"]))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    order = [32, 8, 4, 2]
    for (m, meth, p), pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda t: order.index(t[0]) if t[0] in order else 9)
        ax.plot([str(b) if b != 32 else "float" for b, _ in pts], [v for _, v in pts], marker="o",
                label=f"{m}, {meth}, {p}x{p}")
    ax.set_xlabel("bit-width")
    ax.set_ylabel("certified accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())

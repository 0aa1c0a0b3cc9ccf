"""`qnn certify`: certified patch robustness of a switchable checkpoint at each bit-width (`qnn.certify`).

    qnn certify --checkpoint runs/masking/model.pt --bits 8,4,2 --patch-size 4,6 --mask-positions 6 \
        --method patchcleanser --n 1000 --out runs/certify

writes certify.json (config, checkpoint sha256, mask sets, per bit-width and patch size the defended clean accuracy,
certified accuracy, forwards per image and the per-image certificates; versions and seed), certify.md and
certify.png (certified accuracy against patch size, one line per bit-width), all staged beside --out and swapped in
when finished.
"""

from __future__ import annotations

import json
import shlex
import sys
import time

import torch

from qnn.attacks.patch import default_patch_side
from qnn.certify import METHODS, attack_cross_check, certify, fill_pixels, mask_set
from qnn.cli_options import add_user_model_option
from qnn.errors import QNNError
from qnn.layers import parse_bits, precision
from qnn.outputs import StagedDir, markdown_table
from qnn.validate import arg_float, arg_int, arg_seed


def add_parser(sub) -> None:
    p = sub.add_parser("certify", help="certified patch robustness by masking (PatchCleanser / one-round CertMask "
                                       "rule) per bit-width")
    p.add_argument("--checkpoint", required=True, help="qnn checkpoint (model.pt written by qnn train)")
    add_user_model_option(p)
    p.add_argument("--dataset", default="synthetic", help="synthetic (embedded, no download) | cifar10 | imagefolder "
                                                          "(default synthetic)")
    p.add_argument("--data-dir", help="dataset folder (CIFAR-10 npz or cifar-10-batches-py; ImageFolder root)")
    p.add_argument("--bits", help="bit-widths to certify at, each trained (or 32) (default: the trained ones)")
    p.add_argument("--patch-size", default=str(default_patch_side()),
                   help=f"square patch side(s) in pixels, e.g. 6 or 4,6 (default {default_patch_side()})")
    p.add_argument("--mask-positions", type=arg_int(2), default=6, help="mask positions per axis (default 6)")
    p.add_argument("--method", default="patchcleanser", help=f"{' | '.join(METHODS)} (default patchcleanser)")
    p.add_argument("--axis-coverage", type=arg_int(1), default=2,
                   help="certmask: masks covering each patch location per axis (default 2)")
    p.add_argument("--n", type=arg_int(1), default=1000, help="certify the first N test images (default 1000)")
    p.add_argument("--batch-size", type=arg_int(1), default=256, help="masked images per forward (default 256)")
    p.add_argument("--cross-check-iters", type=arg_int(0), default=0,
                   help="also attack the certified images with a per-image patch of this many steps and check the "
                        "defended labels hold (default 0: off)")
    p.add_argument("--cross-check-step", type=arg_float(0, 1, lo_open=True), default=0.1,
                   help="signed-gradient step of that attack (default 0.1)")
    p.add_argument("--seed", type=arg_seed(), default=0, help="seed of the synthetic test set and the cross-check "
                                                              "attack (default 0)")
    p.add_argument("--threads", type=arg_int(1, 1024), help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--out", required=True, help="output directory (certify.json, certify.md, certify.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _patch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise QNNError(f"--patch-size must be integers such as 6 or 4,6, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise QNNError(f"--patch-size must be distinct positive integers such as 6 or 4,6, got {text!r}")
    return sorted(sizes)


def cmd_certify(a) -> int:
    from qnn.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, sha256_file, trained_bits
    from qnn.data import check_data_fits, load_dataset
    from qnn.train import versions

    if a.method not in METHODS:
        raise QNNError(f"unknown --method '{a.method}'; choose from {', '.join(METHODS)}")
    sizes = _patch_sizes(a.patch_size)
    bits_given = parse_bits(a.bits) if a.bits is not None else None
    if a.threads:
        torch.set_num_threads(a.threads)
    with StagedDir(a.out, overwrite=a.overwrite, what="certification result",
                   inputs=(a.checkpoint, a.data_dir)) as stage:
        model, obj = load_checkpoint(a.checkpoint, user_model=a.model)
        trained = trained_bits(obj)
        bits = bits_given or trained or [32]
        untrained = [b for b in bits if b not in trained and b != 32]
        if untrained:
            raise QNNError(f"{a.checkpoint} was not trained at {untrained} bits (trained: {trained}); certify at "
                           f"those or 32")
        fill_pixels(model)
        H = getattr(model, "in_size", None) or 32
        coverage = a.axis_coverage if a.method == "certmask" else 1
        sets = {p: mask_set(a.method, (H, H), p, a.mask_positions, coverage) for p in sizes}  # validates each size
        test = load_dataset(a.dataset, "test", a.data_dir, seed=a.seed, like=model)
        check_data_fits(model, test, "test set")
        if a.n > len(test):
            raise QNNError(f"--n {a.n} is more than the {len(test)} images of the test set; give at most {len(test)}")
        x, y = test.subset(a.n).tensors()
        try:
            model.to(a.device)
        except (RuntimeError, AssertionError) as e:
            raise QNNError(f"--device {a.device}: {str(e).splitlines()[0][:160]}") from None
        out = stage.prepare()
        res = _run(a, model, x, y, bits, sets)
        res.update({
            "command": "qnn certify " + shlex.join(_argv(a)),
            "config": {"checkpoint": a.checkpoint, "checkpoint_sha256": sha256_file(a.checkpoint),
                       "model": obj.get("arch"), "dataset": a.dataset, "data_dir": a.data_dir, "n_images": len(x),
                       "images": f"the first {len(x)} of the test set", "bits": bits, "patch_sizes": sizes,
                       "mask_positions": a.mask_positions, "method": a.method, "axis_coverage": coverage,
                       "batch_size": a.batch_size, "device": a.device, "cross_check_iters": a.cross_check_iters,
                       "cross_check_step": a.cross_check_step},
            "trained_bits": trained, "defense": obj.get("defense"), "seed": a.seed,
            "threads": torch.get_num_threads(), "versions": versions(),
            "fill": {"pixel": [float(v) for v in fill_pixels(model)], "normalised": 0.0,
                     "note": "masked pixels normalise to exactly 0.0: the input quantizer's zero point"},
            "mask_sets": {str(p): ms.to_dict() for p, ms in sets.items()},
        })
        atomic_write_json(out / "certify.json", res)
        md = _markdown(res)
        atomic_write_bytes(out / "certify.md", md.encode())
        _plot(res, out / "certify.png")
        stage.publish()
    print(md, end="")
    print(json.dumps({"out": str(stage.out / "certify.json")}))
    return 0


def _argv(a) -> list[str]:
    """The options as given (argparse's namespace back to flags), for the result's record of the command."""
    skip = {"cmd", "func"}
    out = []
    for k, v in vars(a).items():
        if k in skip or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def _run(a, model, x, y, bits, sets) -> dict:
    res: dict = {"results": {}, "cross_check": {}}
    for b in bits:
        rows = res["results"].setdefault(str(b), {})
        with precision(model, b):
            for p, ms in sets.items():
                t0 = time.perf_counter()
                cert = certify(model, x, ms, b, a.batch_size, a.device)
                with torch.no_grad():
                    plain = torch.cat([model(x[i:i + a.batch_size].to(a.device)).argmax(1).cpu()
                                       for i in range(0, len(x), a.batch_size)]).numpy()
                s = cert.summary(y.numpy())
                s.update(n_masks=len(ms), undefended_clean_acc_pct=100.0 * float((plain == y.numpy()).mean()),
                         seconds=time.perf_counter() - t0, predictions=cert.pred.tolist(),
                         certified="".join("1" if c else "0" for c in cert.certified))
                rows[str(p)] = s
                print(f"{b} bits, patch {p}: certified {s['certified_acc_pct']:.1f}%, defended clean "
                      f"{s['clean_acc_pct']:.1f}% ({len(ms)} masks, "
                      f"{s['forwards_per_image_certify']:.1f} forwards/image)", file=sys.stderr, flush=True)
                if a.cross_check_iters:
                    cc = attack_cross_check(model, x, y, ms, b, cert, a.cross_check_iters, a.cross_check_step, a.seed,
                                            a.batch_size, a.device)
                    res["cross_check"].setdefault(str(b), {})[str(p)] = cc
                    if cc["violations"]:
                        raise QNNError(f"{b} bits, patch {p}: a patch changed the defended label of "
                                       f"{cc['violations']} certified image(s) {cc['violating_images'][:5]}: the "
                                       f"certificate does not hold (a bug: please report it)")
    return res


def _markdown(res: dict) -> str:
    c = res["config"]
    head = (f"# Certified patch robustness: {c['method']}\n\n`{c['checkpoint']}` ({c['model']}), {c['n_images']} "
            f"{c['dataset']} test images, {c['mask_positions']} mask positions per axis"
            + (f", axis coverage {c['axis_coverage']}" if c["method"] == "certmask" else "") + ".\n\n")
    rows = [[b, p, r["n_masks"], r["undefended_clean_acc_pct"], r["clean_acc_pct"], r["certified_acc_pct"],
             r["forwards_per_image_certify"], r["forwards_per_image_inference_mean"]]
            for b, per in res["results"].items() for p, r in per.items()]
    table = markdown_table(["bits", "patch", "masks", "undefended clean %", "defended clean %", "certified %",
                            "forwards/image (certify, mean)", "forwards/image (inference, mean)"], rows)
    cc = [[b, p, r["n_certified"], r["n_undefended_fooled"], r["violations"]]
          for b, per in res.get("cross_check", {}).items() for p, r in per.items()]
    if cc:
        table += ("\nCross-check: a per-image patch attack on the certified images\n\n"
                  + markdown_table(["bits", "patch", "certified", "undefended fooled", "defended wrong"], cc))
    return head + table


def _plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qnn.checkpoint import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b, per in res["results"].items():
        ps = sorted(per, key=int)
        ax.plot([int(p) for p in ps], [per[p]["certified_acc_pct"] for p in ps], marker="o",
                label=f"{b} bits" if b != "32" else "float")
    ax.set_xticks(res["config"]["patch_sizes"])
    ax.set_xlabel("patch size (pixels)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(f"{res['config']['method']}, {res['config']['n_images']} images")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    """`qnn certify ARGS` as a program of its own."""
    from qnn.cli import main as qnn_main

    return qnn_main(["certify", *(sys.argv[1:] if argv is None else argv)])


COMMANDS = {"certify": (add_parser, cmd_certify)}

if __name__ == "__main__":
    sys.exit(main())

"""`qnn export`, `qnn verify`, `qnn bundle`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qnn.cli_options import add_user_model_option
from qnn.errors import QNNError
from qnn.outputs import check_output
from qnn.validate import arg_int


def _load_at_bits(ckpt: str, bits: int, user_model: str | None = None):
    from qnn.checkpoint import load_checkpoint, sha256_file, trained_bits

    model, obj = load_checkpoint(ckpt, user_model=user_model)
    trained = trained_bits(obj)
    if bits not in trained:
        raise QNNError(f"{ckpt} has no {bits}-bit state (trained at {trained}); export one of those bit-widths")
    return model, obj, sha256_file(ckpt)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export one bit-width to QONNX, QCDQ or integer ONNX")
    p.add_argument("--checkpoint", required=True, help="qnn checkpoint (model.pt written by qnn train)")
    add_user_model_option(p)
    p.add_argument("--bits", type=arg_int(2, 8), required=True, help="bit-width to export, 2..8 (one the model was trained at)")
    p.add_argument("--format", default="int",
                   help="int: true-integer ONNX (QLinearConv...) | qcdq: Quantize-Clip-Dequantize | qonnx: QONNX Quant nodes (default int)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--weight-type", default="auto", choices=["auto", "int8", "uint8"],
                   help="integer weight container (format int): auto = uint8 (zero point 128) for layers whose |w| > 64, "
                        "which ORT's u8s8 kernels can saturate on x86 without VNNI, int8 for the rest")


def cmd_export(a) -> int:
    from qnn.checkpoint import trained_bits
    from qnn.export.onnx_export import FORMATS, export_model
    from qnn.export.verify import verify

    if a.format not in FORMATS:
        raise QNNError(f"unknown format '{a.format}'; choose from {', '.join(FORMATS)}")
    check_output(a.out, "file", (a.checkpoint,), overwrite=a.overwrite)
    model, obj, sha = _load_at_bits(a.checkpoint, a.bits, a.model)
    meta = {"source_checkpoint_sha256": sha, "class_names": obj.get("classes") or [str(i) for i in range(model.num_classes)],
            "trained_bits": trained_bits(obj), "defense": obj.get("defense", "none")}
    out = export_model(model, a.bits, a.format, a.out, meta, weight_type=a.weight_type)
    info = {"out": str(out), "format": a.format, "bits": a.bits}
    if a.format != "qonnx":
        info["census"] = verify(out)
    print(json.dumps(info, indent=2))
    if a.format != "qonnx" and not info["census"]["fully_integer"]:
        print(f"qnn: export: {out} is NOT fully integer: float compute ops {info['census']['float_compute_ops']}"
              + ("" if info["census"].get("integer_compute_ops", True) else " and no integer compute node"),
              file=sys.stderr)
        return 1
    return 0


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="op census of the ORT-optimised graph; exit 1 if float compute remains")
    p.add_argument("model", help="ONNX file to check")
    p.add_argument("--level", default="extended", choices=["basic", "extended", "all"],
                   help="ORT graph optimisation level the census runs at (default extended)")


def cmd_verify(a) -> int:
    from qnn.export.verify import verify

    c = verify(a.model, a.level)
    print(f"{a.model}: ORT-optimised ({a.level}) op census")
    for op, n in c["ops"].items():
        print(f"  {op:28s} {n}")
    if c["fully_integer"]:
        print("fully integer: yes (only the input QuantizeLinear and data movement outside integer kernels)")
        return 0
    if not c["integer_compute_ops"] and not c["float_compute_ops"]:
        print("fully integer: NO, the graph has no compute node at all (data movement only): not an integer model")
        return 1
    print(f"fully integer: NO, float compute ops remain: {sorted(set(c['float_compute_ops']))}")
    return 1


def add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help="edge bundle: integer model, eval set, patches, fake-quant results, manifest")
    p.add_argument("--checkpoint", required=True, help="qnn checkpoint (model.pt written by qnn train)")
    add_user_model_option(p)
    p.add_argument("--bits", type=arg_int(2, 8), required=True, help="bit-width to deploy, 2..8")
    p.add_argument("--dataset", default="synthetic", help="synthetic (embedded, no download) | cifar10 | imagefolder (default synthetic)")
    p.add_argument("--data-dir", help="dataset folder (CIFAR-10 npz or cifar-10-batches-py; ImageFolder root)")
    p.add_argument("--n", type=arg_int(1), default=500, help="evaluation images in the bundle")
    p.add_argument("--patch", action="append", default=[], help="patch .npz from `qnn attack` (repeatable)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (swapped in only when complete)")
    p.add_argument("--pack-weights", action="store_true",
                   help="ship 2/4-bit weights packed 4/2 per byte (weights.packed.npz); run_edge.py unpacks them")
    # the mask set's options are `qnn certify`'s (one patch size: a bundle carries one set)
    p.add_argument("--certify-patch-size", type=arg_int(1),
                   help="carry a certification mask set for a square patch of this side (pixels) and PyTorch's "
                        "certified inference per image (masks.json, expected_certify.npz); run_edge.py --certify "
                        "checks it on the device (default: no mask set)")
    p.add_argument("--mask-positions", type=arg_int(2),
                   help="with --certify-patch-size: mask positions per axis (default 6)")
    p.add_argument("--method", help="with --certify-patch-size: patchcleanser | certmask (default patchcleanser)")
    p.add_argument("--axis-coverage", type=arg_int(1),
                   help="with --certify-patch-size --method certmask: masks covering each patch location per axis "
                        "(default 2)")


def cmd_bundle(a) -> int:
    from qnn.export.bundle import build_bundle
    from qnn.attacks.patch import load_patch
    from qnn.data import check_data_fits, load_dataset

    check_output(a.out, "dir", (a.checkpoint, a.data_dir, *a.patch))
    model, obj, sha = _load_at_bits(a.checkpoint, a.bits, a.model)
    ds = load_dataset(a.dataset, "test", a.data_dir, like=model).subset(a.n)
    check_data_fits(model, ds, "bundle images")
    patches = []
    for p in a.patch:
        t, cfg = load_patch(p)
        if cfg.image_size != tuple(ds.x.shape[1:3]):
            raise QNNError(f"{p}: patch made for {cfg.image_size} images, the bundle's are {tuple(ds.x.shape[1:3])}")
        patches.append((Path(p).stem, t, cfg))
    out = build_bundle(model, a.bits, a.out, ds.x, ds.y, patches, sha, overwrite=a.overwrite,
                       pack_weights=a.pack_weights, certify_masks=_bundle_mask_set(a, tuple(ds.x.shape[1:3])))
    print(json.dumps({"bundle": str(out)}))
    return 0


def _bundle_mask_set(a, image_size: tuple[int, int]):
    """The mask set `qnn bundle` carries (None without --certify-patch-size), validated as `qnn certify` does."""
    from qnn.certify import METHODS, mask_set

    given = [f for f, v in (("--mask-positions", a.mask_positions), ("--method", a.method),
                            ("--axis-coverage", a.axis_coverage)) if v is not None]
    if a.certify_patch_size is None:
        if given:
            raise QNNError(f"{', '.join(given)} describe the certification mask set: give --certify-patch-size too")
        return None
    method = a.method or "patchcleanser"
    if method not in METHODS:
        raise QNNError(f"unknown --method '{method}'; choose from {', '.join(METHODS)}")
    if method != "certmask" and a.axis_coverage is not None:
        raise QNNError("--axis-coverage applies to --method certmask only (PatchCleanser's coverage is 1)")
    coverage = (2 if a.axis_coverage is None else a.axis_coverage) if method == "certmask" else 1
    return mask_set(method, image_size, a.certify_patch_size, a.mask_positions or 6, coverage)


COMMANDS = {"export": (add_export, cmd_export), "verify": (add_verify, cmd_verify), "bundle": (add_bundle, cmd_bundle)}

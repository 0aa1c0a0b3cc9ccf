"""Edge bundle: integer model + evaluation set + patches + the PyTorch model's expected figures per CPU family +
manifest with sha256s; optionally the 2/4-bit weights packed beside the model, and a certification mask set with
PyTorch's per-image certificates (issue #37).

The edge runner (`export/run_edge.py`, copied into the bundle) consumes it on the device with only numpy + onnxruntime.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from qnn.checkpoint import atomic_write_bytes, atomic_write_json, sha256_file
from qnn.errors import QNNError

MANIFEST = "manifest.json"
RUNNER = "run_edge.py"  # the edge runner's copy in every bundle
PACKED_WEIGHTS = "weights.packed.npz"
#: the certification mask set (JSON) and PyTorch's certified inference per image and CPU family (npz)
MASKS, EXPECTED_CERTIFY = "masks.json", "expected_certify.npz"
MASKS_FORMAT = "qnn-mask-set-v1"


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def build_bundle(model, bits: int, out_dir: str | Path, x_uint8: np.ndarray, y: np.ndarray,
                 patches: list[tuple[str, torch.Tensor, object]], checkpoint_sha: str | None = None,
                 tolerance_pct: float = 0.5, overwrite: bool = False, pack_weights: bool = False,
                 certify_masks=None) -> Path:
    """Write the bundle. `patches`: (name, patch (C,h,w), PatchConfig) evaluated at fixed per-image locations (C: the
    model's input channels).
    `pack_weights`: 2/4-bit weights travel packed (4 or 2 per byte) in `weights.packed.npz`, declared external in
    the model, and the edge runner unpacks them into the session.
    `certify_masks`: a qnn.certify.MaskSet for the bundle's images; the bundle then carries it (masks.json) and
    PyTorch's certified inference per image and CPU family (expected_certify.npz), which `run_edge.py --certify`
    checks image by image.
    Built beside `out_dir` and swapped in when complete and checked: an earlier bundle survives a failure."""
    from qnn.export.onnx_export import check_exportable
    from qnn.outputs import StagedDir

    check_exportable(model)
    names = [name for name, _, _ in patches]
    if len(set(names)) != len(names):
        raise QNNError(f"patch names must differ (each names a file of the bundle), got {names}")
    for name, patch, cfg in patches:  # validated before anything is written
        if not isinstance(name, str) or not name or any(c in name for c in "/\\\0") or name.startswith("."):
            raise QNNError(f"patch name {name!r} is not a plain file name")
        want = (model.in_channels, *cfg.patch_shape)
        if tuple(patch.shape) != want or not bool(((patch >= 0) & (patch <= 1)).all()):
            raise QNNError(f"patch '{name}': expected finite pixels in [0, 1] of shape {want}")
    if certify_masks is not None:
        from qnn.certify import MaskSet

        if not isinstance(certify_masks, MaskSet) or tuple(certify_masks.image_size) != tuple(x_uint8.shape[1:3]):
            raise QNNError(f"certify_masks must be a qnn.certify.MaskSet for the bundle's "
                           f"{tuple(x_uint8.shape[1:3])} images")
    with StagedDir(out_dir, overwrite=overwrite, what="bundle") as stage:
        out = stage.prepare()
        _write_bundle(model, bits, out, x_uint8, y, patches, checkpoint_sha, tolerance_pct, pack_weights,
                      certify_masks)
        check_manifest(out)
        return stage.publish()


def _write_bundle(model, bits, out: Path, x_uint8, y, patches, checkpoint_sha, tolerance_pct, pack_weights,
                  certify_masks=None) -> None:
    from qnn.export.onnx_export import export_model
    from qnn.attacks.patch import asr_metrics, make_mask, placement_locations, apply_patch
    from qnn.data import to_tensor
    from qnn.kernels.reference import CPU_FAMILIES, host_cpu_family
    from qnn.layers import precision

    export_model(model, bits, "int", out / "model.onnx", meta={"source_checkpoint_sha256": checkpoint_sha or ""})
    packed = _pack_weights(out) if pack_weights else None
    model.eval()
    x = to_tensor(x_uint8)
    yt = torch.as_tensor(y)
    atomic_write_bytes(out / "eval.npz", _npz_bytes(x=x_uint8, y=np.asarray(y, np.int64)))
    placed = []
    for name, patch, cfg in patches:  # one placement per image, shared by every CPU family
        with precision(model, bits):
            loc = placement_locations(model, x, yt, patch, cfg).numpy()
        mask = make_mask(cfg.shape, *cfg.patch_shape)
        atomic_write_bytes(out / f"patch_{name}.npz", _npz_bytes(patch=patch.numpy().astype(np.float32),
                                                                  mask=mask.numpy().astype(np.float32), loc=loc.astype(np.int64)))
        placed.append((name, patch, mask, torch.as_tensor(loc), cfg))
    # the expected figures per CPU family: ORT's QLinearAdd rounds differently on x86-64 and aarch64, and the
    # device checks against its own family's; the top-level figures are the building host's family
    host = host_cpu_family()
    pred_arrays, logit_arrays, by_family, host_patches = {}, {}, {}, {}
    for family in CPU_FAMILIES:
        with precision(model, bits, cpu=family):
            logits = {"clean": _logits(model, x)}
            for name, patch, mask, loc, cfg in placed:
                logits[f"patch_{name}"] = _logits(model, apply_patch(x, patch, mask, loc))
            preds = {k: v.argmax(1) for k, v in logits.items()}
            clean_pred = preds["clean"]
            fam = {"clean_acc_pct": float(100 * (clean_pred == y).mean()), "asr_pct": {}}
            for name, patch, mask, loc, cfg in placed:
                adv_pred = preds[f"patch_{name}"]
                m = asr_metrics(clean_pred, adv_pred, y, cfg.targeted, cfg.target_class)
                fam["asr_pct"][name] = m["asr_pct"]
                if family == host:
                    host_patches[name] = {**m, "targeted": cfg.targeted, "target_class": cfg.target_class,
                                          "patch_shape": list(cfg.patch_shape), "shape": cfg.shape,
                                          "placement": cfg.placement}
        by_family[family] = fam
        pred_arrays.update({f"{family}.{k}": v.astype(np.int64) for k, v in preds.items()})
        logit_arrays.update({f"{family}.{k}": v for k, v in logits.items()})
        if family == host:
            pred_arrays.update({k: v.astype(np.int64) for k, v in preds.items()})
    expected = {"bits": bits, "n_images": int(len(y)), "num_classes": int(model.num_classes),
                "clean_acc_pct": by_family[host]["clean_acc_pct"], "tolerance_pct": tolerance_pct,
                "cpu_family": host, "patches": host_patches, "by_cpu_family": by_family}
    atomic_write_bytes(out / "expected_predictions.npz", _npz_bytes(**pred_arrays))
    # the integer model's logits must equal these bit for bit on the device (its family's): the edge runner checks
    from qnn.export import run_edge

    atomic_write_bytes(out / run_edge.EXPECTED_LOGITS, _npz_bytes(**logit_arrays))
    atomic_write_json(out / "expected.json", expected)
    if certify_masks is not None:
        _write_certificates(model, bits, out, x, certify_masks, host)
    # the runner travels with the bundle (and is hashed with it): a device needs the folder and nothing else
    atomic_write_bytes(out / RUNNER, Path(run_edge.__file__).read_bytes())
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"format": "qnn-edge-bundle-v2", "model": "model.onnx", "eval": "eval.npz", "expected": "expected.json",
                "files": {f: sha256_file(out / f) for f in files}}
    if packed:
        manifest["packed_weights"] = packed
    if certify_masks is not None:
        manifest["certify"] = {"masks": MASKS, "expected": EXPECTED_CERTIFY}
    atomic_write_json(out / MANIFEST, manifest)


def _write_certificates(model, bits: int, out: Path, x: torch.Tensor, ms, host: str) -> None:
    """masks.json (the mask set) and expected_certify.npz: per CPU family `{family}.pred`, `{family}.certified`,
    `{family}.inference_forwards` of qnn.certify.certify on the bundle's images (the host family's also unprefixed,
    as expected_predictions.npz has them)."""
    from qnn.certify import certify
    from qnn.kernels.reference import CPU_FAMILIES
    from qnn.layers import precision

    arrays = {}
    for family in CPU_FAMILIES:  # the masked images go through QLinearAdd too: each family's own certificates
        with precision(model, bits, cpu=family):
            c = certify(model, x, ms, bits)
        fam = {"pred": c.pred.astype(np.int64), "certified": c.certified.astype(bool),
               "inference_forwards": c.inference_forwards.astype(np.int64)}
        arrays.update({f"{family}.{k}": v for k, v in fam.items()})
        if family == host:
            arrays.update(fam)
    atomic_write_bytes(out / EXPECTED_CERTIFY, _npz_bytes(**arrays))
    atomic_write_json(out / MASKS, {
        "format": MASKS_FORMAT, **ms.to_dict(), "bits": bits, "num_classes": int(model.num_classes),
        "forwards_per_image_certify_worst": int(c.worst_forwards),
        "fill": "the input normalisation's zero (the mean in pixels): masked pixels are exactly 0.0 normalised, the "
                "input quantizer's zero point"})


@torch.no_grad()
def _logits(model, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    """The model's float32 logits (it is in eval mode at the bundle's bit-width)."""
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy().astype(np.float32)


def _pack_weights(out: Path) -> dict | None:
    """Move the model's 2/4-bit weights, packed, into weights.packed.npz; the manifest entry that describes them."""
    import onnx

    from qnn.kernels.packing import pack_model_weights

    model, arrays, specs = pack_model_weights(onnx.load(str(out / "model.onnx")), PACKED_WEIGHTS)
    if not arrays:
        return None
    atomic_write_bytes(out / PACKED_WEIGHTS, _npz_bytes(**arrays))
    atomic_write_bytes(out / "model.onnx", model.SerializeToString())
    return {"file": PACKED_WEIGHTS, "tensors": specs}


def check_manifest(bundle: str | Path) -> dict:
    """Raise QNNError unless the bundle passes the edge runner's own rule (export/run_edge.py `Bundle`): every file
    listed with its sha256, plain names inside the folder, no links, hashes matching. Returns the manifest."""
    from qnn.export.run_edge import Bundle, EdgeError

    try:
        return Bundle(str(bundle)).manifest
    except EdgeError as e:
        raise QNNError(f"{bundle}: {e}") from None

"""Checkpoints: atomic writes, `weights_only=True` loads, clear errors for corrupt or foreign files; a qnn checkpoint
rebuilds its model, a float one loads into a quantized model's float weights (`load_float_weights`)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from qnn.errors import QNNError
from qnn.layers import BIT_CHOICES, parse_bits

if TYPE_CHECKING:
    from qnn.models.quantized import QuantizedNet

#: v2: models on Brevitas layers (qnn.quantize); v1 held the toolkit's earlier own ResNet layers
FORMAT = "qnn-checkpoint-v2"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write beside `path`, then rename into place: an earlier file survives a crash or a full disk (one line)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, read-only, permissions: the earlier file is unchanged
            raise QNNError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(obj: dict) -> str:
    """sha256 of what a checkpoint (`load_torch_file`'s dict) computes: its architecture, kwargs, trained bit-widths and
    every tensor of its state (name, dtype, shape, bytes), not the timings and paths saved beside them. The same
    training run again gives the same value where the file's own sha256 differs, so results keyed on it survive a
    retrained checkpoint (and a lost runs/ folder) as long as the training repeats to the bit."""
    h = hashlib.sha256()
    h.update(json.dumps([obj.get("arch"), obj.get("arch_kwargs", {}), trained_bits(obj)], sort_keys=True,
                        default=str).encode())
    for name, t in sorted(obj["state_dict"].items()):
        t = t.detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_torch_file(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise QNNError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or holding objects weights_only refuses
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise QNNError(f"{p}: not a readable checkpoint (corrupt, truncated or unsafe pickle): {msg}") from None


def save_checkpoint(path: str | Path, model: nn.Module, extra: dict | None = None) -> None:
    """Save the model with every per-bit-width scale and BatchNorm, its architecture and kwargs (and for a user's own
    model file, its sha256: loading then requires that very file, named by the user)."""
    from qnn.models.registry import is_user_model, user_model_parts

    arch = getattr(model, "arch", None)
    obj = {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": getattr(model, "arch_kwargs", {}),
        "state_dict": model.state_dict(),
    }
    if is_user_model(arch):
        obj["arch_sha256"] = user_model_parts(arch)[2]
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)


def load_checkpoint(path: str | Path, expect_arch: str | None = None, user_model: str | None = None
                    ) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was saved from; returns (model, the checkpoint dict). A checkpoint of a user's
    own model (`file.py:factory`) never runs code by itself: the user names the file (`user_model`), and it must be
    the file the checkpoint was trained from (same factory, same sha256)."""
    from qnn.models import create_model

    obj = load_torch_file(path)
    if isinstance(obj, dict) and obj.get("format") == "qnn-checkpoint-v1":
        raise QNNError(f"{path}: a checkpoint of qnn's earlier ResNet layers (format v1); models now run on Brevitas "
                       f"layers and their state differs: retrain it with this version (float weights go through --init)")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise QNNError(f"{path}: not a qnn checkpoint (format key missing); float weights go through --init")
    arch, kwargs, sd = obj.get("arch"), obj.get("arch_kwargs", {}), obj.get("state_dict")
    if not isinstance(arch, str):
        raise QNNError(f"{path}: checkpoint names no model architecture (arch is {arch!r})")
    from qnn.models.registry import is_user_model, user_model_parts

    if is_user_model(arch):
        if not is_user_model(user_model):
            raise QNNError(f"{path}: this checkpoint was trained from user code '{arch}'; pass --model "
                           f"path/to/that/file.py:{arch.rpartition(':')[2]} to rebuild it (a checkpoint never runs code "
                           f"by itself)")
        _, factory, sha = user_model_parts(user_model)
        if factory != arch.rpartition(":")[2] or sha != obj.get("arch_sha256"):
            raise QNNError(f"{path}: --model {user_model} is not the file and factory this checkpoint was trained from "
                           f"('{arch}', sha256 {str(obj.get('arch_sha256'))[:12]}...)")
        arch = user_model
    elif expect_arch is not None and arch != expect_arch:
        raise QNNError(f"{path}: checkpoint is of model '{arch}', expected '{expect_arch}'")
    elif user_model is not None and user_model != arch:
        raise QNNError(f"{path}: checkpoint is of model '{arch}', --model says '{user_model}'")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise QNNError(f"{path}: arch_kwargs must be a mapping of argument names, got {type(kwargs).__name__}")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise QNNError(f"{path}: checkpoint has no state_dict of tensors")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise QNNError(f"{path}: non-finite (NaN/inf) values in {len(bad)} tensor(s), e.g. {bad[0]}; the model diverged "
                       f"or the file was altered")
    if "trained_bits" in obj:
        try:
            obj["trained_bits"] = parse_bits(obj["trained_bits"])
        except QNNError as e:
            raise QNNError(f"{path}: trained_bits: {e}") from None
        config_bits = obj.get("config", {}).get("bits") if isinstance(obj.get("config"), dict) else None
        if config_bits is not None:
            try:
                config_bits = parse_bits(config_bits)
            except QNNError as e:
                raise QNNError(f"{path}: the training config's bits: {e}") from None
        if config_bits is not None and sorted(set(config_bits)) != sorted(set(obj["trained_bits"])):
            raise QNNError(f"{path}: trained_bits {obj['trained_bits']} disagree with its training config's bits "
                           f"{config_bits}; the file was altered")
    kwargs = {"reduce_range": False, **kwargs}  # checkpoints from before the option have full-range 8-bit weights
    try:
        model = create_model(arch, **kwargs)
    except (TypeError, ValueError) as e:
        raise QNNError(f"{path}: arch_kwargs do not fit model '{arch}': {str(e).splitlines()[0][:160]}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split()).replace(f"Error(s) in loading state_dict for {type(model).__name__}: ", "")
        raise QNNError(f"{path}: state dict does not fit model '{arch}': {detail[:240]}") from None
    return model, obj


def load_float_weights(model: QuantizedNet, path: str) -> QuantizedNet:
    """Load a float checkpoint of the model's float definition (e.g. the shared pretrained CIFAR ResNets; loaded with
    weights_only) into the quantized model: conv / linear weights as they are, each BatchNorm into every bit-width's
    copy. Every key must match in name and shape, both ways: a one-line error names the first that does not."""
    obj = load_torch_file(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise QNNError(f"{path}: not a float state dict checkpoint")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.body.state_dict()
    arch = getattr(model, "arch", "this model")
    mapped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        prefix, _, field = k.rpartition(".")
        targets = [k] if k in own else [f"{prefix}.bns.{i}.{field}" for i in range(len(BIT_CHOICES))]
        for t in targets:
            if t not in own:
                raise QNNError(f"{path}: checkpoint does not match {arch} (it has '{k}', the model does not)")
            if own[t].shape != v.shape:
                raise QNNError(f"{path}: checkpoint does not match {arch} ('{k}' is {tuple(v.shape)}, the model's "
                               f"{tuple(own[t].shape)})")
            mapped[t] = v
    # every parameter and BatchNorm statistic must come from the file (a counter of batches seen need not)
    params = {k for k in own if not any(t in k for t in ("tensor_quant", "_sentinel", "num_batches_tracked"))}
    missing = sorted(params - set(mapped))
    if missing:
        raise QNNError(f"{path}: checkpoint does not match {arch} (no '{missing[0]}')")
    model.body.load_state_dict(mapped, strict=False)
    return model


def trained_bits(obj: dict) -> list[int]:
    """The bit-widths a loaded checkpoint (`load_checkpoint`'s dict) was trained at: the one place that says so ([]
    for a model trained at none, such as float weights wrapped by hand)."""
    return list(obj.get("trained_bits", []))

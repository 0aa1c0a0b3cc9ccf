"""Model registry: `create_model(name, **kw)`, `list_models()` (timm style): the zoo's float networks
(`qnn.models.zoo`) made switchable as `QuantizedNet`s, factories registered with `register_model`, and users' own
models given as `path/to/file.py:factory` (a float CNN, quantized with `qnn.quantize`, or a model already on
Brevitas layers)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from pathlib import Path
from typing import Callable

import torch.nn as nn

from qnn.errors import QNNError
from qnn.models.quantized import QuantizedNet
from qnn.models.zoo import DEFAULT_SIDE, ZOO

# factories of whole models (`register_model`); the zoo's float networks are in ZOO
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# QuantizedNet's own settings, beside the float network, its classes and its input side
_NET_ARGS = set(inspect.signature(QuantizedNet).parameters) - {"body", "num_classes", "in_size"}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory of a whole model (with the zoo's interface: `num_classes`, `in_size`, ...) by its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted({*ZOO, *_REGISTRY})


def takes_in_size(name: str) -> bool:
    """Whether the model takes `in_size` (the 224x224 models, fully convolutional); the CIFAR models are 32x32 only."""
    if name in _REGISTRY:
        return "in_size" in inspect.signature(_REGISTRY[name]).parameters
    return name in ZOO and ZOO[name].side is None


def is_user_model(name) -> bool:
    """`file.py:factory`: a model defined in the user's own file."""
    return isinstance(name, str) and ".py:" in name


def user_model_parts(spec: str) -> tuple[Path, str, str]:
    """(file, factory name, sha256 of the file) of a `file.py:factory` spec; the file must exist."""
    path, _, factory = spec.rpartition(":")
    p = Path(path)
    if not factory.isidentifier():
        raise QNNError(f"--model {spec!r}: expected path/to/file.py:factory_function")
    if not p.is_file():
        raise QNNError(f"model file not found: {p}")
    return p, factory, hashlib.sha256(p.read_bytes()).hexdigest()


def _said(e: BaseException) -> str:
    """`Type: first line of its message` of an exception raised by the user's code."""
    msg = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _user_factory(spec: str) -> Callable[..., nn.Module]:
    p, name, sha = user_model_parts(spec)
    mod_spec = importlib.util.spec_from_file_location(f"qnn_user_model_{sha[:16]}", p)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # the user's file failed to import (or exited): say where
        raise QNNError(f"{p}: importing it failed: {_said(e)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise QNNError(f"{p} defines no function '{name}'")
    return fn


def _zoo_model(name: str, **kw) -> QuantizedNet:
    """The zoo's float network `name`, quantized: `kw` holds the float factory's arguments (num_classes, width_mult),
    `in_size` where the network takes any side, and QuantizedNet's settings (mean, std, first_last_bits, ...)."""
    entry = ZOO[name]
    net_kw = {k: kw.pop(k) for k in list(kw) if k in _NET_ARGS}
    if entry.side is None:
        side = kw.pop("in_size", DEFAULT_SIDE)
    elif "in_size" in kw:
        raise TypeError(f"{name}() got an unexpected keyword argument 'in_size' (it takes {entry.side}x{entry.side} "
                        f"images only)")
    else:
        side = entry.side
    return QuantizedNet(entry.factory(**kw), kw.get("num_classes", entry.num_classes), side, **net_kw)


def _user_model(spec: str, num_classes: int | None = None, in_size: int | None = None, **kw) -> nn.Module:
    factory = _user_factory(spec)
    takes = inspect.signature(factory).parameters
    try:
        model = factory(**({"num_classes": num_classes} if num_classes is not None and "num_classes" in takes else {}))
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # sys.exit in a factory must not end the command silently
        raise QNNError(f"{spec}: the factory raised {_said(e)}") from None
    if not isinstance(model, nn.Module):
        raise QNNError(f"{spec}: the factory returned a {type(model).__name__}, not a torch nn.Module")
    heads = [m.out_features for m in model.modules() if hasattr(m, "out_features")]
    outputs = heads[-1] if heads else None
    if num_classes is not None and outputs is not None and outputs != num_classes:
        raise QNNError(f"{spec}: the model has {outputs} outputs, the data {num_classes} classes")
    return QuantizedNet(model, num_classes or outputs, in_size, **kw)


def create_model(name: str, **kw) -> nn.Module:
    if is_user_model(name):
        model = _user_model(name, **kw)
    elif name in _REGISTRY:
        model = _REGISTRY[name](**kw)
    elif name in ZOO:
        model = _zoo_model(name, **kw)
    else:
        raise QNNError(f"unknown model '{name}'; available: {', '.join(list_models())}, or path/to/file.py:factory")
    model.arch = name  # type: ignore[attr-defined]
    # what rebuilds this model from a checkpoint, defaults that shape its integer grids included
    model.arch_kwargs = dict(kw)  # type: ignore[attr-defined]
    if "num_classes" in kw and kw["num_classes"] is None:  # a user's model chose its classes: record them
        model.arch_kwargs["num_classes"] = model.num_classes  # type: ignore[attr-defined]
    if hasattr(model, "reduce_range"):
        model.arch_kwargs["reduce_range"] = model.reduce_range  # type: ignore[attr-defined]
    return model

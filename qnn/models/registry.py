from __future__ import annotations

from typing import Callable

import torch.nn as nn

from qnn.errors import QNNError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kw) -> nn.Module:
    if name not in _REGISTRY:
        raise QNNError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    model = _REGISTRY[name](**kw)
    model.arch = name  # type: ignore[attr-defined]
    model.arch_kwargs = dict(kw)  # type: ignore[attr-defined]
    return model

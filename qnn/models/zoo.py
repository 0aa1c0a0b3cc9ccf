"""The zoo's list of float models: `@zoo_model(side=...)` records a float factory by its name, with the input side
it takes and its default classes. `qnn.models.registry` quantizes what the factory builds; this module imports none of
that, so the float definitions stay plain torch."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

#: the side of a model that takes any side, when none is asked for
DEFAULT_SIDE = 224


@dataclass(frozen=True)
class ZooModel:
    factory: Callable[..., nn.Module]  # the float network: num_classes and its own options (width_mult, ...)
    side: int | None                   # the one input side it takes (the CIFAR models: 32); None: any side
    num_classes: int                   # the factory's default


ZOO: dict[str, ZooModel] = {}


def zoo_model(side: int | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register the float factory under its name; `side`: the one input side the network takes (None: any, fully
    convolutional; `in_size`, default 224)."""

    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ZOO[fn.__name__] = ZooModel(fn, side, inspect.signature(fn).parameters["num_classes"].default)
        return fn

    return register

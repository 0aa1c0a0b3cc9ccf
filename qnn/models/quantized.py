"""A float CNN made switchable by `qnn.quantize`, with the zoo's interface: pixels in [0, 1] in (what patches live
in), normalisation first, then the quantized body; `num_classes`, `in_size`, `mean`, `std` as attributes."""

from __future__ import annotations

import torch
import torch.nn as nn

from qnn.models.resnet import IMAGENET_MEAN, IMAGENET_STD, _input_range


class QuantizedNet(nn.Module):
    def __init__(self, body: nn.Module, num_classes: int, in_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 first_last_bits: int | None = 8, residual_bits: int | None = None):
        super().__init__()
        from qnn.quantization import QuantizeConfig, quantize

        self.mean, self.std, self.in_size, self.num_classes = tuple(mean), tuple(std), in_size, num_classes
        self.register_buffer("_mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.body = quantize(body, QuantizeConfig(first_last_bits=first_last_bits, residual_bits=residual_bits,
                                                  input_range=_input_range(mean, std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self._mean) / self._std)

"""A float CNN made switchable by `qnn.quantize`, with the zoo's interface: pixels in [0, 1] in (what patches live
in), normalisation first, then the quantized body; `num_classes`, `in_size`, `mean`, `std` as attributes.

In eval mode at a quantized bit-width and without autograd, `forward` runs the exported integer graph's arithmetic
exactly (`qnn.integer.IntegerProgram`); with autograd (training, attacks) it runs the differentiable fake-quant form.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qnn.errors import QNNError
from qnn.integer import IntegerProgram, integer_ready
from qnn.layers import uncalibrated, use_integer_path
from qnn.models.resnet import IMAGENET_MEAN, IMAGENET_STD, _input_range


class QuantizedNet(nn.Module):
    def __init__(self, body: nn.Module, num_classes: int, in_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 first_last_bits: int | None = 8, residual_bits: int | None = None):
        super().__init__()
        from qnn.quantization import QuantizeConfig, quantize

        self.mean, self.std, self.in_size, self.num_classes = tuple(mean), tuple(std), in_size, num_classes
        self.first_last_bits, self.residual_bits = first_last_bits, residual_bits
        self.register_buffer("_mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.body = quantize(body, QuantizeConfig(first_last_bits=first_last_bits, residual_bits=residual_bits,
                                                  input_range=_input_range(mean, std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self._mean) / self._std
        if use_integer_path(self) and integer_ready(self.body):
            if uncalibrated(self):
                raise QNNError("activation quantizers at this bit-width were never calibrated; train or calibrate first")
            return IntegerProgram(self.body).run(x)
        return self.body(x)

"""A float CNN made switchable by `qnn.quantize`, with the zoo's interface: pixels in [0, 1] in (what patches live
in), normalisation first, then the quantized body; `num_classes`, `in_size`, `in_channels` (the first conv's),
`mean`, `std` (one value per input channel) as attributes.

In eval mode at a quantized bit-width, `forward` runs the exported integer graph's arithmetic exactly
(`qnn.integer.IntegerProgram`, built once per bit-width and weights: `qnn.integer.program_of`); with autograd on
(attacks) the same integers, with straight-through gradients at each rounding, in the ONNX Runtime arithmetic of the
CPU family `target_cpu` (None: this machine's). Training runs Brevitas' fake-quant form (it learns the scales);
`integer_eval` False selects that form in eval mode too. Set both, and the bit-width, with `qnn.precision`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qnn.errors import QNNError
from qnn.integer import integer_ready, program_of
from qnn.layers import get_bit_width, precision, set_bit_width_, uncalibrated
from qnn.qmodules import ReLU6Quant
from qnn.quantization import QuantizeConfig, quantize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grayscale (and any other channel count): no dataset statistics to borrow, so pixels in [0, 1] map to [-1, 1]
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)


def first_conv_channels(body: nn.Module) -> int:
    """The input channels of the first convolution (in definition order), 3 when the model has none."""
    return next((m.in_channels for m in body.modules() if isinstance(m, nn.Conv2d)), 3)


def input_range(mean, std) -> tuple[float, float]:
    """The normalised input's range for pixels in [0, 1]: what the fixed 8-bit input quantizer covers."""
    lo = min((0.0 - m) / s for m, s in zip(mean, std))
    hi = max((1.0 - m) / s for m, s in zip(mean, std))
    return lo, hi


class QuantizedNet(nn.Module):
    def __init__(self, body: nn.Module, num_classes: int, in_size: int, mean=None, std=None,
                 first_last_bits: int | None = 8, residual_bits: int | None = None, reduce_range: bool = True):
        """mean / std: one value per input channel; by default ImageNet's for 3 channels, 0.5 / 0.5 otherwise (not
        stored in checkpoints: a model rebuilt from one gets the same defaults)."""
        super().__init__()
        c = self.in_channels = first_conv_channels(body)
        mean = (IMAGENET_MEAN if c == 3 else GRAY_MEAN * c) if mean is None else mean
        std = (IMAGENET_STD if c == 3 else GRAY_STD * c) if std is None else std
        if len(mean) != c or len(std) != c:
            raise QNNError(f"mean and std need one value per input channel ({c}), got {len(mean)} and {len(std)}")
        self.mean, self.std, self.in_size, self.num_classes = tuple(mean), tuple(std), in_size, num_classes
        self.first_last_bits, self.residual_bits, self.reduce_range = first_last_bits, residual_bits, reduce_range
        self.integer_eval, self.target_cpu = True, None  # qnn.layers.EVAL_SETTINGS: what eval mode computes
        self.register_buffer("_mean", torch.tensor(mean).reshape(1, c, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).reshape(1, c, 1, 1), persistent=False)
        self.body = quantize(body, QuantizeConfig(first_last_bits=first_last_bits, residual_bits=residual_bits,
                                                  input_range=input_range(mean, std), reduce_range=reduce_range))
        # Brevitas re-creates its quantizer modules on load_state_dict (at float): switch them back
        self.register_load_state_dict_post_hook(_reswitch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self._mean) / self._std
        if self.integer_eval and not self.training and integer_ready(self.body):
            if uncalibrated(self):
                raise QNNError("activation quantizers at this bit-width were never calibrated; train or calibrate first")
            return program_of(self.body).run(x, cpu=self.target_cpu)
        return self.body(x)

    def features(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """The outputs of the first `upto + 1` ReLU quantizers (all when None), in execution order: feature maps for
        analyses, from the fake-quant form."""
        import brevitas.nn as bnn

        out: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda m, i, o: out.append(o.detach()))
                 for m in self.body.modules() if isinstance(m, (bnn.QuantReLU, ReLU6Quant))]
        try:
            with precision(self, integer=False):
                self(x)
        finally:
            for h in hooks:
                h.remove()
        return out if upto is None else out[:upto + 1]


def _reswitch(module: nn.Module, incompatible_keys) -> None:
    set_bit_width_(module, *get_bit_width(module))

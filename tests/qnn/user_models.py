"""Users' own model files for the tests: `--model tests/qnn/user_models.py:tiny_cnn` and friends."""

import torch.nn as nn


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def not_a_module():
    return 3


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) if x.sum() > 0 else x.mean((1, 2, 3))


def untraceable():
    return _Branchy()


def with_softplus():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def grayscale_28(num_classes: int = 10) -> nn.Module:
    """A 1-channel 28x28 model (MNIST-like input)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


def brevitas_stock_cnn(num_classes: int = 10) -> nn.Module:
    """A model on stock Brevitas layers and quantizers, written as Brevitas' own examples write them."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

    return nn.Sequential(
        qnn.QuantIdentity(bit_width=8, return_quant_tensor=False),
        qnn.QuantConv2d(3, 8, 3, padding=1, weight_bit_width=4, weight_quant=Int8WeightPerTensorFloat, bias=False),
        nn.BatchNorm2d(8), qnn.QuantReLU(bit_width=4, act_quant=Uint8ActPerTensorFloat),
        qnn.QuantConv2d(8, 16, 3, stride=2, padding=1, weight_bit_width=4, bias=False), nn.BatchNorm2d(16),
        qnn.QuantReLU(bit_width=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        qnn.QuantLinear(16, num_classes, bias=True, weight_bit_width=8))


def brevitas_toolkit_cnn(num_classes: int = 10) -> nn.Module:
    """Brevitas layers with the toolkit's switchable quantizers (the form `qnn.quantize` itself builds)."""
    import brevitas.nn as qnn

    from qnn.brevitas_quant import SwitchableUnsignedActQuant, SwitchableWeightQuant

    return nn.Sequential(
        qnn.QuantConv2d(3, 8, 3, padding=1, bias=False, weight_quant=SwitchableWeightQuant, return_quant_tensor=False),
        nn.BatchNorm2d(8), qnn.QuantReLU(act_quant=SwitchableUnsignedActQuant, return_quant_tensor=False),
        qnn.QuantConv2d(8, 16, 3, stride=2, padding=1, bias=False, weight_quant=SwitchableWeightQuant,
                        return_quant_tensor=False),
        nn.BatchNorm2d(16), qnn.QuantReLU(act_quant=SwitchableUnsignedActQuant, return_quant_tensor=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        qnn.QuantLinear(16, num_classes, bias=True, weight_quant=SwitchableWeightQuant, return_quant_tensor=False))


def brevitas_per_channel_cnn(num_classes: int = 10) -> nn.Module:
    """Stock Brevitas: per-channel weights, signed 8-bit activations after a ReLU, as Brevitas' tutorials mix them."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    return nn.Sequential(
        qnn.QuantConv2d(3, 8, 3, padding=1, weight_bit_width=8, weight_quant=Int8WeightPerChannelFloat),
        qnn.QuantReLU(bit_width=8, act_quant=Int8ActPerTensorFloat),
        qnn.QuantConv2d(8, 16, 3, padding=1, weight_bit_width=2, weight_quant=Int8WeightPerChannelFloat),
        nn.BatchNorm2d(16), qnn.QuantReLU(bit_width=2, act_quant=Uint8ActPerTensorFloat), nn.MaxPool2d(2),
        qnn.QuantConv2d(16, 16, 3, padding=1, weight_bit_width=2, weight_quant=Int8WeightPerChannelFloat),
        qnn.QuantReLU(bit_width=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        qnn.QuantLinear(16, num_classes, bias=True, weight_bit_width=8))

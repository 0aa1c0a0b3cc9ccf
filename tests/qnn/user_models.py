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

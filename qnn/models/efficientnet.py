"""EfficientNet-B0 (Tan & Le 2019) and EfficientNet-Lite0 as plain float definitions; the zoo quantizes them with
`qnn.quantize`.

B0: MBConv blocks with SiLU and squeeze-excitation (sigmoid gate). Lite0, the edge variant: ReLU6, no
squeeze-excitation (both are what quantize poorly and run slowly on mobile CPUs). Stochastic depth is left out (it is
training-only). `cifar=True`: 32x32 input, stride-1 stem and first stride-2 stage.
"""

from __future__ import annotations

import torch.nn as nn

from qnn.models.mobilenetv2 import init_weights_
from qnn.models.mobilenetv3 import SqueezeExcite
from qnn.models.zoo import zoo_model

# (expansion, kernel, first stride, output channels, repeats) per stage, B0's
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def _conv_bn(cin: int, cout: int, k: int, stride: int, act: type | None, groups: int = 1) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [act()] if act else layers


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, act: type, se: bool):
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1, 1, act) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, k, stride, act, groups=hidden)
        if se:
            layers.append(SqueezeExcite(hidden, max(1, cin // 4), act=act, gate=nn.Sigmoid))
        layers += _conv_bn(hidden, cout, 1, 1, None)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 10, lite: bool = False, width_mult: float = 1.0, cifar: bool = True):
        super().__init__()
        act = nn.ReLU6 if lite else nn.SiLU
        w = lambda c: max(8, int(c * width_mult + 4) // 8 * 8)  # noqa: E731
        cin = w(32)
        layers = _conv_bn(3, cin, 3, 1 if cifar else 2, act)
        for i, (e, k, s, c, n) in enumerate(STAGES):
            for j in range(n):
                stride = (1 if cifar and i == 1 else s) if j == 0 else 1
                layers.append(MBConv(cin, w(c), e, k, stride, act, se=not lite))
                cin = w(c)
        last = 1280 if lite else w(1280)  # Lite keeps the head fixed
        layers += _conv_bn(cin, last, 1, 1, act)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, num_classes))
        init_weights_(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


@zoo_model()
def efficientnet_lite0(num_classes: int = 1000, width_mult: float = 1.0) -> EfficientNet:
    """EfficientNet-Lite0 (ReLU6, no squeeze-excitation), 224x224 (any side)."""
    return EfficientNet(num_classes, True, width_mult, cifar=False)


@zoo_model(side=32)
def efficientnet_lite0_cifar(num_classes: int = 10, width_mult: float = 1.0) -> EfficientNet:
    """EfficientNet-Lite0, CIFAR variant (32x32)."""
    return EfficientNet(num_classes, True, width_mult, cifar=True)


@zoo_model()
def efficientnet_b0(num_classes: int = 1000, width_mult: float = 1.0) -> EfficientNet:
    """EfficientNet-B0 (SiLU, squeeze-excitation with a sigmoid gate), 224x224 (any side)."""
    return EfficientNet(num_classes, False, width_mult, cifar=False)


@zoo_model(side=32)
def efficientnet_b0_cifar(num_classes: int = 10, width_mult: float = 1.0) -> EfficientNet:
    """EfficientNet-B0, CIFAR variant (32x32)."""
    return EfficientNet(num_classes, False, width_mult, cifar=True)

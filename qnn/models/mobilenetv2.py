"""MobileNetV2 (Sandler et al. 2018) as a plain float definition; the zoo quantizes it with `qnn.quantize`.

`cifar=True` is the CIFAR variant: 32x32 input, stride-1 stem and first stride-2 stage at stride 1 (the common
adaptation that keeps 4x4 feature maps before pooling); `cifar=False` is the standard 224x224 network.
"""

from __future__ import annotations

import torch.nn as nn

from qnn.models.zoo import zoo_model

# (expansion t, channels c, repeats n, first stride s) per stage, as in the paper
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(v: float, d: int = 8) -> int:
    return max(d, int(v + d / 2) // d * d)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6()] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + _conv_bn(hidden, cout, 1, act=False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, cifar: bool = True):
        super().__init__()
        cin = _divisible(32 * width_mult)
        layers = _conv_bn(3, cin, 3, 1 if cifar else 2)
        for i, (t, c, n, s) in enumerate(STAGES):
            cout = _divisible(c * width_mult)
            for j in range(n):
                stride = (1 if cifar and i == 1 else s) if j == 0 else 1
                layers.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
        last = _divisible(1280 * max(1.0, width_mult))
        layers += _conv_bn(cin, last, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, num_classes))
        init_weights_(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def init_weights_(model: nn.Module) -> None:
    """The mobile networks' usual initialisation: Kaiming (fan out) convs, small normal linear weights, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@zoo_model(side=32)
def mobilenetv2_cifar(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2, CIFAR variant (32x32)."""
    return MobileNetV2(num_classes, width_mult, cifar=True)


@zoo_model()
def mobilenetv2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2, standard 224x224 network (any side)."""
    return MobileNetV2(num_classes, width_mult, cifar=False)

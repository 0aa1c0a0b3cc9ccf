"""MobileNetV3-Small (Howard et al. 2019) as a plain float definition; the zoo quantizes it with `qnn.quantize`.

Hardswish and squeeze-excitation (hard-sigmoid gate) as in the paper. `cifar=True`: 32x32 input, stride-1 stem and
first block (4x4 feature maps before pooling); `cifar=False`: the standard 224x224 network.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from qnn.models.mobilenetv2 import _divisible, init_weights_
from qnn.models.zoo import zoo_model

# (kernel, expansion channels, output channels, squeeze-excitation, activation, stride), the paper's Table 2
SMALL = ((3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2), (3, 88, 24, False, "relu", 1),
         (5, 96, 40, True, "hardswish", 2), (5, 240, 40, True, "hardswish", 1), (5, 240, 40, True, "hardswish", 1),
         (5, 120, 48, True, "hardswish", 1), (5, 144, 48, True, "hardswish", 1), (5, 288, 96, True, "hardswish", 2),
         (5, 576, 96, True, "hardswish", 1), (5, 576, 96, True, "hardswish", 1))
ACTS = {"relu": nn.ReLU, "hardswish": nn.Hardswish}


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str | None = "relu") -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, ACTS[act]()) if act else nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """x * gate(fc2(act(fc1(mean(x))))): a per-channel gate from the globally pooled features."""

    def __init__(self, channels: int, squeeze: int, act: type = nn.ReLU, gate: type = nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.act = nn.Conv2d(channels, squeeze, 1), act()
        self.fc2, self.gate = nn.Conv2d(squeeze, channels, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Block(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: str, stride: int):
        super().__init__()
        layers = [conv_bn_act(cin, exp, 1, act=act)] if exp != cin else []
        layers.append(conv_bn_act(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp, _divisible(exp // 4)))
        layers.append(conv_bn_act(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, cifar: bool = True):
        super().__init__()
        cin = _divisible(16 * width_mult)
        layers = [conv_bn_act(3, cin, 3, 1 if cifar else 2, act="hardswish")]
        for i, (k, exp, c, se, act, s) in enumerate(SMALL):
            cout = _divisible(c * width_mult)
            layers.append(Block(cin, k, _divisible(exp * width_mult), cout, se, act, 1 if cifar and i == 0 else s))
            cin = cout
        last = _divisible(576 * width_mult)
        layers.append(conv_bn_act(cin, last, 1, act="hardswish"))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head = _divisible(1024 * max(1.0, width_mult))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(last, head), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(head, num_classes))
        init_weights_(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


@zoo_model(side=32)
def mobilenetv3_small_cifar(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV3Small:
    """MobileNetV3-Small, CIFAR variant (32x32)."""
    return MobileNetV3Small(num_classes, width_mult, cifar=True)


@zoo_model()
def mobilenetv3_small(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV3Small:
    """MobileNetV3-Small, standard 224x224 network (any side)."""
    return MobileNetV3Small(num_classes, width_mult, cifar=False)

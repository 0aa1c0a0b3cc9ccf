"""A SqueezeNet-style CIFAR network (Iandola et al. 2016): fire modules, whose two expand branches are concatenated
along the channels, as a plain float definition; the zoo quantizes it with `qnn.quantize` (one grid for both
branches, so the concatenation moves integers)."""

from __future__ import annotations

import torch
import torch.nn as nn

from qnn.models.zoo import zoo_model


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1, bias=False), nn.BatchNorm2d(squeeze), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1, bias=False), nn.BatchNorm2d(expand),
                                     nn.ReLU())

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], 1)


class SqueezeNetCifar(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        w = lambda c: max(4, int(c * width_mult))  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, w(64), 3, padding=1, bias=False), nn.BatchNorm2d(w(64)), nn.ReLU(),
            Fire(w(64), w(16), w(64)), Fire(2 * w(64), w(16), w(64)), nn.MaxPool2d(2),
            Fire(2 * w(64), w(32), w(128)), Fire(2 * w(128), w(32), w(128)), nn.MaxPool2d(2),
            Fire(2 * w(128), w(48), w(192)), Fire(2 * w(192), w(64), w(256)), nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * w(256), num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


@zoo_model(side=32)
def squeezenet_cifar(num_classes: int = 10, width_mult: float = 1.0) -> SqueezeNetCifar:
    """A SqueezeNet-style CIFAR network (fire modules: concatenated expand branches), 32x32."""
    return SqueezeNetCifar(num_classes, width_mult)

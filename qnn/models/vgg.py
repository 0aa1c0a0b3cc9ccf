"""VGG-style network (Simonyan & Zisserman 2015) as a plain float definition; the zoo quantizes it with
`qnn.quantize`. CIFAR variant: 3x3 convs with BatchNorm, 2x2 max pooling, global average pooling, one classifier."""

from __future__ import annotations

import torch.nn as nn

from qnn.models.zoo import zoo_model

# channels per conv, "M" = 2x2 max pool (VGG-11's configuration)
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, num_classes: int = 10, cfg=VGG11, width_mult: float = 1.0):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(8, int(v * width_mult))
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


@zoo_model(side=32)
def vgg11_cifar(num_classes: int = 10, width_mult: float = 1.0) -> VGG:
    """VGG-11 with BatchNorm, CIFAR variant (32x32)."""
    return VGG(num_classes, VGG11, width_mult)

"""ResNets as plain float definitions; the zoo quantizes them with `qnn.quantize` (switchable, on Brevitas layers).

- CIFAR ResNet-20/32/44/56 (He et al. 2016) with the module names and option-A shortcuts of the akamaster
  checkpoints in ../shared/data/weights, so those float weights load as they are (`qnn.checkpoint.load_float_weights`).
- ImageNet-style ResNet-18 (7x7 stem, max pool, projection shortcuts), any input size.
- `small_cnn`: a tiny residual CNN for fast tests and the embedded default dataset.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.models.zoo import zoo_model


class ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut (identity, option A, or option B: 1x1 conv + BN), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA((cout - cin) // 2)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """stages: (channels, blocks, stride) per stage; stem 'cifar' (3x3 conv) or 'imagenet' (7x7/2 conv + max pool)."""

    def __init__(self, stages, stem: str = "cifar", shortcut: str = "A", num_classes: int = 10, stem_ch: int = 16):
        super().__init__()
        k, st = (3, 1) if stem == "cifar" else (7, 2)
        self.conv1 = nn.Conv2d(3, stem_ch, k, st, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        cin = stem_ch
        self.n_stages = len(stages)
        for i, (ch, n, stride) in enumerate(stages):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, ch, stride if j == 0 else 1, shortcut))
                cin = ch
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.linear(torch.flatten(self.pool(x), 1))


def _cifar(n: int, num_classes: int) -> ResNet:
    return ResNet([(16, n, 1), (32, n, 2), (64, n, 2)], "cifar", "A", num_classes)


@zoo_model(side=32)
def resnet20(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-20 (0.27 M parameters); loads the shared pretrained float weights."""
    return _cifar(3, num_classes)


@zoo_model(side=32)
def resnet32(num_classes: int = 10) -> ResNet:
    return _cifar(5, num_classes)


@zoo_model(side=32)
def resnet44(num_classes: int = 10) -> ResNet:
    return _cifar(7, num_classes)


@zoo_model(side=32)
def resnet56(num_classes: int = 10) -> ResNet:
    return _cifar(9, num_classes)


@zoo_model()
def resnet18(num_classes: int = 1000) -> ResNet:
    """ImageNet-style ResNet-18: 7x7/2 stem, max pool, projection shortcuts; any input size."""
    return ResNet([(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], "imagenet", "B", num_classes, stem_ch=64)


@zoo_model(side=32)
def small_cnn(num_classes: int = 10) -> ResNet:
    """Tiny residual CNN (stem 3x3/16, one block of 16, one of 32 with stride 2): seconds per epoch on a CPU."""
    return ResNet([(16, 1, 1), (32, 1, 2)], "cifar", "A", num_classes)

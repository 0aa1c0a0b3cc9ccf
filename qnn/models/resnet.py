"""Switchable-precision ResNets in the integer-friendly form (see qnn.layers).

- CIFAR ResNet-20/32/44/56 exactly as the akamaster checkpoints in ../shared/data/weights (option-A shortcuts).
- ImageNet-style ResNet-18 (projection shortcuts, 7x7 stem, max pool), any input size.
- A small CNN for fast tests and the embedded default dataset.
Every block passes (tensor, scale-of-that-tensor) so eval can run the folded integer arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qnn.errors import QNNError
from qnn.layers import FLOAT_BITS, ActQuant, IntegerEval, QConvBN, QLinear, uncalibrated, use_integer_path
from qnn.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _input_range(mean, std) -> tuple[float, float]:
    lo = min((0.0 - m) / s for m, s in zip(mean, std))
    hi = max((1.0 - m) / s for m, s in zip(mean, std))
    return lo, hi


def _scale(q: ActQuant) -> torch.Tensor | None:
    return None if q.a_bits == FLOAT_BITS else q.scale()


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN (+shortcut) -ReLU; shortcut 'A' (subsample + zero-pad) or 'B' (1x1 conv + BN).

    With `residual_bits` R the block keeps a wide residual stream: the add's inputs and its output `act_out` run at
    max(a_bits, R), and a second quantizer `act_out_conv` takes the same sum at a_bits for the next block's first conv.
    Every conv input stays at a_bits. In the integer graph the add is simply computed twice (two QLinearAdd nodes with
    different output scales), so the stream stays integer end to end.
    """

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "A", residual_bits: int | None = None):
        super().__init__()
        r = residual_bits
        self.conv1 = QConvBN(cin, cout, 3, stride)
        self.act1 = ActQuant("unsigned")
        self.conv2 = QConvBN(cout, cout, 3, 1)
        self.q2 = ActQuant("shifted", min_bits=r)
        self.shortcut_kind = "none" if (stride == 1 and cin == cout) else shortcut
        self.pad = (cout - cin) // 2
        self.stride = stride
        if self.shortcut_kind == "B":
            self.sc_conv = QConvBN(cin, cout, 1, stride, padding=0)
            self.sc_q = ActQuant("shifted", min_bits=r)
        self.act_out = ActQuant("unsigned", min_bits=r)
        self.split = r is not None
        if self.split:
            self.act_out_conv = ActQuant("unsigned")

    def shortcut(self, x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        if self.shortcut_kind == "none":
            return x
        if self.shortcut_kind == "A":
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.sc_q(self.sc_conv(x, s))

    def forward_int(self, x: torch.Tensor, s: torch.Tensor, xc: torch.Tensor, sc_: torch.Tensor):
        """The integer graph of this block (centred integer tensors, see IntegerEval).

        (x, s): the residual stream; (xc, sc_): the first conv's input (the same tensor unless residual_bits is set).
        Returns (residual, its scale, next conv input, its scale)."""
        h, sh = IntegerEval.conv(self.conv1, xc, sc_, self.act1)
        h, sh = IntegerEval.conv(self.conv2, h, sh, self.q2)
        if self.shortcut_kind == "none":
            sc, ssc = x, s
        elif self.shortcut_kind == "A":
            sc, ssc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)), s
        else:
            sc, ssc = IntegerEval.conv(self.sc_conv, x, s, self.sc_q)
        y, sy = IntegerEval.add(h, sh, sc, ssc, self.act_out)
        if not self.split:
            return y, sy, y, sy
        yc, syc = IntegerEval.add(h, sh, sc, ssc, self.act_out_conv)
        return y, sy, yc, syc

    def forward(self, x: torch.Tensor, s: torch.Tensor | None, xc: torch.Tensor | None = None, sc_: torch.Tensor | None = None):
        """(residual, scale[, conv input, scale]) -> (residual, scale, next conv input, scale)."""
        if xc is None:
            xc, sc_ = x, s
        h = self.act1(self.conv1(xc, sc_))
        h = self.q2(self.conv2(h, _scale(self.act1)))
        z = h + self.shortcut(x, s)
        y = self.act_out(z)
        if not self.split:
            return y, _scale(self.act_out), y, _scale(self.act_out)
        return y, _scale(self.act_out), self.act_out_conv(z), _scale(self.act_out_conv)


class QResNet(nn.Module):
    """Generic switchable ResNet.

    Args:
        stages: list of (channels, blocks, stride).
        stem: 'cifar' (3x3 conv) or 'imagenet' (7x7/2 conv + 3x3/2 max pool).
        first_last_bits: weight bits of the first conv and the classifier (8 by default; None = follow the body).
        residual_bits: None (default) quantizes the residual stream at the body's activation bits; R keeps the stem
            output, every residual add and the pooled features at max(a_bits, R) while every conv in the body still
            takes a_bits inputs (see BasicBlock). Our option: a 2-bit residual stream (4 levels) is what costs most
            accuracy at 2 bits.
    """

    def __init__(self, stages, stem: str = "cifar", shortcut: str = "A", num_classes: int = 10, stem_ch: int = 16,
                 first_last_bits: int | None = 8, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_size: int = 32,
                 residual_bits: int | None = None):
        super().__init__()
        if residual_bits is not None and residual_bits not in (2, 3, 4, 5, 6, 7, 8):
            raise QNNError(f"residual_bits must be in 2..8 or None, got {residual_bits}")
        self.residual_bits, self.first_last_bits = residual_bits, first_last_bits
        self.mean, self.std, self.in_size, self.num_classes = tuple(mean), tuple(std), in_size, num_classes
        # forward() takes pixels in [0, 1] (what patches live in); normalisation is the first op. The exported
        # integer graph starts after it (its input is the normalised image; the metadata carries mean/std).
        self.register_buffer("_mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.inq = ActQuant("input", input_range=_input_range(mean, std))
        k, st = (3, 1) if stem == "cifar" else (7, 2)
        self.stem_kind = stem
        self.conv1 = QConvBN(3, stem_ch, k, st, fixed_w_bits=first_last_bits)
        self.act1 = ActQuant("unsigned", min_bits=residual_bits)
        if residual_bits is not None:
            self.act1_conv = ActQuant("unsigned")  # the stem output at a_bits, for the first block's conv
        blocks, cin = [], stem_ch
        for ch, n, stride in stages:
            for i in range(n):
                blocks.append(BasicBlock(cin, ch, stride if i == 0 else 1, shortcut, residual_bits))
                cin = ch
        self.blocks = nn.ModuleList(blocks)
        self.pool_q = ActQuant("unsigned", min_bits=residual_bits)
        self.linear = QLinear(cin, num_classes, fixed_w_bits=first_last_bits)

    def _stem(self, x: torch.Tensor):
        """-> (residual stream, scale, first conv input, scale)."""
        x = self.inq((x - self._mean) / self._std)
        z = self.conv1(x, _scale(self.inq))
        y = self.act1(z)
        yc, sc = (self.act1_conv(z), _scale(self.act1_conv)) if self.residual_bits is not None else (y, _scale(self.act1))
        if self.stem_kind == "imagenet":
            y = F.max_pool2d(y, 3, 2, 1)
            yc = F.max_pool2d(yc, 3, 2, 1) if self.residual_bits is not None else y
        return y, _scale(self.act1), yc, sc

    def features(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Activations (the residual stream) after the stem and each block (for feature-map analyses)."""
        x, s, xc, sc = self._stem(x)
        out = [x]
        for b in self.blocks[:upto]:
            x, s, xc, sc = b(x, s, xc, sc)
            out.append(x)
        return out

    def forward_int(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the exported integer graph's arithmetic (eval, quantized, no autograd; see IntegerEval)."""
        xi, si = IntegerEval.quantize_input((x - self._mean) / self._std, self.inq)
        xr, s = IntegerEval.conv(self.conv1, xi, si, self.act1)
        xc, sc = IntegerEval.conv(self.conv1, xi, si, self.act1_conv) if self.residual_bits is not None else (xr, s)
        if self.stem_kind == "imagenet":  # on unsigned ints (zp 0): padding never wins the max
            xr = F.max_pool2d(xr, 3, 2, 1)
            xc = F.max_pool2d(xc, 3, 2, 1) if self.residual_bits is not None else xr
        for b in self.blocks:
            xr, s, xc, sc = b.forward_int(xr, s, xc, sc)
        xc, s = IntegerEval.global_avg_pool(xr, s, self.pool_q)
        return IntegerEval.linear(self.linear, xc, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images in [0, 1], NCHW."""
        if self.act1.a_bits != FLOAT_BITS and self.conv1.wbits != FLOAT_BITS and use_integer_path(self):
            if uncalibrated(self):
                raise QNNError(f"activation quantizers at {self.act1.a_bits} bits were never calibrated; train or calibrate first")
            return self.forward_int(x)
        x, s, xc, sc = self._stem(x)
        for b in self.blocks:
            x, s, xc, sc = b(x, s, xc, sc)
        x = self.pool_q(x.mean((2, 3)))
        return self.linear(x, _scale(self.pool_q))


def _cifar(n: int, **kw) -> QResNet:
    return QResNet([(16, n, 1), (32, n, 2), (64, n, 2)], stem="cifar", shortcut="A", **kw)


@register_model
def resnet20(**kw) -> QResNet:
    return _cifar(3, **kw)


@register_model
def resnet32(**kw) -> QResNet:
    return _cifar(5, **kw)


@register_model
def resnet44(**kw) -> QResNet:
    return _cifar(7, **kw)


@register_model
def resnet56(**kw) -> QResNet:
    return _cifar(9, **kw)


@register_model
def resnet18(num_classes: int = 1000, in_size: int = 224, **kw) -> QResNet:
    return QResNet([(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], stem="imagenet", shortcut="B",
                   stem_ch=64, num_classes=num_classes, in_size=in_size, **kw)


@register_model
def small_cnn(**kw) -> QResNet:
    """Tiny residual CNN (stem 3x3/16, one block of 16, one of 32 with stride 2): seconds per epoch on a CPU."""
    return QResNet([(16, 1, 1), (32, 1, 2)], stem="cifar", shortcut="A", **kw)


def load_pretrained_cifar(model: QResNet, path: str) -> QResNet:
    """Load an akamaster float CIFAR ResNet checkpoint (weights_only) into every bit-width's BatchNorm copy."""
    from qnn.checkpoint import load_torch_file
    from qnn.errors import QNNError

    obj = load_torch_file(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise QNNError(f"{path}: not a state dict checkpoint")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    n_blocks = len(getattr(model, "blocks", ()))
    if n_blocks < 3 or n_blocks % 3:
        raise QNNError(f"{path}: pretrained CIFAR ResNet weights fit only a CIFAR ResNet (resnet20/32/44/56), "
                       f"not a model with {n_blocks} residual blocks")
    per_stage = n_blocks // 3
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}

    def put_convbn(dst: str, conv: str, bn: str) -> None:
        mapped[f"{dst}.weight"] = sd[f"{conv}.weight"]
        for i in range(len(getattr_path(model, dst).bns)):
            for f in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if f"{bn}.{f}" in sd:
                    mapped[f"{dst}.bns.{i}.{f}"] = sd[f"{bn}.{f}"]

    try:
        put_convbn("conv1", "conv1", "bn1")
        for j in range(n_blocks):
            src = f"layer{j // per_stage + 1}.{j % per_stage}"
            put_convbn(f"blocks.{j}.conv1", f"{src}.conv1", f"{src}.bn1")
            put_convbn(f"blocks.{j}.conv2", f"{src}.conv2", f"{src}.bn2")
        mapped["linear.weight"] = sd["linear.weight"]
        mapped["linear.bias"] = sd["linear.bias"]
    except KeyError as e:
        raise QNNError(f"{path}: checkpoint does not match {getattr(model, 'arch', 'this model')} (missing {e})") from None
    for k, v in mapped.items():
        if k not in own or own[k].shape != v.shape:
            raise QNNError(f"{path}: checkpoint does not match {getattr(model, 'arch', 'this model')} ({k})")
    extra = [k for k in sd if k.startswith("layer") and k.split(".")[0] in ("layer1", "layer2", "layer3")
             and int(k.split(".")[1]) >= per_stage]
    if extra:
        raise QNNError(f"{path}: checkpoint has more blocks than {getattr(model, 'arch', 'this model')}")
    model.load_state_dict(mapped, strict=False)
    return model


def getattr_path(m: nn.Module, path: str) -> nn.Module:
    for p in path.split("."):
        m = getattr(m, p) if not p.isdigit() else m[int(p)]  # type: ignore[index]
    return m

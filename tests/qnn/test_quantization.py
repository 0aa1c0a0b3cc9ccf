"""qnn.quantize: any FX-traceable float CNN in, a switchable Brevitas model out."""

import brevitas.nn as bnn
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qnn
from qnn.brevitas_quant import quantizers
from qnn.errors import QNNError
from qnn.layers import set_bit_width_


class Block(nn.Module):
    """Inverted-residual style: depthwise 3x3 with ReLU6, pointwise, residual add, functional ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c, c, 1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.pw(self.act(self.bn1(self.dw(x))))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.pool(self.block(self.stem(x))))


def _float_net():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_quantize_converts_every_layer_and_float_mode_is_the_float_model():
    f = _float_net()
    q = qnn.quantize(f, qnn.QuantizeConfig(bits="2,4,8,32"))
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in q.modules())
    convs = [m for m in q.modules() if isinstance(m, bnn.QuantConv2d)]
    assert len(convs) == 3 and convs[1].groups == 8 and convs[1].dilation == (2, 2) and convs[0].stride == (2, 2)
    assert type(f.stem[0]) is nn.Conv2d  # the float model is left as it was
    x = torch.randn(4, 3, 16, 16)
    set_bit_width_(q, 32)
    q.eval()
    assert torch.equal(q(x), f(x))
    # training at each width, then each width gives its own outputs
    q.train()
    for b in (2, 4, 8):
        set_bit_width_(q, b)
        q(x).sum().backward()
    q.eval()
    outs = {}
    for b in (2, 4, 8):
        set_bit_width_(q, b)
        outs[b] = q(x)
    assert not torch.equal(outs[2], outs[4]) and not torch.equal(outs[4], outs[8])
    # first conv and last linear pinned at 8 bits; the residual add's float operand gets a shifted requantizer, the
    # other (the stem's ReLU output) is already on a grid; the pool's result is requantized before the classifier
    set_bit_width_(q, 2)
    assert quantizers(convs[0])[0].bits == 8 and quantizers(q.get_submodule("head.2"))[0].bits == 8
    assert quantizers(convs[1])[0].bits == 2
    assert "add = stem_2 + requant_" in q.code and "= self.pool(relu)" in q.code
    kinds = {n: quantizers(m)[0].kind for n, m in q.named_children() if n.startswith("requant")}
    assert sorted(kinds.values()) == ["shifted", "unsigned"], kinds


def test_residual_bits_widen_the_residual_stream_and_twin_the_conv_input():
    q = qnn.quantize(_float_net(), qnn.QuantizeConfig(residual_bits=8))
    set_bit_width_(q, 2)
    stem_relu = quantizers(q.get_submodule("stem.2"))[0]
    narrow = [m for n, m in q.named_children() if n.startswith("narrow")]
    # the stem's ReLU reaches the add (wide) and the depthwise conv (a twin at the switch's width feeds it)
    assert stem_relu.bits == 8 and len(narrow) == 1 and quantizers(narrow[0])[0].bits == 2
    assert "block_dw = self.block.dw(narrow_" in q.code
    assert quantizers(q.get_submodule("block.act"))[0].bits == 2
    # after a state-dict round trip (Brevitas re-creates quantizers from their injectors) the widths hold
    q2 = qnn.quantize(_float_net(), qnn.QuantizeConfig(residual_bits=8))
    q2.load_state_dict(q.state_dict())
    set_bit_width_(q2, 2)
    assert quantizers(q2.get_submodule("stem.2"))[0].bits == 8


def test_quantize_refuses_what_it_cannot_handle_with_one_line():
    class Softplus(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.a = nn.Conv2d(3, 4, 3), nn.Softplus()

        def forward(self, x):
            return self.a(self.c(x))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else x

    class Abs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.abs(self.c(x))

    for model, msg in ((Softplus(), "module 'a' of type Softplus"), (Branchy(), "cannot be traced"), (Abs(), "'abs'")):
        with pytest.raises(QNNError, match=msg) as e:
            qnn.quantize(model)
        assert "\n" not in str(e.value)
    for bad in (dict(bits="4,9"), dict(first_last_bits=32), dict(input_range=(1.0, -1.0)),
                dict(input_range=(float("nan"), 1.0))):
        with pytest.raises(QNNError):
            qnn.QuantizeConfig(**bad)


def test_pinned_bit_widths_are_refused_alike_before_training():
    """--first-last-bits / --residual-bits: 2..8 or unset, with one message from the training config and from the
    quantize config (32 has no integer graph: it used to pass training's check and fail at quantize)."""
    from qnn.config import TrainConfig

    for name, v in (("first_last_bits", 32), ("residual_bits", 1), ("residual_bits", 32)):
        msgs = []
        for make in (lambda: TrainConfig(model="small_cnn", **{name: v}), lambda: qnn.QuantizeConfig(**{name: v})):
            with pytest.raises(QNNError) as e:
                make()
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1] == f"{name} must be one of 2..8 or unset, got {v!r}"


def test_a_quantized_model_is_accepted_as_it_is():
    q = qnn.quantize(_float_net())
    assert qnn.quantize(q) is q

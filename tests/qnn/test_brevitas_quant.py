"""Switchable quantizers inside Brevitas layers: the switch is an index, each bit-width has its own learned scale,
the state dict carries every width, and the grid is the toolkit's integer recipe."""

import brevitas.nn as bnn
import pytest
import torch
import torch.nn.functional as F

from qnn.brevitas_quant import (FixedInputQuant, SwitchableIntQuant, SwitchableShiftedActQuant, SwitchableUnsignedActQuant,
                                SwitchableWeightQuant, quantizers, with_fixed_bits)
from qnn.errors import QNNError
from qnn.layers import BIT_CHOICES, set_bit_width_


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        bnn.QuantIdentity(act_quant=FixedInputQuant.let(input_range=(-2.5, 2.5))),
        bnn.QuantConv2d(3, 8, 3, padding=1, bias=False, weight_quant=with_fixed_bits(SwitchableWeightQuant, 8)),
        bnn.QuantReLU(act_quant=SwitchableUnsignedActQuant),
        bnn.QuantConv2d(8, 8, 3, padding=1, groups=8, bias=False, weight_quant=SwitchableWeightQuant),
        bnn.QuantIdentity(act_quant=SwitchableShiftedActQuant),
    )


def _calibrated(x):
    m = _net().train()
    for b in (2, 4, 8):
        set_bit_width_(m, b)
        m(x)
    return m.eval()


def test_switch_is_an_index_and_every_width_has_its_own_scale():
    x = torch.randn(4, 3, 8, 8)
    m = _calibrated(x)
    ids = [id(q) for q in quantizers(m)]
    outs = {}
    for b in (2, 4, 8, 32, 4):
        set_bit_width_(m, b)
        outs.setdefault(b, []).append(m(x))
    assert [id(q) for q in quantizers(m)] == ids  # nothing re-instantiated
    assert torch.equal(outs[4][0], outs[4][1])  # switching back is bit-exact
    assert not torch.equal(outs[2][0], outs[4][0]) and not torch.equal(outs[4][0], outs[8][0])
    # float mode is the float network: same weights through plain torch ops
    ref = F.conv2d(F.relu(F.conv2d(x, m[1].weight, padding=1)), m[3].weight, padding=1, groups=8)
    assert torch.equal(outs[32][0], ref)
    # each trained width has its own scale; the fixed 8-bit first layer uses its 8-bit scale at every width
    w = quantizers(m[3])[0]
    assert bool(w.initialized[[BIT_CHOICES.index(b) for b in (2, 4, 8)]].all())
    assert not torch.equal(w.log_scale[BIT_CHOICES.index(2)], w.log_scale[BIT_CHOICES.index(4)])
    set_bit_width_(m, 2)
    assert quantizers(m[1])[0].bits == 8 and quantizers(m[3])[0].bits == 2


def test_values_lie_on_the_integer_grid_of_each_kind():
    x = torch.randn(4, 3, 8, 8)
    m = _calibrated(x)
    for b in (2, 4, 8):
        set_bit_width_(m, b)
        qw = m[3].quant_weight()
        q = qw.value / qw.scale
        assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 2 ** (b - 1) - 1 and qw.scale.shape == (8, 1, 1, 1)
        h = m[2](m[1](m[0](x)))
        s = quantizers(m[2])[0].scale()
        assert h.min() >= 0 and (h / s).max() <= 2**b - 1 + 1e-4
        y = m(x)
        s = quantizers(m[4])[0].scale()
        assert (y / s).min() >= -(2 ** (b - 1)) - 1e-4 and (y / s).max() <= 2 ** (b - 1) - 1 + 1e-4
        assert torch.allclose(y / s, (y / s).round(), atol=1e-3)


def test_lsq_gradient_reaches_only_the_active_width():
    x = torch.randn(4, 3, 8, 8)
    m = _calibrated(x).train()
    set_bit_width_(m, 4)
    m(x).square().sum().backward()
    assert sum(q.log_scale.grad is not None for q in quantizers(m)) == 4  # two weight, two activation quantizers
    for q in quantizers(m):
        if q.log_scale.grad is None:
            continue
        active = BIT_CHOICES.index(q.bits)
        others = [i for i in range(len(BIT_CHOICES)) if i != active]
        assert q.log_scale.grad[others].abs().sum() == 0
        if q.kind != "input":
            assert q.log_scale.grad[active].abs().sum() > 0


def test_state_dict_round_trip_is_bit_exact_at_every_width():
    x = torch.randn(4, 3, 8, 8)
    m = _calibrated(x)
    sd = m.state_dict()
    assert any(k.endswith("log_scale") for k in sd) and any(k.endswith("initialized") for k in sd)
    m2 = _net()
    m2.load_state_dict(sd)
    m2.eval()
    for b in (2, 4, 8, 32):
        set_bit_width_(m, b)
        set_bit_width_(m2, b)  # Brevitas may rebuild quantizers on load: the switch is applied after loading
        assert torch.equal(m(x), m2(x)), b


def test_an_uncalibrated_activation_width_is_refused_in_eval():
    m = _net().eval()
    set_bit_width_(m, 4)
    with pytest.raises(QNNError, match="never calibrated"):
        m(torch.randn(1, 3, 8, 8))


def test_reduce_range_puts_8_bit_weights_on_the_7_bit_grid_only():
    """reduce_range narrows 8-bit weights to [-63, 63] (reported to Brevitas as 7 bits, so its exports carry the
    same grid) and leaves the other widths and the activations alone."""
    torch.manual_seed(0)
    w = torch.randn(8, 3, 3, 3)
    conv = {r: bnn.QuantConv2d(3, 8, 3, bias=False, weight_quant=SwitchableWeightQuant.let(reduce_range=r))
            for r in (False, True)}
    for r, c in conv.items():
        with torch.no_grad():
            c.weight.copy_(w)
    for b in (2, 4, 8):
        set_bit_width_(conv[True], b)
        set_bit_width_(conv[False], b)
        qw = {r: c.quant_weight() for r, c in conv.items()}
        top = {r: int((q.value / q.scale).round().abs().max()) for r, q in qw.items()}
        if b == 8:
            assert top == {True: 63, False: 127} and int(qw[True].bit_width) == 7
        else:
            assert top[True] == top[False] == 2 ** (b - 1) - 1 and torch.equal(qw[True].value, qw[False].value)
    with pytest.raises(QNNError, match="weight quantizers only"):
        SwitchableIntQuant("unsigned", reduce_range=True)


def test_checkpoints_keep_the_weight_range(tmp_path):
    """A model's reduce_range travels in its checkpoint; a checkpoint saved before the option (no such key) was
    trained on the full 8-bit grid and loads as such."""
    from qnn.checkpoint import load_checkpoint, save_checkpoint
    from qnn.models import create_model

    for r in (True, False):
        save_checkpoint(tmp_path / f"{r}.pt", create_model("small_cnn", reduce_range=r))
        assert load_checkpoint(tmp_path / f"{r}.pt")[0].reduce_range is r
    assert create_model("small_cnn").arch_kwargs["reduce_range"] is True
    obj = torch.load(tmp_path / "False.pt", weights_only=True)
    del obj["arch_kwargs"]["reduce_range"]
    torch.save(obj, tmp_path / "old.pt")
    m, _ = load_checkpoint(tmp_path / "old.pt")
    assert m.reduce_range is False and all(not q.reduce_range for q in quantizers(m) if q.kind == "weight")


def test_compiled_training_reads_no_quantizer_flag_after_init_or_load():
    """torch.compile traces one graph: a quantizer whose init flag the host does not know reads the tensor there,
    a graph break at every quantizer (and a recompile storm once the flag flips)."""
    import torch._dynamo as dynamo

    from qnn.layers import remember_init_
    from qnn.models.quantized import QuantizedNet
    from qnn.train import init_scales_
    from tests.qnn.user_models import tiny_cnn

    x = torch.rand(4, 3, 16, 16)
    m = QuantizedNet(tiny_cnn(), 10, 16)
    init_scales_(m, [4], x)  # what `qnn train` runs before it compiles
    set_bit_width_(m, 4)
    m.train()

    def breaks() -> int:
        dynamo.reset()
        return dynamo.explain(m)(x).graph_break_count

    assert breaks() == 0
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})  # a resume: the host forgets
    set_bit_width_(m, 4)
    assert breaks() > 0
    remember_init_(m)
    assert breaks() == 0

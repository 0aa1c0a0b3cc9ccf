import pytest
import torch

from qnn.checkpoint import load_checkpoint, save_checkpoint
from qnn.errors import QNNError
import brevitas.nn as bnn

from qnn.brevitas_quant import quantizers
from qnn.layers import BIT_CHOICES, ensure_calibrated_, set_bit_width_, switchable_modules
from qnn.models import create_model, list_models


def _calibrated_model(name="small_cnn", bits=(2, 3, 4, 5, 6, 7, 8)):
    torch.manual_seed(0)
    m = create_model(name)
    x = torch.rand(16, 3, 32, 32)
    for b in bits:
        set_bit_width_(m, b)
        ensure_calibrated_(m, x)
    m.eval()
    return m, x


def test_registry_lists_zoo():
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet18", "small_cnn"} <= set(list_models())
    with pytest.raises(QNNError):
        create_model("nope")


def test_switching_changes_outputs_and_restores_bit_exactly():
    m, x = _calibrated_model()
    outs = {}
    with torch.no_grad():
        for b in (32, 8, 4, 2):
            set_bit_width_(m, b)
            outs[b] = m(x).clone()
        for b in (8, 4, 2):
            assert not torch.equal(outs[b], outs[32]), f"{b}-bit output identical to float"
        assert not torch.equal(outs[2], outs[4])
        for b in (2, 32, 4, 8):
            set_bit_width_(m, b)
            assert torch.equal(m(x), outs[b]), f"switching back to {b} bits did not restore outputs"



def _state(m):
    return [(q.w_bits, q.a_bits) for q in switchable_modules(m)], m.current_bits, m.integer_eval, m.target_cpu


def test_precision_switches_inside_the_block_and_restores_every_layer_on_exit():
    """`qnn.precision` is the one way to run a model at a bit-width for a while: the block computes what a plain
    switch computes, and on exit (by an exception too, and from nested blocks) every layer is back as it was, so a
    helper that switches inside cannot leak a switch to its caller."""
    import qnn
    from qnn.kernels.reference import host_cpu_family

    m, x = _calibrated_model()
    with torch.no_grad():
        set_bit_width_(m, 8)
        before, want8 = _state(m), m(x)
        set_bit_width_(m, 4)
        want4 = m(x)
        set_bit_width_(m, 8)
        with qnn.precision(m, 4) as same:
            assert same is m and torch.equal(m(x), want4)
            with qnn.precision(m, 2):
                assert m.current_bits == (2, 2)
            assert torch.equal(m(x), want4)
            set_bit_width_(m, 3)  # a switch made inside the block is undone with it
        assert _state(m) == before and torch.equal(m(x), want8)
        with pytest.raises(RuntimeError, match="inside"):
            with qnn.precision(m, 2):
                raise RuntimeError("inside")
        assert _state(m) == before
        with qnn.precision(m):  # no bit-width: the current one, still restored
            set_bit_width_(m, 2)
        assert _state(m) == before
        # the evaluation form and the CPU family are the model's, set and restored the same way
        with qnn.precision(m, integer=False):
            fake = m(x)
            assert not m.integer_eval
        assert m.integer_eval and not torch.equal(fake, want8)
        with qnn.precision(m, cpu=host_cpu_family()):
            assert torch.equal(m(x), want8)
        assert _state(m) == before
        # impossible settings are refused before anything changes
        for kw, err in (({"bits": 9}, QNNError), ({"bits": 4, "a_bits": 1}, QNNError), ({"cpu": "mips"}, ValueError)):
            with pytest.raises(err):
                with qnn.precision(m, **kw):
                    pass
            assert _state(m) == before


def test_no_module_level_state_decides_what_a_model_computes():
    """What a model computes is the model's: no `global` statement in the library, the exporter or the kernels."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found = [f"{p.relative_to(root)}:{n.lineno}" for folder in ("qnn", "export", "kernels")
             for p in (root / folder).rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Global)]
    assert not found, found

def test_weights_are_shared_and_not_reallocated():
    m, x = _calibrated_model()
    convs = [mod for mod in m.modules() if isinstance(mod, bnn.QuantConv2d)]
    ptrs = [c.weight.data_ptr() for c in convs]
    n_params = sum(p.numel() for p in m.parameters())
    for b in (2, 8, 32, 4):
        set_bit_width_(m, b)
        with torch.no_grad():
            m(x)
    assert [c.weight.data_ptr() for c in convs] == ptrs
    assert sum(p.numel() for p in m.parameters()) == n_params


def test_checkpoint_roundtrip_every_bitwidth(tmp_path):
    m, x = _calibrated_model()
    p = tmp_path / "m.pt"
    save_checkpoint(p, m, {"trained_bits": [2, 3, 4, 5, 6, 7, 8, 32]})
    m2, _ = load_checkpoint(p)
    m2.eval()
    with torch.no_grad():
        for b in BIT_CHOICES:
            set_bit_width_(m, b)
            set_bit_width_(m2, b)
            assert torch.equal(m(x), m2(x)), f"checkpoint round-trip differs at {b} bits"


@pytest.mark.parametrize("bad", [1, 9, 16, 0, -4])
def test_bitwidth_outside_allowed_set(bad):
    m = create_model("small_cnn")
    with pytest.raises(QNNError, match="not allowed"):
        set_bit_width_(m, bad)


def test_first_and_last_layers_stay_8bit():
    m, _ = _calibrated_model()
    set_bit_width_(m, 2)
    wbits = lambda model, name: quantizers(model.body.get_submodule(name).weight_quant)[0].bits  # noqa: E731
    assert wbits(m, "conv1") == 8 and wbits(m, "linear") == 8
    assert wbits(m, "layer1.0.conv1") == 2
    m2 = create_model("small_cnn", first_last_bits=None)
    set_bit_width_(m2, 2)
    assert wbits(m2, "conv1") == 2


def test_per_bitwidth_batchnorm_is_separate():
    m, x = _calibrated_model()
    m.train()
    set_bit_width_(m, 4)
    bns = m.body.get_submodule("layer1.0.bn1").bns
    before8 = bns[BIT_CHOICES.index(8)].running_mean.clone()
    before4 = bns[BIT_CHOICES.index(4)].running_mean.clone()
    m(x * 3)
    assert torch.equal(bns[BIT_CHOICES.index(8)].running_mean, before8)
    assert not torch.equal(bns[BIT_CHOICES.index(4)].running_mean, before4)


def test_remembered_scale_init_is_forgotten_when_a_state_dict_loads():
    """Quantizers remember on the host which scales are initialised (no device read per forward); loading a state dict
    whose scales are not initialised must bring back the 'never calibrated' error, not run on a stale scale."""
    from qnn.brevitas_quant import SwitchableIntQuant

    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    q = SwitchableIntQuant("unsigned")
    q.switch_(4, 4)
    q.train()
    q(x)  # initialises the 4-bit scale
    q.eval()
    q(x)
    q.load_state_dict(SwitchableIntQuant("unsigned").state_dict())
    with pytest.raises(QNNError, match="never calibrated"):
        q(x)
    w = SwitchableIntQuant("weight", (8,))
    w.switch_(4, 4)
    conv_w = torch.randn(8, 3, 3, 3)
    w(conv_w)  # initialised from the weights
    w.log_scale.data.zero_()
    w.load_state_dict({**w.state_dict(), "initialized": torch.zeros_like(w.initialized)})
    w(conv_w)
    assert not torch.equal(w.scale(4), torch.ones(8))  # re-initialised, not the stale exp(0)

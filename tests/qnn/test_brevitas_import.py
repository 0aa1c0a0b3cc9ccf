"""Models on Brevitas layers, written the way Brevitas' documentation writes them (stock quantizers, per tensor and
per channel) and with the toolkit's own switchable quantizers: `qnn.quantize` starts them from their learned scales,
refuses what the integer recipe cannot take (all at once, naming the quantizer), and every command takes them:
train -> eval -> attack -> export int / qcdq / qonnx -> verify -> bundle -> run_edge, bit-exact."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

from qnn.errors import QNNError
from qnn.quantization import QuantizeConfig, quantize
from tests.conftest import ROOT, cli_error, run_cli
from tests.qnn import user_models

USER = ROOT / "tests" / "qnn" / "user_models.py"
FORMS = ("brevitas_stock_cnn", "brevitas_per_channel_cnn", "brevitas_toolkit_cnn")


def _trained_stock(factory):
    """A stock model after a few training-mode passes (Brevitas collects its activation statistics then)."""
    torch.manual_seed(0)
    m = factory()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, 3, 32, 32))
    return m.eval()


def _quantize(m, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gm = quantize(m, QuantizeConfig(**kw))
    return gm, [str(w.message) for w in seen]


def test_stock_scales_carry_over_so_the_quantized_weights_are_brevitas_own():
    """At the model's own bit-width the converted layers quantize their weights exactly as Brevitas did (per tensor
    and per channel), and the QuantReLU scales are the learned ones."""
    from qnn.brevitas_quant import SwitchableIntQuant
    from qnn.layers import set_bit_width_

    for factory, body, relus, bits in ((user_models.brevitas_stock_cnn, ["4"], ["3", "6"], 4),
                                       (user_models.brevitas_per_channel_cnn, ["2", "6"], ["4", "7"], 2)):
        stock = _trained_stock(factory)
        gm, notes = _quantize(stock)
        set_bit_width_(gm, bits)
        gm.eval()
        mods = dict(gm.named_modules())
        for name in body:  # the same integer weights; scales equal to float32 rounding (stored as log-scales)
            want, got = stock.get_submodule(name).quant_weight(), mods[name].quant_weight()
            assert torch.equal(got.int(), want.int()) and got.int().abs().max() > 0, name
            assert torch.allclose(got.value, want.value, rtol=1e-6, atol=0), name
        for name in relus:
            q = next(q for q in mods[name].modules() if isinstance(q, SwitchableIntQuant))
            assert torch.allclose(q.scale(bits), stock.get_submodule(name).act_quant.scale().detach(), rtol=1e-6)
        assert any("calibrated afresh" in n or "7-bit grid" in n for n in notes)  # what changed is said


def test_toolkit_quantizers_keep_every_trained_bit_width():
    from qnn.brevitas_quant import quantizers
    from qnn.layers import set_bit_width_

    m = user_models.brevitas_toolkit_cnn()
    for b in (2, 4, 8):
        set_bit_width_(m, b)
        m.train()
        with torch.no_grad():
            m(torch.rand(8, 3, 32, 32))
    src = {i: q.log_scale.detach().clone() for i, q in enumerate(quantizers(m)) if q.kind == "weight"}
    gm, _ = _quantize(m, first_last_bits=None)
    dst = [q for q in quantizers(gm) if q.kind == "weight"]
    assert len(dst) == len(src)
    for q, s in zip(dst, src.values()):
        assert torch.equal(q.initialized[[0, 2, 6]], torch.ones(3, dtype=torch.bool))  # 2, 4, 8 bits
        assert torch.allclose(q.log_scale[[0, 2, 6]], s[[0, 2, 6]])


def test_what_the_recipe_cannot_take_is_refused_all_at_once():
    import brevitas.nn as bnn
    from brevitas.quant import Int8WeightPerTensorFloat

    wide = Int8WeightPerTensorFloat.let(narrow_range=False)
    m = nn.Sequential(bnn.QuantConv2d(3, 4, 3, weight_quant=wide, weight_bit_width=4), bnn.QuantHardTanh(max_val=1.0, min_val=-1.0),
                      bnn.QuantConv2d(4, 4, 3, weight_bit_width=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 10))
    with pytest.raises(QNNError) as e:
        quantize(m)
    msg = str(e.value)
    assert "2 Brevitas layer(s)" in msg and "'0'" in msg and "narrow" in msg and "'1' (QuantHardTanh)" in msg
    mixed = nn.Sequential(bnn.QuantConv2d(3, 4, 3, weight_bit_width=8), bnn.QuantConv2d(4, 4, 3, weight_bit_width=4),
                          bnn.QuantConv2d(4, 4, 3, weight_bit_width=2), nn.Flatten(), bnn.QuantLinear(4 * 26 * 26, 10))
    with pytest.raises(QNNError, match=r"at \[2, 4\] bits"):
        quantize(mixed)


@pytest.mark.parametrize("form", FORMS)
def test_every_command_takes_a_brevitas_model_bit_exact(form, tmp_path, capsys):
    """train (fine-tunes from the learned scales) -> eval -> attack -> export int/qcdq/qonnx -> verify -> bundle ->
    run_edge: the integer logits equal PyTorch's (run_edge checks them bit for bit)."""
    from qnn.export.run_edge import main as run_edge

    spec = f"{USER}:{form}"
    r = tmp_path / "r"
    assert run_cli(["train", "--model", spec, "--bits", "2,4,8", "--epochs", 1, "--train-subset", 192,
                    "--test-subset", 64, "--batch-size", 64, "--no-progress", "--out", r]) == 0
    ck = ["--checkpoint", r / "model.pt", "--model", spec]
    assert run_cli(["eval", *ck, "--bits", "2,4,8", "--subset", 32, "--json", tmp_path / "e.json"]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())["accuracy_pct"]) == {"2", "4", "8"}
    assert run_cli(["attack", *ck, "--bits", 4, "--iterations", 2, "--n-attack", 16, "--n-eval", 16,
                    "--out", tmp_path / "a"]) == 0
    for fmt in ("int", "qcdq", "qonnx"):
        assert run_cli(["export", *ck, "--bits", 4, "--format", fmt, "--out", tmp_path / f"{fmt}.onnx"]) == 0
    assert run_cli(["verify", tmp_path / "int.onnx"]) == 0
    b = tmp_path / "b"
    assert run_cli(["bundle", *ck, "--bits", 2, "--n", 32, "--out", b]) == 0
    capsys.readouterr()
    assert run_edge(["--bundle", str(b), "--skip-latency", "--threads", "1", "--json", str(tmp_path / "edge.json")]) == 0
    edge = json.loads((tmp_path / "edge.json").read_text())
    assert edge["pass"] and edge["logits_identical"]["clean"] == 32


def test_a_refused_brevitas_model_is_one_line_before_training(tmp_path, capsys):
    src = tmp_path / "m.py"
    src.write_text("import brevitas.nn as bnn\nimport torch.nn as nn\n"
                   "def f():\n    return nn.Sequential(bnn.QuantConv2d(3, 4, 3, weight_bit_width=4), bnn.QuantHardTanh(max_val=1.0, min_val=-1.0),"
                   " nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))\n")
    msg = cli_error(["train", "--model", f"{src}:f", "--bits", 4, "--epochs", 1, "--no-progress",
                     "--out", tmp_path / "r"], capsys)
    assert "QuantHardTanh" in msg and not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()

"""MobileNetV2 and VGG on Brevitas layers through the toolkit: train (QAT over bit-widths), resume, eval, attack,
integer export and verify (exactness: tests/export/test_integer_program.py)."""

import json

import brevitas.nn as bnn
import torch

from qnn.checkpoint import load_checkpoint
from qnn.config import TrainConfig
from qnn.layers import set_bit_width_
from qnn.models import create_model
from qnn.train import train
from tests.conftest import cli_error, run_cli


def test_zoo_variants_are_switchable_brevitas_models():
    for name, size, n_conv, n_dw in (("mobilenetv2_cifar", 32, 52, 17), ("mobilenetv2", 224, 52, 17),
                                     ("vgg11_cifar", 32, 8, 0)):
        m = create_model(name, num_classes=10, width_mult=0.25)
        assert m.in_size == size and m.num_classes == 10
        convs = [c for c in m.modules() if isinstance(c, bnn.QuantConv2d)]
        assert len(convs) == n_conv and sum(c.groups > 1 for c in convs) == n_dw, name
        set_bit_width_(m, 32)
        m.eval()
        assert m(torch.rand(2, 3, size, size)).shape == (2, 10)


def test_train_resume_eval_attack_on_mobilenetv2(tmp_path, capsys):
    cfg = dict(model="mobilenetv2_cifar", bits=[4, 32], epochs=1, n_synthetic=64, batch_size=64,
               progress=False, lr=0.05)
    train(TrainConfig(out_dir=str(tmp_path / "r"), **cfg))
    m, obj = load_checkpoint(tmp_path / "r" / "model.pt")
    assert obj["arch"] == "mobilenetv2_cifar" and obj["trained_bits"] == [4, 32]
    # a resumed run with equal settings has nothing left to do and keeps the weights
    train(TrainConfig(out_dir=str(tmp_path / "r"), resume=True, **cfg))
    m2, _ = load_checkpoint(tmp_path / "r" / "model.pt")
    x = torch.rand(4, 3, 32, 32)
    for b in (4, 32):
        set_bit_width_(m, b)
        set_bit_width_(m2, b)
        m.eval()
        m2.eval()
        assert torch.equal(m(x), m2(x))
    ck = tmp_path / "r" / "model.pt"
    assert run_cli(["eval", "--checkpoint", ck, "--bits", "4,32", "--subset", 16, "--json", tmp_path / "e.json"]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())["accuracy_pct"]) == {"4", "32"}
    from qnn.attacks.patch import PatchConfig, evaluate_patch, optimize_universal_patch

    set_bit_width_(m, 4)
    y = torch.randint(0, 10, (4,))
    patch, _ = optimize_universal_patch(m, x, y, PatchConfig(iterations=2, batch_size=4))
    assert 0 <= evaluate_patch(m, x, y, patch, PatchConfig())["asr_pct"] <= 100
    assert run_cli(["export", "--checkpoint", ck, "--bits", 4, "--out", tmp_path / "m.onnx"]) == 0
    assert run_cli(["verify", tmp_path / "m.onnx"]) == 0
    capsys.readouterr()
    assert "has no 8-bit state" in cli_error(["export", "--checkpoint", ck, "--bits", 8, "--out",
                                                           tmp_path / "m8.onnx"], capsys)

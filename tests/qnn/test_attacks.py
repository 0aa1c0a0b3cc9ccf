import json

import numpy as np
import pytest
import torch

from qnn.attacks.patch import (PatchConfig, apply_patch, asr_metrics, evaluate_patch, load_patch, make_mask,
                               optimize_universal_patch, save_patch)
from qnn.checkpoint import load_checkpoint
from qnn.data import load_dataset
from qnn.errors import QNNError
from qnn.layers import set_bit_width_
from tests.conftest import cli_error as _err, run_cli


@pytest.fixture(scope="module")
def model_and_data(trained_ckpt):
    m, _ = load_checkpoint(trained_ckpt)
    set_bit_width_(m, 8)
    xa, ya = load_dataset("synthetic", "train", n_synthetic=2000).subset(400).tensors()
    xe, ye = load_dataset("synthetic", "test", n_synthetic=2000).subset(300).tensors()
    return m, xa, ya, xe, ye


def test_asr_definitions():
    y = np.array([0, 1, 2, 3])
    clean = np.array([0, 1, 2, 0])          # 3 correct
    adv = np.array([5, 1, 5, 5])
    r = asr_metrics(clean, adv, y)
    assert r["n_asr_images"] == 3 and r["asr_pct"] == pytest.approx(200 / 3)
    assert r["clean_acc_pct"] == 75 and r["robust_acc_pct"] == 25
    t = asr_metrics(clean, np.array([5, 5, 2, 5]), y, targeted=True, target_class=5)
    assert t["n_asr_images"] == 4 and t["asr_pct"] == 75
    with pytest.raises(QNNError, match="empty"):
        asr_metrics(np.array([]), np.array([]), np.array([]))


def test_apply_patch_exact_paste():
    x = torch.zeros(2, 3, 8, 8)
    p = torch.ones(3, 2, 2)
    out = apply_patch(x, p, make_mask("square", 2, 2), torch.tensor([[0, 0], [6, 6]]))
    assert out.sum() == 2 * 3 * 4 and out[1, :, 6:, 6:].min() == 1 and out[0, :, :2, :2].min() == 1


def test_asr_rises_with_patch_size_and_iterations(model_and_data):
    m, xa, ya, xe, ye = model_and_data
    res = {}
    for size, iters in ((3, 40), (10, 40), (10, 2)):
        cfg = PatchConfig(patch_shape=(size, size), iterations=iters, step=0.05, batch_size=64, seed=1)
        patch, _ = optimize_universal_patch(m, xa, ya, cfg)
        res[(size, iters)] = evaluate_patch(m, xe, ye, patch, cfg)["asr_pct"]
    assert res[(10, 40)] > res[(3, 40)] + 5, res
    assert res[(10, 40)] > res[(10, 2)] + 5, res


def test_targeted_patch_reaches_target():
    """Real check on a real model: pretrained ResNet-20 on the shared CIFAR-10, targeted 10x10 patch."""
    from qnn.checkpoint import load_float_weights
    from qnn.data import load_cifar10
    from qnn.models import create_model
    from tests.conftest import SHARED

    w = SHARED / "weights" / "resnet20-12fca82f.th"
    if not w.is_file():
        pytest.skip("needs ../shared/data")
    m = load_float_weights(create_model("resnet20"), str(w)).eval()
    test = load_cifar10(SHARED / "cifar10", "test")
    xa, ya = test.subset(200, start=5000).tensors()
    xe, ye = test.subset(200).tensors()
    cfg = PatchConfig(patch_shape=(10, 10), iterations=40, step=0.05, optimizer="adam", batch_size=64,
                      targeted=True, target_class=3)
    patch, _ = optimize_universal_patch(m, xa, ya, cfg)
    r = evaluate_patch(m, xe, ye, patch, cfg)
    assert r["asr_pct"] > 50, r


@pytest.mark.parametrize("kw,msg", [
    (dict(patch_shape=(40, 40)), "larger than"),
    (dict(patch_frac=0.0), r"\(0, 1\)"),
    (dict(patch_frac=1.0), r"\(0, 1\)"),
    (dict(patch_frac=-0.2), r"\(0, 1\)"),
    (dict(shape="star"), "unknown shape 'star'"),
    (dict(targeted=True, target_class=10), "out of range"),
    (dict(placement="middle"), "placement"),
])
def test_bad_patch_configs(kw, msg):
    with pytest.raises(QNNError, match=msg):
        PatchConfig(**kw)


def test_patch_files_roundtrip_and_wrong_shape(tmp_path):
    cfg = PatchConfig(patch_shape=(5, 5), shape="circle")
    p = torch.rand(3, 5, 5)
    path = save_patch(tmp_path / "p", p, cfg)
    assert path.with_suffix(".png").is_file()
    q, c2 = load_patch(path)
    assert torch.equal(q, p) and c2.shape == "circle"
    with pytest.raises(QNNError, match="expected"):
        load_patch(path, expect_shape=(6, 6))
    bad = tmp_path / "bad.npz"
    np.savez(bad, patch=np.zeros((3, 4, 4), np.float32), mask=np.ones((1, 5, 5)), config=json.dumps(cfg.to_dict()), info="{}")
    with pytest.raises(QNNError, match="shape"):
        load_patch(bad)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(QNNError, match="not a patch"):
        load_patch(tmp_path / "junk.npz")



def test_attack_cli_and_bad_inputs(trained_ckpt, tmp_path, capsys):
    base = ["attack", "--checkpoint", trained_ckpt, "--iterations", "3", "--n-attack", "64", "--n-eval", "64"]
    assert "larger than" in _err(base + ["--patch-size", "33", "--out", tmp_path / "a"], capsys)
    assert "--patch-frac" in _err(base + ["--patch-frac", "1.5", "--out", tmp_path / "a"], capsys)
    assert "unknown shape 'hex'" in _err(base + ["--shape", "hex", "--out", tmp_path / "a"], capsys)
    assert "out of range" in _err(base + ["--targeted", "--target-class", "11", "--out", tmp_path / "a"], capsys)
    assert "--n-eval" in _err(base[:-2] + ["--n-eval", "0", "--out", tmp_path / "a"], capsys)
    rc = run_cli(base + ["--bits", "8,2", "--out", tmp_path / "ok"])
    assert rc == 0
    capsys.readouterr()
    r = json.loads((tmp_path / "ok" / "result.json").read_text())
    assert set(r["results"]) == {"8", "2"} and "asr_pct" in r["results"]["8"]
    # evaluating a saved patch; a patch of the wrong shape file is refused
    rc = run_cli(base + ["--bits", "4", "--patch", tmp_path / "ok" / "patch_8b.npz", "--out", tmp_path / "ev"])
    assert rc == 0
    capsys.readouterr()
    np.savez(tmp_path / "w.npz", patch=np.zeros((3, 2, 2), np.float32), config=json.dumps(PatchConfig().to_dict()))
    assert "shape" in _err(base + ["--patch", tmp_path / "w.npz", "--out", tmp_path / "ev2"], capsys)


def test_transfer_matrix_and_analysis_cli(trained_ckpt, tmp_path):
    rc = run_cli(["attack", "--checkpoint", trained_ckpt, "--iterations", "3", "--n-attack", "64", "--n-eval", "64",
                  "--source-bits", "32,2", "--bits", "32,8,2", "--analysis", "--out", tmp_path / "t"])
    assert rc == 0
    r = json.loads((tmp_path / "t" / "result.json").read_text())
    assert r["results"]["sources"] == ["32", "2"] and set(r["results"]["rows"]["2"]["targets"]) == {"32", "8", "2"}
    assert (tmp_path / "t" / "transfer.png").is_file() and (tmp_path / "t" / "features_2b.png").is_file()
    assert set(r["gradient_alignment_clean"]) == {"8", "2"}


def test_pixel_attacks_reduce_accuracy(model_and_data):
    from qnn.attacks.patch import predict
    from qnn.attacks.pixel import fgsm, pgd_linf

    m, _, _, xe, ye = model_and_data
    x, y = xe[:100], ye[:100]
    acc = (predict(m, x) == y).float().mean()
    acc_f = (predict(m, fgsm(m, x, y, 8 / 255)) == y).float().mean()
    acc_p = (predict(m, pgd_linf(m, x, y, 8 / 255, steps=10)) == y).float().mean()
    # both attacks hurt; PGD-10 (step 2/255, random start) is at least about as strong as one FGSM step (it is not
    # guaranteed to be stronger on every image set: 2 images of slack on 100)
    assert acc_f < acc - 0.1 and acc_p < acc - 0.1 and acc_p <= acc_f + 0.02


def test_adaptive_attacks_run(model_and_data):
    m, xa, ya, xe, ye = model_and_data
    for kw in (dict(eot_bits=[2, 4, 8, 32]), dict(ensemble_bits=[2, 8])):
        cfg = PatchConfig(patch_shape=(6, 6), iterations=3, batch_size=32, **kw)
        patch, info = optimize_universal_patch(m, xa, ya, cfg)
        assert patch.shape == (3, 6, 6) and info["images_x_eot_per_s"] > 0


def test_attacks_are_registered_classes_that_refuse_what_they_do_not_read(trained_ckpt, tmp_path, capsys):
    """`qnn attack --attack NAME` runs the registered class (`qnn list attacks` lists each with a line); settings
    the chosen attack would not read are refused before any work, and the pixel attacks' options are honoured."""
    from qnn.attacks.registry import get_attack, list_attacks
    from qnn.cli import main

    assert list_attacks() == ["universal", "lavan", "per_image", "fgsm", "pgd"]
    assert all(get_attack(n).summary for n in list_attacks())
    assert main(["list", "attacks"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{n} " in listed for n in list_attacks()) and "smoke" in listed
    base = ["attack", "--checkpoint", trained_ckpt, "--n-attack", "64", "--n-eval", "64", "--bits", "4"]
    for extra, msg in ((["--attack", "pgd", "--suite", "seen"], "--suite take(s) a universal patch"),
                       (["--attack", "per_image", "--source-bits", "4"], "--source-bits take(s) a universal patch"),
                       (["--eps", "0.1"], "--eps: read by --attack fgsm / pgd only"),
                       (["--attack", "fgsm", "--pgd-steps", "3"], "--pgd-steps: read by --attack pgd only"),
                       (["--attack", "nope"], "unknown attack 'nope'")):
        assert msg in _err(base + extra + ["--out", tmp_path / "x"], capsys), extra
    assert not (tmp_path / "x").exists()
    # PGD's steps and step size are options: one step of eps from no start is FGSM's; more steps fool more
    r = {}
    for name, extra in (("fgsm", ["--attack", "fgsm", "--eps", "0.03"]),
                        ("pgd1", ["--attack", "pgd", "--eps", "0.03", "--pgd-steps", "1", "--pgd-alpha", "0.001"]),
                        ("pgd", ["--attack", "pgd", "--eps", "0.03", "--pgd-steps", "10", "--pgd-alpha", "0.01"])):
        assert run_cli(base + extra + ["--out", tmp_path / name]) == 0
        r[name] = json.loads((tmp_path / name / "result.json").read_text())["results"]["4"]["asr_pct"]
    capsys.readouterr()
    assert r["pgd1"] < r["pgd"] and r["pgd1"] <= r["fgsm"], r

import pytest

from qnn.config import TrainConfig
from qnn.defenses import list_defenses, make_defense, option_table
from qnn.errors import QNNError
from qnn.models import create_model
from qnn.train import train
from tests.conftest import cli_error as _err


def test_registry():
    assert {"none", "qadtr", "pbat", "dwq"} <= set(list_defenses())


@pytest.mark.parametrize("name,args", [("qadtr", {}), ("qadtr", {"no_aqapa": True, "no_gir": True}),
                                       ("pbat", {"iters": 2}), ("dwq", {"pgd_steps": 1})])
def test_each_defense_trains(name, args, tmp_path):
    r = train(TrainConfig(model="small_cnn", bits=[2, 8, 32], epochs=1, n_synthetic=256, batch_size=64, progress=False,
                          out_dir=str(tmp_path / name), defense=name, defense_args=args))
    assert r["final"]["train_loss"] > 0 and set(r["final"]["test_acc"]) == {"2", "8", "32"}


def test_qadtr_pool_is_updated_and_saved(tmp_path):
    import torch

    out = tmp_path / "q"
    train(TrainConfig(model="small_cnn", bits=[2, 8], epochs=1, n_synthetic=256, batch_size=64, progress=False,
                      out_dir=str(out), defense="qadtr", defense_args={"pool_size": 4}))
    st = torch.load(out / "last.pt", weights_only=True)["defense"]
    g = torch.Generator().manual_seed(0 + 4242)
    init = torch.rand(2, 4, 3, 6, 6, generator=g)  # one pool per trained bit-width
    assert st["pool"].shape == init.shape and not torch.equal(st["pool"], init)
    assert set(st["asr_ema"]) == {"2", "8"}


# ---- the units of QADT-R, each alone

def test_patch_pool_draws_per_image_and_steps_only_its_bit_widths_patches():
    import torch

    from qnn.defenses.qadtr import PatchPool

    pool = PatchPool([2, 8], size=3, side=4, seed=0)
    before = pool.patches.clone()
    leaf, k = pool.draw(8, 64, torch.Generator().manual_seed(0), "cpu")
    assert leaf.requires_grad and leaf.shape == (3, 3, 4, 4) and set(k.tolist()) == {0, 1, 2}
    grad = torch.zeros(3, 3, 4, 4)
    grad[1] = 1.0
    pool.step(8, grad, 0.1)
    assert torch.equal(pool.patches[0], before[0])                            # the 2-bit pool
    assert torch.equal(pool.patches[1, [0, 2]], before[1, [0, 2]])            # patches with no gradient
    assert torch.allclose(pool.patches[1, 1], (before[1, 1] + 0.1).clamp(0, 1))
    with pytest.raises(QNNError, match="patch pool"):
        pool.load(torch.rand(2, 2, 3, 4, 4))


def test_bit_sampler_draws_more_where_patches_succeed():
    from collections import Counter

    from qnn.defenses.qadtr import BitSampler

    s = BitSampler([2, 4, 8], alpha=1.0, temp=0.1, seed=0)
    for _ in range(50):
        s.update(2, 0.9)
        s.update(8, 0.1)
    drawn = Counter(s.choose(step, scheduled=8) for step in range(2000))
    assert drawn[2] > drawn[4] > drawn[8]
    keep = BitSampler([2, 4, 8], alpha=0.0, temp=0.1, seed=0)
    assert all(keep.choose(step, 4) == 4 for step in range(100))                # alpha 0: the schedule's
    assert BitSampler([4], 1.0, 0.1, 0).choose(3, 4) == 4


def test_gir_penalty_is_the_positive_gradient_agreement_and_differentiable():
    import torch

    from qnn.defenses.qadtr import gir_penalty
    from qnn.layers import ensure_calibrated_, get_bit_width, set_bit_width_

    torch.manual_seed(0)
    m = create_model("small_cnn")
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for b in (2, 8):
        set_bit_width_(m, b)
        ensure_calibrated_(m, x)
    m.train()
    set_bit_width_(m, 8)
    p = gir_penalty(m, x, y, 8, 2)
    assert 0 <= float(p.detach()) <= 1 and get_bit_width(m)[0] == 8
    p.backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in m.parameters())
    assert float(gir_penalty(m, x, y, 8, 8)) == pytest.approx(1.0, abs=1e-4)  # same bit-width: same gradients


def test_refine_in_patch_raises_the_loss_inside_the_patch_only(trained_ckpt):
    import torch
    import torch.nn.functional as F

    from qnn.attacks.patch import PatchConfig, eot_warp, make_mask
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset
    from qnn.defenses.qadtr import refine_in_patch
    from qnn.layers import set_bit_width_

    m, _ = load_checkpoint(trained_ckpt)
    set_bit_width_(m, 4)
    x, y = load_dataset("synthetic", "test", n_synthetic=2000).subset(64).tensors()
    warped, mask = eot_warp(x, torch.rand(3, 6, 6), make_mask("square", 6, 6), PatchConfig(patch_shape=(6, 6)),
                            torch.Generator().manual_seed(0))
    delta = refine_in_patch(m, x, y, warped, mask, steps=2, step_size=0.25)
    m.eval()
    with torch.no_grad():
        base = F.cross_entropy(m(x * (1 - mask) + warped * mask), y)
        adv = F.cross_entropy(m(x * (1 - mask) + (warped + delta) * mask), y)
    assert adv > base
    assert ((warped + delta) >= 0).all() and ((warped + delta) <= 1).all()
    assert torch.equal(refine_in_patch(m, x, y, warped, mask, 0, 0.25), torch.zeros_like(warped))


# ---- QADT-R's loss

def _one_step(args: dict, bits: int, step: int = 1, train_bits=(2, 8)):
    import torch

    from qnn.layers import ensure_calibrated_, set_bit_width_

    torch.manual_seed(0)
    m = create_model("small_cnn")
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for b in train_bits:
        set_bit_width_(m, b)
        ensure_calibrated_(m, x)
    set_bit_width_(m, bits)
    q = make_defense("qadtr", {"no_gir": True, "inner_steps": 0, **args},
                     TrainConfig(model="small_cnn", bits=list(train_bits)), m)
    before = q.pool.patches.clone()
    m.train()
    loss, _ = q.loss(m, x, y, bits, step=step)
    loss.backward()
    q.after_step()
    return before, q.pool.patches, q


def test_qadtr_step_moves_every_patch_of_the_steps_pool_only():
    import torch

    before, after, q = _one_step({"pool_size": 3}, bits=8)
    assert after.shape == (2, 3, 3, 6, 6)
    assert torch.equal(after[0], before[0])                                    # the 2-bit pool
    assert all(not torch.equal(after[1, k], before[1, k]) for k in range(3))  # each image drew its own patch
    assert q.sampler.ema[8] != 0.5 and q.sampler.ema[2] == 0.5


def test_qadtr_ablation_without_aqapa_leaves_the_pool_and_the_schedule():
    import torch

    before, after, q = _one_step({"no_aqapa": True}, bits=2)
    assert torch.equal(after, before)
    assert all(q.choose_bits(s, 8) == 8 for s in range(50))


def _patched_step(args: dict, n: int):
    """One QADT-R loss at 4 bits on a small CNN, all images patched, no refinement or GIR: returns the images, the
    batch the model was fed, the defense and the loss."""
    import torch
    import torch.nn as nn

    from qnn.layers import ensure_calibrated_, set_bit_width_

    m = create_model("small_cnn")
    x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))
    set_bit_width_(m, 4)
    ensure_calibrated_(m, x)
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, xin):
            seen.append(xin.detach())
            return self.m(xin)

    q = make_defense("qadtr", {"inner_steps": 0, "frac_patched": 1.0, "no_gir": True, **args},
                     TrainConfig(model="small_cnn", bits=[4]), m)
    m.train()
    loss, _ = q.loss(Spy(), x, y, 4, step=3)
    return x, seen[-1], q, loss


def test_qadtr_scale_eot_pastes_resized_patches_on_the_pixel_grid():
    """A-QAPA's scale EOT (`sizes`): the 6x6 pool patch is pasted at the drawn side (here always 8), as an exact
    nearest-neighbour copy on the pixel grid: 8x8 changed pixels per image, values taken from the pool patch."""
    x, fed, q, _ = _patched_step({"sizes": "8"}, 16)
    # (grid_sample on the snapped grid leaks ~5e-7 into the neighbouring pixels: far below one uint8 input level)
    changed = ((fed - x).abs() > 1e-4).any(1)  # N,H,W
    assert (changed.sum((1, 2)) <= 64).all() and (changed.sum((1, 2)) >= 48).all()
    vals = fed.permute(0, 2, 3, 1)[changed].flatten()
    assert (vals[:, None] - q.pool.patches.flatten()[None]).abs().min(1).values.max() < 1e-5


def test_qadtr_default_sizes_follow_the_patch_size():
    cfg = TrainConfig(model="small_cnn", bits=[4])
    assert make_defense("qadtr", {}, cfg, create_model("small_cnn")).sizes == [5, 6, 7, 8]
    assert make_defense("qadtr", {"patch_size": 4}, cfg, create_model("small_cnn")).sizes == [3, 4, 5, 6]
    assert make_defense("qadtr", {"sizes": ""}, cfg, create_model("small_cnn")).sizes == []


def test_qadtr_state_round_trips_and_a_pool_of_another_shape_is_refused():
    import torch

    cfg = TrainConfig(model="small_cnn", bits=[2, 8])
    q = make_defense("qadtr", {"pool_size": 2}, cfg, create_model("small_cnn"))
    q.pool.patches = torch.rand(2, 2, 3, 6, 6)
    q.sampler.ema = {2: 0.3, 8: 0.1}
    q2 = make_defense("qadtr", {"pool_size": 2}, cfg, create_model("small_cnn"))
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.pool.patches, q.pool.patches) and q2.sampler.ema == {2: 0.3, 8: 0.1}
    q3 = make_defense("qadtr", {"pool_size": 3}, cfg, create_model("small_cnn"))
    with pytest.raises(QNNError, match="patch pool"):
        q3.load_state_dict(q.state_dict())


# ---- options: one validation for flags, --defense-arg, YAML and Python

def test_every_defense_option_is_a_train_flag_with_help(capsys):
    from qnn.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name, (_, help, defaults, _) in option_table().items():
        assert "--" + name.replace("_", "-") in out and help
    assert set(option_table()["patch_size"][2]) == {"qadtr", "pbat"}


def test_defense_bad_inputs(tmp_path, capsys):
    base = ["train", "--model", "small_cnn", "--no-progress", "--out", tmp_path / "x"]
    assert "unknown defense" in _err(base + ["--defense", "magic"], capsys)
    assert "--lambda-gir" in _err(base + ["--defense", "qadtr", "--lambda-gir", "-1"], capsys)
    assert "--pool-size" in _err(base + ["--defense", "qadtr", "--pool-size", "0"], capsys)
    assert "lambda_gir" in _err(base + ["--defense", "qadtr", "--defense-arg", "lambda_gir=-1"], capsys)
    assert "pool_size" in _err(base + ["--defense", "qadtr", "--defense-arg", "pool_size=0"], capsys)
    assert "--pool-size" in _err(base + ["--defense", "qadtr", "--pool-size", "two"], capsys)
    assert "empty" in _err(base + ["--defense", "qadtr", "--bits", ""], capsys)
    assert "unknown option(s) for defense 'pbat': lambda_gir" in _err(base + ["--defense", "pbat", "--lambda-gir", "1"], capsys)
    assert "--adapt-temp" in _err(base + ["--defense", "qadtr", "--adapt-temp", "nan"], capsys)
    assert "lambda_gir must be in [0, 100], got -1.0" in _err(base + ["--defense", "qadtr", "--defense-arg", "lambda_gir=-1"], capsys)
    cfg = TrainConfig(model="small_cnn")
    for bad, match in [({"pool_size": -3}, "pool_size"), ({"inner_steps": -1}, "inner_steps"),
                       ({"sizes": "5,40"}, "sizes"), ({"sizes": "5,x"}, "sizes"), ({"pool_size": 2.5}, "pool_size"),
                       ({"no_gir": "maybe"}, "no_gir"), ({"frac_patched": 0}, "frac_patched"),
                       ({"adapt_temp": 0}, "adapt_temp"), ({"patch_size": 40}, "patch_size")]:
        with pytest.raises(QNNError, match=match):
            make_defense("qadtr", bad, cfg, create_model("small_cnn"))
    # a misspelt or retired option is refused, not ignored
    for bad in ("pool_per_bits", "pool_groups", "split_bits", "distill", "refine_pool", "aqapa_signal"):
        with pytest.raises(QNNError, match=f"unknown option.*{bad}"):
            make_defense("qadtr", {bad: True}, cfg, create_model("small_cnn"))
    with pytest.raises(QNNError, match="unknown option.*inner_steps"):
        make_defense("pbat", {"inner_steps": 2}, cfg, create_model("small_cnn"))
    assert "unknown option" in _err(base + ["--defense", "qadtr", "--defense-arg", "adapt_tmp=0.2"], capsys)
    assert "KEY=VALUE" in _err(base + ["--defense", "qadtr", "--defense-arg", "adapt_temp"], capsys)

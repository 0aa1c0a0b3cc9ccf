import pytest

from qnn.config import TrainConfig
from qnn.defenses import list_defenses, make_defense
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
    init = torch.rand(2, 4, 3, 6, 6, generator=g)  # default: one pool per trained bit-width
    assert st["pool"].shape == init.shape and not torch.equal(st["pool"], init)


def test_qadtr_per_image_refinement_raises_the_loss(trained_ckpt):
    """A-QAPA's per-image step on top of the pool patch makes the patched images harder, inside the mask only."""
    import torch
    import torch.nn.functional as F

    from qnn.attacks.patch import eot_warp
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset
    from qnn.layers import set_bit_width_

    m, _ = load_checkpoint(trained_ckpt)
    set_bit_width_(m, 4)
    x, y = load_dataset("synthetic", "test", n_synthetic=2000).subset(64).tensors()
    q = make_defense("qadtr", {"inner_steps": 2}, TrainConfig(model="small_cnn", bits=[4, 8]), m)
    warped, mask = eot_warp(x, q.pool[0, 0], q.mask, q.pcfg, torch.Generator().manual_seed(0))
    delta, g0 = q.refine(m, x, y, warped, mask)
    assert g0.shape == warped.shape and (g0 * (mask < 1e-3)).abs().max() < 1e-4 * g0.abs().max()  # inside the patch
    m.eval()
    with torch.no_grad():
        base = F.cross_entropy(m(x * (1 - mask) + warped * mask), y)
        adv = F.cross_entropy(m(x * (1 - mask) + (warped + delta) * mask), y)
    assert adv > base
    assert ((warped + delta) >= 0).all() and ((warped + delta) <= 1).all()


def test_qadtr_refine_pool_steps_the_pool_towards_a_stronger_patch(trained_ckpt):
    """refine_pool: the refine pass's gradient takes a signed step on the pool before training (no other pool
    changes before after_step), and the stepped patch fools the frozen model more than the one it came from."""
    import torch
    import torch.nn.functional as F

    from qnn.attacks.patch import eot_warp
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset
    from qnn.layers import set_bit_width_

    m, _ = load_checkpoint(trained_ckpt)
    set_bit_width_(m, 4)
    x, y = load_dataset("synthetic", "test", n_synthetic=2000).subset(128).tensors()
    patches = {}
    for on in (False, True):
        q = make_defense("qadtr", {"refine_pool": on, "pool_size": 1, "sizes": "", "no_gir": True, "frac_patched": 1.0,
                                   "patch_step": 0.2}, TrainConfig(model="small_cnn", bits=[4, 8]), m)
        before = q.pool.clone()
        m.train()
        q.loss(m, x, y, 4, step=0)
        changed = not torch.equal(q.pool, before)
        assert changed == on and torch.equal(q.pool[1], before[1])  # only the step's bit-width's pool
        patches[on] = q.pool[0, 0].clone()
    m.eval()  # both patches against the same model (the loss calls above updated its BatchNorm statistics)
    losses = {}
    for on, patch in patches.items():
        with torch.no_grad():
            warped, mask = eot_warp(x, patch, q.mask, q.pcfg, torch.Generator().manual_seed(1))
            losses[on] = F.cross_entropy(m(x * (1 - mask) + warped * mask), y).item()
    assert losses[True] > losses[False]


def test_qadtr_refresh_replaces_the_weakest_patch():
    import torch

    q = make_defense("qadtr", {"pool_size": 3, "refresh_every": 5}, TrainConfig(model="small_cnn", bits=[4]),
                     create_model("small_cnn"))
    q.patch_score = torch.tensor([[0.5, 0.1, 0.9]])
    before = q.pool[0].clone()
    m = create_model("small_cnn")
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    from qnn.layers import ensure_calibrated_, set_bit_width_

    set_bit_width_(m, 4)
    ensure_calibrated_(m, x)
    m.train()
    q.loss(m, x, y, 4, step=5)
    pool = q.pool[0]
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[2], before[2]) and not torch.equal(pool[1], before[1])


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
    before = q.pool.clone()
    m.train()
    loss, _ = q.loss(m, x, y, bits, step=step)
    loss.backward()
    q.after_step()
    return before, q.pool


def test_qadtr_per_bit_pools_update_only_the_steps_bit_width():
    """pool_per_bit: one pool per trained bit-width; a step at 8 bits moves a patch of the 8-bit pool only."""
    import torch

    before, after = _one_step({"pool_per_bit": True, "pool_size": 2}, bits=8)
    assert after.shape == (2, 2, 3, 6, 6)
    assert torch.equal(after[0], before[0])  # the 2-bit pool
    assert not torch.equal(after[1], before[1])


def test_qadtr_pool_groups_share_a_pool_between_bit_widths():
    """pool_groups='8+4,2': 8 and 4 bits share pool 0, so a 4-bit step moves it and leaves the 2-bit pool alone;
    a grouping that misses or repeats a trained bit-width, or is not '+'/',' separated ints, is refused."""
    import torch

    before, after = _one_step({"pool_groups": "8+4,2", "pool_size": 2}, bits=4, train_bits=(2, 4, 8))
    assert after.shape == (2, 2, 3, 6, 6)
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    cfg = TrainConfig(model="small_cnn", bits=[2, 4, 8])
    for bad in ("8+4", "8+4,2,4", "8+4,x"):
        with pytest.raises(QNNError, match="pool_groups"):
            make_defense("qadtr", {"pool_groups": bad}, cfg, create_model("small_cnn"))


def test_qadtr_split_bits_runs_every_bit_width_in_one_step():
    """split_bits: one step runs each trained bit-width on its share of the batch, so every per-bit pool moves and
    the logits cover the whole batch in order; the shares follow A-QAPA's draw weights (more where patches succeed)."""
    import torch

    before, after = _one_step({"split_bits": True, "pool_size": 2}, bits=8, train_bits=(2, 4, 8))
    assert all(not torch.equal(after[i], before[i]) for i in range(3))
    before, after = _one_step({"pool_size": 2}, bits=8, train_bits=(2, 4, 8))
    assert sum(not torch.equal(after[i], before[i]) for i in range(3)) == 1  # without: the step's pool only
    q = make_defense("qadtr", {"split_bits": True}, TrainConfig(model="small_cnn", bits=[2, 4, 8]), create_model("small_cnn"))
    assert sorted(q.split_sizes(32)) == [10, 11, 11]
    q.asr_ema = {2: 0.6, 4: 0.2, 8: 0.2}
    sizes = q.split_sizes(128)
    assert sum(sizes) == 128 and sizes[0] > 2 * sizes[1] and abs(sizes[1] - sizes[2]) <= 1


def test_qadtr_shared_bn_affine_ties_gamma_beta_but_not_statistics():
    """shared_bn_affine: every switchable BN's bit-widths share one (gamma, beta), taken from the widest trained
    bit-width; running statistics stay per bit-width; without the option nothing is tied."""
    import torch

    from qnn.layers import bit_index
    from qnn.quantization import SwitchableBatchNorm2d

    m = create_model("small_cnn")
    conv = next(mod for mod in m.modules() if isinstance(mod, SwitchableBatchNorm2d))
    with torch.no_grad():
        for i, bn in enumerate(conv.bns):
            bn.weight.fill_(float(i + 1))
    make_defense("qadtr", {}, TrainConfig(model="small_cnn", bits=[2, 8]), m)
    assert conv.bns[0].weight is not conv.bns[1].weight
    n_before = sum(p.numel() for p in m.parameters())
    make_defense("qadtr", {"shared_bn_affine": True}, TrainConfig(model="small_cnn", bits=[2, 8]), m)
    src = conv.bns[bit_index(8)]
    assert all(bn.weight is src.weight and bn.bias is src.bias for bn in conv.bns)
    assert float(conv.bns[bit_index(2)].weight[0]) == bit_index(8) + 1  # the 8-bit values, not the 2-bit ones
    assert conv.bns[0].running_mean is not conv.bns[1].running_mean
    assert sum(p.numel() for p in m.parameters()) < n_before


def test_qadtr_per_image_assignment_updates_every_pool_patch():
    """pool_assign='image': each patched image draws its own pool patch, so one step updates every patch; with
    'batch' one patch is pasted on all images and only it moves."""
    import torch

    before, after = _one_step({"pool_assign": "image", "pool_size": 3}, bits=2)
    assert all(not torch.equal(after[0, k], before[0, k]) for k in range(3))
    before, after = _one_step({"pool_assign": "batch", "pool_size": 3}, bits=2)
    assert sum(not torch.equal(after[0, k], before[0, k]) for k in range(3)) == 1
    with pytest.raises(QNNError, match="pool_assign"):
        make_defense("qadtr", {"pool_assign": "magic"}, TrainConfig(model="small_cnn"), create_model("small_cnn"))


def test_qadtr_pool_mix_starts_images_from_noise_that_gives_the_pool_nothing():
    """pool_mix: a patched image starts from fresh noise with that probability; such images send no gradient to the
    pool, so with almost every image fresh the pool barely moves, while without pool_mix every patch moves."""
    import torch

    before, after = _one_step({"pool_assign": "image", "pool_size": 3, "pool_mix": 0.97}, bits=2)
    moved = sum(not torch.equal(after[0, k], before[0, k]) for k in range(3))
    before0, after0 = _one_step({"pool_assign": "image", "pool_size": 3}, bits=2)
    assert sum(not torch.equal(after0[0, k], before0[0, k]) for k in range(3)) == 3
    assert moved < 3
    for bad in (-0.1, 1.0):
        with pytest.raises(QNNError, match="pool_mix"):
            make_defense("qadtr", {"pool_mix": bad}, TrainConfig(model="small_cnn"), create_model("small_cnn"))


def test_qadtr_pool_warm_start_gives_stronger_patches_once(trained_ckpt):
    """pool_init_iters: before the first step every per-bit pool is optimised at its own bit-width (its patches then
    fool the model more than the noise they start from); the bit-width is restored, and a resumed pool is kept."""
    import torch
    import torch.nn.functional as F

    from qnn.attacks.patch import eot_warp
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset
    from qnn.layers import set_bit_width_

    m, _ = load_checkpoint(trained_ckpt)
    x, y = load_dataset("synthetic", "test", n_synthetic=2000).subset(64).tensors()
    args = {"pool_init_iters": 8, "pool_size": 2, "no_gir": True, "inner_steps": 0}
    q = make_defense("qadtr", args, TrainConfig(model="small_cnn", bits=[4, 8]), m)
    noise = q.pool.clone()
    set_bit_width_(m, 4)
    m.train()
    q.loss(m, x, y, 4, step=0)
    assert m.current_bits[0] == 4
    m.eval()
    for pi, b in enumerate([4, 8]):
        set_bit_width_(m, b)
        for k in range(2):
            losses = []
            for pool in (noise, q.pool):
                warped, mask = eot_warp(x, pool[pi, k], q.mask, q.pcfg, torch.Generator().manual_seed(1))
                with torch.no_grad():
                    losses.append(F.cross_entropy(m(x * (1 - mask) + warped * mask), y))
            assert losses[1] > losses[0]
    q2 = make_defense("qadtr", args, TrainConfig(model="small_cnn", bits=[4, 8]), m)
    q2.load_state_dict(q.state_dict())
    set_bit_width_(m, 8)
    m.train()
    q2.loss(m, x, y, 8, step=1)  # no second warm start: the loaded pool is untouched (no after_step)
    assert torch.equal(q2.pool, q.pool)
    with pytest.raises(QNNError, match="pool_init"):
        make_defense("qadtr", {"pool_init_iters": -1}, TrainConfig(model="small_cnn"), create_model("small_cnn"))


def test_qadtr_state_from_a_shared_pool_checkpoint_loads():
    """Checkpoints written before per-bit pools (pool (S,3,P,P)) resume; a pool of another shape is refused."""
    import torch

    q = make_defense("qadtr", {"pool_size": 2, "pool_per_bit": False}, TrainConfig(model="small_cnn", bits=[2, 8]),
                     create_model("small_cnn"))
    old = {"pool": torch.rand(2, 3, 6, 6), "asr_ema": {"2": 0.3, "8": 0.1}, "patch_score": torch.zeros(2)}
    q.load_state_dict(old)
    assert torch.equal(q.pool[0], old["pool"])
    q2 = make_defense("qadtr", {"pool_size": 2}, TrainConfig(model="small_cnn", bits=[2, 8]),
                      create_model("small_cnn"))
    with pytest.raises(QNNError, match="patch pool"):
        q2.load_state_dict(old)



def test_defense_bad_inputs(tmp_path, capsys):
    base = ["train", "--model", "small_cnn", "--no-progress", "--out", tmp_path / "x"]
    assert "unknown defense" in _err(base + ["--defense", "magic"], capsys)
    assert "--lambda-gir" in _err(base + ["--defense", "qadtr", "--lambda-gir", "-1"], capsys)
    assert "--pool-size" in _err(base + ["--defense", "qadtr", "--pool-size", "0"], capsys)
    assert "lambda_gir" in _err(base + ["--defense", "qadtr", "--defense-arg", "lambda_gir=-1"], capsys)
    assert "pool size" in _err(base + ["--defense", "qadtr", "--defense-arg", "pool_size=0"], capsys)
    assert "empty" in _err(base + ["--defense", "qadtr", "--bits", ""], capsys)
    cfg = TrainConfig(model="small_cnn")
    with pytest.raises(QNNError):
        make_defense("qadtr", {"pool_size": -3}, cfg, create_model("small_cnn"))
    with pytest.raises(QNNError, match="inner_steps"):
        make_defense("qadtr", {"inner_steps": -1}, cfg, create_model("small_cnn"))
    with pytest.raises(QNNError, match="aqapa_signal"):
        make_defense("qadtr", {"aqapa_signal": "magic"}, cfg, create_model("small_cnn"))
    with pytest.raises(QNNError, match="sizes"):
        make_defense("qadtr", {"sizes": "5,40"}, cfg, create_model("small_cnn"))
    with pytest.raises(QNNError, match="sizes"):
        make_defense("qadtr", {"sizes": "5,x"}, cfg, create_model("small_cnn"))
    # a misspelt option is refused, not ignored
    with pytest.raises(QNNError, match="unknown option.*pool_per_bits"):
        make_defense("qadtr", {"pool_per_bits": True}, cfg, create_model("small_cnn"))
    with pytest.raises(QNNError, match="unknown option.*inner_steps"):
        make_defense("pbat", {"inner_steps": 2}, cfg, create_model("small_cnn"))
    assert "unknown option" in _err(base + ["--defense", "qadtr", "--defense-arg", "adapt_tmp=0.2"], capsys)
    assert "KEY=VALUE" in _err(base + ["--defense", "qadtr", "--defense-arg", "adapt_temp"], capsys)
    assert "pool_assign" in _err(base + ["--defense", "qadtr", "--defense-arg", "pool_assign=magic"], capsys)


def _patched_step(args: dict, n: int):
    """One QADT-R loss at 4 bits on a small CNN, all images patched, no refinement or GIR: returns the images, the
    batch the model was fed, the defense (pool before the step: `before`) and the loss."""
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
    q.before = q.pool.clone()
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
    assert (vals[:, None] - q.pool.flatten()[None]).abs().min(1).values.max() < 1e-5


def test_qadtr_size_per_image_pastes_each_image_at_its_own_side():
    """size_per_image: with sizes 5 and 8 every patched image carries either a 5x5 or an 8x8 copy of a pool patch
    (both sides occur in one batch), and the pool still gets the gradient."""
    import torch

    x, fed, q, loss = _patched_step({"sizes": "5,8", "size_per_image": True}, 32)
    changed = ((fed - x).abs() > 1e-4).any(1).sum((1, 2))
    small, large = (changed <= 25) & (changed >= 16), (changed <= 64) & (changed >= 48)
    assert (small | large).all() and small.any() and large.any()
    loss.backward()
    q.after_step()
    assert not torch.equal(q.pool, q.before)


def test_qadtr_distill_adds_the_widest_bit_widths_soft_targets_below_it_only():
    """distill: a step below the widest trained bit-width adds a KL term towards that bit-width's predictions on the
    clean images (so its loss grows and the model is left at the step's bit-width); at the widest bit-width nothing
    changes; a negative weight or a non-positive temperature is refused."""
    import torch

    from qnn.layers import ensure_calibrated_, get_bit_width, set_bit_width_

    def loss_of(args, bits):
        torch.manual_seed(0)
        m = create_model("small_cnn")
        x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
        for b in (2, 8):
            set_bit_width_(m, b)
            ensure_calibrated_(m, x)
        set_bit_width_(m, bits)
        q = make_defense("qadtr", {"no_gir": True, "inner_steps": 0, **args}, TrainConfig(model="small_cnn", bits=[2, 8]), m)
        m.eval()  # batch-independent BN, so that the two runs see the same logits
        loss, _ = q.loss(m, x, y, bits, step=1)
        return float(loss), get_bit_width(m)[0]

    plain2, _ = loss_of({}, 2)
    kd2, left_at = loss_of({"distill": 1.0}, 2)
    assert kd2 > plain2 + 1e-4 and left_at == 2
    assert loss_of({}, 8)[0] == pytest.approx(loss_of({"distill": 1.0}, 8)[0])
    for bad in ({"distill": -0.1}, {"distill_temp": 0}):
        with pytest.raises(QNNError, match="distill"):
            make_defense("qadtr", bad, TrainConfig(model="small_cnn", bits=[2, 8]), create_model("small_cnn"))

"""Certified patch robustness by masking (`qnn.certify`, `qnn certify`, `--defense masking`): mask-set coverage, the
decision rules proved sound against every adversarial assignment on small cases, hand-built models that are and are
not certifiable, exact integer inputs, the attack cross-check, the CLI end to end and its refusals."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from qnn.certify import (
    attack_cross_check,
    certify,
    double_masking,
    fill_pixels,
    mask_set,
    masked_images_np,
    one_round_vote,
    pair_table,
    pair_unions,
    plurality,
    read_pairs,
)
from qnn.errors import QNNError
from tests.conftest import cli_error, run_cli


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here: these tests are tiny, and on a loaded 2-core machine two spinning threads make a
    0.2 s calibration take 30 s (measured)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _brute_cover(ms) -> np.ndarray:
    """(L, N) coverage from the pixels themselves, independent of MaskSet.cover's arithmetic."""
    (H, W), (ph, pw), m = ms.image_size, ms.patch_size, ms.masks()
    return np.array([[m[i, u:u + ph, v:v + pw].all() for i in range(len(m))]
                     for u in range(H - ph + 1) for v in range(W - pw + 1)])


# ---- mask sets ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,p,k", [(32, 6, 6), (32, 4, 3), (32, 16, 2), (8, 2, 2), (10, 3, 7), (24, 5, 20), (9, 1, 4)])
def test_patchcleanser_set_covers_every_patch_location(n, p, k):
    ms = mask_set("patchcleanser", (n, n), p, k)
    cover = ms.cover()
    assert (cover == _brute_cover(ms)).all()
    assert cover.sum(1).min() >= 1                      # every location inside some mask
    s = -(-(n - p + 1) // k)
    sides = {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in ms.rects}
    assert sides == {(p + s - 1, p + s - 1)}            # the paper's mask side, every mask inside the image
    assert len(ms) <= k * k and all(0 <= r[0] < r[1] <= n for r in ms.rects)


def test_patchcleanser_set_is_the_papers_for_cifar():
    ms = mask_set("patchcleanser", (32, 32), 6, 6)  # stride 5, side 10: starts 0, 5, ..., 20 and the flush 22
    assert sorted({r[0] for r in ms.rects}) == [0, 5, 10, 15, 20, 22] and len(ms) == 36


@pytest.mark.parametrize("n,p,k,c", [(32, 6, 6, 2), (32, 6, 8, 3), (32, 4, 5, 1), (16, 3, 5, 2), (12, 2, 11, 4)])
def test_certmask_set_covers_every_location_k_times(n, p, k, c):
    ms = mask_set("certmask", (n, n), p, k, c)
    cover = ms.cover()
    assert (cover == _brute_cover(ms)).all()
    assert cover.sum(1).min() >= c * c                  # c per axis, c^2 in 2-D
    assert len(ms) <= k * k


def test_mask_set_refuses_what_does_not_fit():
    pc = ("patchcleanser", (32, 32))
    for args, match in [(pc + (32, 6), "patch size 32"), (pc + (0, 6), "patch size"), (pc + (6, 1), "mask positions 1"),
                        (pc + (6, 28), "2..27"), (("certmask", (32, 32), 6, 3, 4), "axis coverage 4"),
                        (("magic", (32, 32), 6, 6), "unknown")]:
        with pytest.raises(QNNError, match=match):
            mask_set(*args)


# ---- decisions, proved on every adversarial assignment of small cases ---------------------------------------------

def test_double_masking_cases():
    N, C = 4, 3
    first = np.array([[1, 1, 1, 1], [2, 0, 2, 2], [2, 0, 2, 2]])
    t = np.stack([np.full((N, N), 1), np.full((N, N), 2), np.full((N, N), 2)])
    t[1, 1, :] = t[1, :, 1] = 0             # image 1: mask 1's second round is unanimous on 0 -> 0 (case II)
    t[2, 1, :] = t[2, :, 1] = 0
    t[2, 1, 3] = t[2, 3, 1] = 2             # image 2: its second round disagrees -> the plurality 2 (case III)
    pred, cert, fw = double_masking(first, t, C)
    assert pred.tolist() == [1, 0, 2] and cert.tolist() == [True, False, False]
    assert fw.tolist() == [4, 4 + 3, 4 + 3]   # one second round: the 3 pairs that contain mask 1
    assert plurality(np.array([[0, 1, 1, 0]]), 2).tolist() == [0]  # a tie goes to the smallest label
    with pytest.raises(ValueError, match="diagonal"):
        double_masking(first, t + 1, C)


def _attacked_tables(clean: np.ndarray, covered: np.ndarray, labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (first, table) a patch at a location whose covering masks are `covered` can produce from the clean
    table, stacked: masked images containing a covering mask are the clean ones, every other is the adversary's."""
    N = len(clean)
    free = [(i, j) for i in range(N) for j in range(i, N) if not (covered[i] or covered[j])]
    values = np.array(list(itertools.product(range(labels), repeat=len(free))), dtype=np.int64)
    values = values.reshape(labels ** len(free), len(free))
    t = np.repeat(clean[None], len(values), 0)
    for k, (i, j) in enumerate(free):
        t[:, i, j] = t[:, j, i] = values[:, k]
    return t[:, np.arange(N), np.arange(N)], t


def test_double_masking_certificate_holds_against_every_patch_assignment():
    ms = mask_set("patchcleanser", (8, 8), 2, 2)  # 4 masks
    for y in (0, 2):
        clean = np.full((len(ms), len(ms)), y)
        assert double_masking(np.diag(clean)[None], clean[None], 3)[1].all()
        for covered in {tuple(c) for c in ms.cover()}:
            first, t = _attacked_tables(clean, np.array(covered), 3)
            assert (double_masking(first, t, 3)[0] == y).all()


def test_one_round_vote_certificate_is_exact_against_every_assignment():
    rng = np.random.default_rng(0)
    n_cert = 0
    for _ in range(60):
        N, L, C = 6, 5, 3
        cover = rng.random((L, N)) < 0.75
        first = np.where(rng.random(N) < 0.8, rng.integers(0, C), rng.integers(0, C, N))[None]
        pred, cert = one_round_vote(first, cover, C)
        flips = False
        for row in cover:
            free = np.flatnonzero(~row)
            v = np.repeat(first, C ** len(free), 0)
            v[:, free] = np.array(list(itertools.product(range(C), repeat=len(free)))).reshape(len(v), len(free))
            flips |= bool((plurality(v, C) != pred[0]).any())
        assert cert[0] == (not flips)  # certified exactly when no assignment of the uncovered masks flips the vote
        n_cert += int(cert[0])
    assert 0 < n_cert < 60


def test_one_round_vote_cannot_certify_on_rectangles_without_whole_image_masks():
    # two opposite-corner patch locations share only whole-image masks: even unanimous predictions are not certified
    for n, p, k, c in [(32, 6, 6, 2), (32, 6, 6, 3), (16, 3, 8, 3)]:
        ms = mask_set("certmask", (n, n), p, k, c)
        assert not any(r == (0, n, 0, n) for r in ms.rects)
        assert not one_round_vote(np.zeros((1, len(ms)), dtype=np.int64), ms.cover(), 2)[1][0]
    ms = mask_set("certmask", (8, 8), 2, 2, 2)       # masks larger than the image: all whole-image
    assert one_round_vote(np.zeros((1, len(ms)), dtype=np.int64), ms.cover(), 2)[1][0]


# ---- hand-built models --------------------------------------------------------------------------------------------

class _Toy(nn.Module):
    mean, num_classes, in_size = (0.485, 0.456, 0.406), 2, 8


class Constant(_Toy):
    """Ignores its input: class 1 always. Certifiably robust by construction."""

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), torch.ones(len(x))], 1)


class OnePixel(_Toy):
    """Class 1 when pixel (0, 0) of the red channel is above 0.9: a patch (or a mask) there decides the label."""

    def forward(self, x):
        z = x[:, 0, 0, 0] - 0.9
        return torch.stack([torch.zeros_like(z), z], 1)


class Brightest(_Toy):
    """Class 1 when any pixel is above 0.9: any patch fools it, while masks on a dim image never see one."""

    def forward(self, x):
        z = 50 * (x.flatten(1).amax(1) - 0.9)
        return torch.stack([torch.zeros_like(z), z], 1)


@pytest.mark.parametrize("method", ["patchcleanser", "certmask"])
def test_a_model_that_ignores_its_input_is_certified(method):
    ms = mask_set(method, (8, 8), 2, 2, 2)  # certmask: masks larger than the image (see the test above)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([1, 1, 1, 0, 0, 1])
    cert = certify(Constant(), x, ms)
    assert cert.certified.all() and (cert.pred == 1).all()
    assert cert.summary(y.numpy())["certified_acc_pct"] == pytest.approx(100 * 4 / 6)  # certified and correct


@pytest.mark.parametrize("method", ["patchcleanser", "certmask"])
def test_a_model_a_patch_can_flip_is_not_certified(method):
    ms = mask_set(method, (8, 8), 2, 2, 1)
    x = torch.full((1, 3, 8, 8), 0.3)
    x[:, 0, 0, 0] = 1.0                    # clean: class 1; a mask over pixel (0, 0) pastes 0.485: class 0
    m = OnePixel()
    cert = certify(m, x, ms)
    assert not cert.certified.any()
    patched = x.clone()
    patched[:, :, :2, :2] = 0.0            # a 2x2 patch on the deciding pixel
    assert certify(m, patched, ms).pred[0] == 0   # ... makes the defended prediction wrong: refusing was right


def test_certified_images_survive_the_patch_attack():
    ms = mask_set("patchcleanser", (8, 8), 2, 2)
    x, y = torch.full((5, 3, 8, 8), 0.3) + 0.05 * torch.rand(5, 3, 8, 8), torch.zeros(5, dtype=torch.long)
    r = attack_cross_check(Brightest(), x, y, ms, bits=32, iterations=3, step=0.5)
    assert r["n_certified"] == 5 and r["n_undefended_fooled"] == 5 and r["violations"] == 0


# ---- the integer model --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """small_cnn with its 2- and 8-bit scales initialised on one batch (untrained: fast, and enough for the logic)."""
    from qnn.checkpoint import save_checkpoint
    from qnn.models import create_model
    from qnn.train import init_scales_

    torch.manual_seed(0)
    model = create_model("small_cnn")
    init_scales_(model, [2, 8], torch.rand(32, 3, 32, 32))
    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    save_checkpoint(path, model, {"trained_bits": [2, 8], "defense": "none"})
    return path


def test_masked_images_are_exact_integer_inputs(tiny_ckpt):
    from qnn.checkpoint import load_checkpoint
    from qnn.layers import set_bit_width_

    model, _ = load_checkpoint(tiny_ckpt)
    set_bit_width_(model, 8)
    q = next(m for m in model.modules() if getattr(m, "kind", None) == "input")
    s, zp = float(q.scale(8)), q.zp
    assert zp == int(zp)
    fill = fill_pixels(model)
    assert torch.equal(fill.view(1, 3, 1, 1), model._mean)
    ms = mask_set("patchcleanser", (32, 32), 6, 6)
    _, _, unions = pair_unions(ms.masks())
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32)).astype(np.float32) / 255
    xm = torch.from_numpy(masked_images_np(x, unions[:50], fill.numpy())).flatten(0, 1)
    v = (xm - model._mean) / model._std                 # what the model (and the ONNX graph's input) sees
    hidden = torch.from_numpy(unions[:50]).repeat(2, 1, 1)[:, None].expand_as(v)
    assert (v[hidden] == 0).all()                        # exactly 0.0: no rounding before the quantizer
    ints = torch.clamp(torch.round(v / s) + zp, 0, 255)
    assert (ints[hidden] == zp).all() and ((ints[hidden] - zp) * s == v[hidden]).all()
    shown = torch.from_numpy(x)[:, None].expand(2, 50, 3, 32, 32).flatten(0, 1)
    assert torch.equal(xm[~hidden], shown[~hidden])     # the rest of the image untouched


def test_two_mask_table_reuses_each_pair_once():
    first = np.array([[0, 1, 2]])
    t = pair_table(first, np.array([[5, 6, 7]]))          # pairs (0,1), (0,2), (1,2)
    assert (t == t.transpose(0, 2, 1)).all() and t[0, 0, 1] == 5 and t[0, 2, 1] == 7 and (np.diag(t[0]) == first).all()


def test_pairs_left_out_never_change_a_decision():
    """Double masking on the pairs `read_pairs` evaluates decides exactly as on the whole table, on random tables
    rich in disagreement and in unanimous first rounds, with each pair evaluated at most once and every inference
    reading no more than it did."""
    rng = np.random.default_rng(0)
    N, C, B = 6, 3, 4000
    first = rng.integers(0, C, (B, N))
    first[: B // 4] = first[: B // 4, :1]                              # a quarter unanimous
    pairs = rng.integers(0, C, (B, N * (N - 1) // 2))
    pairs[: B // 8] = first[: B // 8, :1]                              # some of them certified
    pairs[B // 8: B // 4: 2] = first[B // 8: B // 4: 2, :1]
    pairs[B // 8: B // 4: 2, -1] = (first[B // 8: B // 4: 2, 0] + 1) % C   # ... all but their last pair
    column = np.full((N, N), -1)
    column[np.triu_indices(N, 1)] = np.arange(pairs.shape[1])
    asked = []

    def evaluate(img, i, j):
        assert (i < j).all()
        asked.extend(zip(img.tolist(), column[i, j].tolist()))
        return pairs[img, column[i, j]]

    got = read_pairs(first, C, evaluate, chunk=4)
    assert len(asked) == len(set(asked)) and ((got >= 0) == (got == pairs)).all()
    full = double_masking(first, pair_table(first, pairs), C)
    pruned = double_masking(first, pair_table(first, got), C)
    for a, b in zip(full[:2], pruned[:2]):
        assert np.array_equal(a, b)
    assert np.array_equal(full[2], pruned[2]) and full[1].sum() >= B // 8
    alone = read_pairs(first, C, lambda img, i, j: pairs[img, column[i, j]], chunk=4, certificates=False)
    inferred = double_masking(first, pair_table(first, alone), C)
    assert np.array_equal(inferred[0], full[0]) and np.array_equal(inferred[2], full[2]) and not inferred[1].any()
    read = N + (got >= 0).sum(1)
    assert (read[~full[1]] < N + pairs.shape[1]).mean() > 0.5 and (read[full[1]] == N + pairs.shape[1]).all()


def test_masking_defense_pastes_two_masks_of_the_set():
    from qnn.config import TrainConfig
    from qnn.defenses import make_defense
    from qnn.models import create_model

    seen = {}

    class Spy(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.zeros(len(x), 10, requires_grad=True)

    d = make_defense("masking", {"mask_patch_size": 6, "mask_positions": 3, "frac_masked": 0.5},
                     TrainConfig(model="small_cnn", bits=[2, 8], seed=1), create_model("small_cnn"))
    x = torch.rand(8, 3, 32, 32)
    d.loss(Spy(), x, torch.zeros(8, dtype=torch.long), 8, step=0)
    xm, fill, masks = seen["x"], d.fill[0, :, 0, 0], torch.from_numpy(d.ms.masks())
    assert torch.equal(xm[4:], x[4:])                    # the clean half
    for i in range(4):
        hidden = (xm[i] == fill[:, None, None]).all(0) & (xm[i] != x[i]).any(0)
        assert any(torch.equal(hidden, masks[a] | masks[b]) for a in range(len(masks)) for b in range(len(masks)))
    with pytest.raises(QNNError, match="patch size 40"):
        make_defense("masking", {"mask_patch_size": 40}, TrainConfig(model="small_cnn"), create_model("small_cnn"))
    with pytest.raises(QNNError, match="mask_positions"):
        make_defense("masking", {"mask_positions": 1}, TrainConfig(model="small_cnn"), create_model("small_cnn"))


def test_masking_defense_trains(tmp_path):
    from qnn.config import TrainConfig
    from qnn.train import train

    r = train(TrainConfig(model="small_cnn", bits=[2, 8], epochs=1, n_synthetic=128, batch_size=64, progress=False,
                          test_subset=64, out_dir=str(tmp_path / "m"), defense="masking",
                          defense_args={"mask_patch_size": 8, "mask_positions": 3}))
    assert r["final"]["train_loss"] > 0 and set(r["final"]["test_acc"]) == {"2", "8"}


# ---- the command line ---------------------------------------------------------------------------------------------

def test_certify_cli_end_to_end(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "cert"
    args = ["certify", "--checkpoint", tiny_ckpt, "--bits", "8,2", "--patch-size", "16,12", "--mask-positions", 2,
            "--n", 4, "--cross-check-iters", 1, "--out", out]
    assert run_cli(args) == 0
    res = json.loads((out / "certify.json").read_text())
    assert set(res["results"]) == {"8", "2"} and set(res["results"]["8"]) == {"12", "16"}
    r = res["results"]["2"]["12"]
    assert r["n_masks"] == 4 and r["forwards_per_image_certify_worst"] == 4 + 6 and len(r["certified"]) == 4
    assert 4 <= r["forwards_per_image_certify"] <= 4 + 6
    assert 0 <= r["certified_acc_pct"] <= r["clean_acc_pct"]
    assert res["seed"] == 0 and res["versions"]["torch"] and res["config"]["checkpoint_sha256"]
    assert res["mask_sets"]["12"]["min_coverage"] >= 1 and res["cross_check"]["8"]["16"]["violations"] == 0
    assert (out / "certify.md").read_text().startswith("# Certified") and (out / "certify.png").stat().st_size > 0
    # the certificate matches the library's on the same images
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset

    x, _ = load_dataset("synthetic", "test").subset(4).tensors()
    cert = certify(load_checkpoint(tiny_ckpt)[0], x, mask_set("patchcleanser", (32, 32), 12, 2), 2)
    assert r["certified"] == "".join("1" if c else "0" for c in cert.certified)
    assert r["predictions"] == cert.pred.tolist()
    capsys.readouterr()
    assert "holds an earlier" in cli_error(args, capsys)
    assert run_cli(args[:-2] + ["--method", "certmask", "--out", out, "--overwrite"]) == 0
    assert json.loads((out / "certify.json").read_text())["config"]["method"] == "certmask"


def test_certify_cli_refuses_bad_inputs_in_one_line(tiny_ckpt, tmp_path, capsys):
    base = ["certify", "--checkpoint", tiny_ckpt, "--n", 4, "--out", tmp_path / "o"]
    for extra, match in [(["--patch-size", "40"], "patch size 40"), (["--patch-size", "6,x"], "--patch-size"),
                         (["--patch-size", "0"], "--patch-size"), (["--mask-positions", "1"], "--mask-positions"),
                         (["--mask-positions", "28"], "2..27"), (["--bits", "4"], "not trained at [4]"),
                         (["--bits", "9"], "not allowed"), (["--method", "magic"], "unknown --method"),
                         (["--n", "0"], "--n"), (["--n", "5000"], "at most 1000"),
                         (["--method", "certmask", "--axis-coverage", "7"], "axis coverage 7")]:
        assert match in cli_error(base + extra, capsys), extra
    assert "not found" in cli_error(["certify", "--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "p"], capsys)
    assert not (tmp_path / "o").exists()

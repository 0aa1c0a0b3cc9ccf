"""Certified inference on the edge (issue #37): `qnn bundle --certify-patch-size` carries the mask set and PyTorch's
certificates per image and CPU family; `run_edge.py --certify` recomputes them with ONNX Runtime and must agree image
by image (exit 1 otherwise), and refuses a hostile mask set in one line (exit 2)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bench.test_run_edge import _resign
from tests.conftest import ROOT, cli_error, run_cli

torch.set_num_threads(1)  # tiny tests on a loaded 2-core machine: one thread is much faster

RUN_EDGE = ROOT / "export" / "run_edge.py"
N_IMAGES = 8


def _bundle(ckpt, d, *extra) -> Path:
    assert run_cli(["bundle", "--checkpoint", ckpt, "--bits", 4, "--n", N_IMAGES, "--out", d, *extra]) == 0
    return d


@pytest.fixture(scope="module")
def bundles(trained_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("cert")
    return {"patchcleanser": _bundle(trained_ckpt, root / "pc", "--certify-patch-size", 6, "--mask-positions", 2),
            "certmask": _bundle(trained_ckpt, root / "cm", "--certify-patch-size", 6, "--mask-positions", 3,
                                "--method", "certmask", "--axis-coverage", 2)}


def _run(args):
    return subprocess.run([sys.executable, str(RUN_EDGE), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_run_edge_decisions_are_qnn_certifys():
    """run_edge.py cannot import qnn: its copies of the decisions and of the cover must stay the library's."""
    from qnn import certify as C
    from qnn.export import run_edge as E

    rng = np.random.default_rng(0)
    for n_masks, n_cls in ((4, 3), (9, 2), (1, 4)):
        first = rng.integers(0, n_cls, (40, n_masks))
        first[:10] = first[:10, :1]  # some unanimous images
        pairs = rng.integers(0, n_cls, (40, n_masks * (n_masks - 1) // 2))
        pairs[:20] = first[:20, :1]  # some certifiable ones
        table = C.pair_table(first, pairs)
        assert (E.pair_table(first, pairs) == table).all()
        assert (E.plurality(first, n_cls) == C.plurality(first, n_cls)).all()
        look = lambda img, i, j: (img * 7 + i * 3 + j) % n_cls  # noqa: E731  (any labels: the reads must agree)
        assert (E.read_pairs(first, n_cls, look, 3) == C.read_pairs(first, n_cls, look, 3)).all()
        for got, want in zip(E.double_masking(first, table, n_cls), C.double_masking(first, table, n_cls)):
            assert (got == want).all()
    for method, k, c in (("patchcleanser", 3, 1), ("certmask", 3, 2)):
        ms = C.mask_set(method, (12, 12), 3, k, c)
        cover = E.mask_cover(np.asarray(ms.rects), ms.image_size, ms.patch_size)
        assert (cover == ms.cover()).all()
        first = rng.integers(0, 3, (16, len(ms)))
        first[:8] = 1
        for got, want in zip(E.one_round_vote(first, cover, 3), C.one_round_vote(first, ms.cover(), 3)):
            assert (got == want).all()


@pytest.mark.parametrize("method", ["patchcleanser", "certmask"])
def test_certified_inference_on_the_edge_equals_pytorchs(bundles, trained_ckpt, tmp_path, method):
    from qnn.certify import certify, mask_set
    from qnn.checkpoint import load_checkpoint
    from qnn.data import to_tensor

    b = bundles[method]
    r = _run(["--bundle", b, "--threads", "1", "--iters", "2", "--warmup", "1", "--certify",
              "--certify-latency-images", 3, "--json", tmp_path / "r.json"])
    assert r.returncode == 0, r.stdout + r.stderr
    c = json.loads((tmp_path / "r.json").read_text())["certify"]
    assert c["pass"] and c["n_differ"] == 0 and c["method"] == method and c["n_images"] == N_IMAGES
    assert c["latency"]["images"] == 3 and c["latency"]["p50_ms"] > 0 and c["inference_agrees"] == 3
    assert f"certificates: {N_IMAGES}/{N_IMAGES} images equal" in r.stdout and "ms p50 per image" in r.stdout
    # the device's per-image certificates are PyTorch's, recomputed here independently of the bundle's copy
    m, _ = load_checkpoint(trained_ckpt)
    x = to_tensor(np.load(b / "eval.npz")["x"])
    spec = json.loads((b / "masks.json").read_text())
    ms = mask_set(method, (32, 32), 6, spec["positions"][0], spec["axis_coverage"])
    assert [list(r) for r in ms.rects] == spec["rects"]
    want = certify(m, x, ms, 4)
    assert c["predictions"] == want.pred.tolist()
    assert c["certified"] == "".join("1" if v else "0" for v in want.certified)
    assert c["forwards_per_image_certify"] == float(want.certify_forwards.mean())
    assert c["forwards_per_image_certify_worst"] == want.worst_forwards
    man = json.loads((b / "manifest.json").read_text())
    assert man["certify"] == {"masks": "masks.json", "expected": "expected_certify.npz"}
    assert {"masks.json", "expected_certify.npz"} <= set(man["files"])


def test_one_flipped_certificate_fails(bundles, tmp_path):
    from qnn.kernels.reference import host_cpu_family

    t = tmp_path / "flipped"
    shutil.copytree(bundles["patchcleanser"], t)
    z = dict(np.load(t / "expected_certify.npz"))
    k = f"{host_cpu_family()}.certified"
    z[k][3] = ~z[k][3]
    np.savez_compressed(t / "expected_certify.npz", **z)
    _resign(t, "expected_certify.npz")
    r = _run(["--bundle", t, "--threads", "1", "--skip-latency", "--certify"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"certificates: {N_IMAGES - 1}/{N_IMAGES} images equal" in r.stdout
    assert "1 image(s) differ: [3]" in r.stdout and "FAIL" in r.stdout


def _edit_masks(d, edit):
    spec = json.loads((d / "masks.json").read_text())
    out = edit(spec)
    (d / "masks.json").write_text(out if isinstance(out, str) else json.dumps(spec))


def _set(**kv):
    return lambda s: s.update(kv)


def _rect(i, v):
    return lambda s: s["rects"][0].__setitem__(i, v)


HOSTILE = [
    ("rect outside", _rect(1, 40), "inside the 32x32"),
    ("negative rect", _rect(0, -1), "inside the 32x32"),
    ("empty rect", _rect(1, 0), "non-empty"),
    ("float rect", _rect(1, 19.0), "4 integers"),
    ("bool rect", _rect(0, False), "4 integers"),
    ("rect a string", lambda s: s["rects"].__setitem__(0, "0,19,0,19"), "4 integers"),
    ("rects not a list", _set(rects={"a": 1}), "rects must be a list"),
    ("too many masks", lambda s: s.update(rects=s["rects"] * 400, n_masks=1600), "1 to 1024"),
    ("huge n_masks", _set(n_masks=10 ** 40), "an integer of 41 digits"),
    ("n_masks wrong", _set(n_masks=5), "n_masks"),
    ("no rects", lambda s: s.update(rects=[], n_masks=0), "1 to 1024"),
    ("uncovered", lambda s: s.update(rects=s["rects"][:1], n_masks=1), "no mask holds"),
    ("min_coverage lies", _set(min_coverage=3), "min_coverage"),
    ("method", _set(method="cert-all"), "method must be"),
    ("patch size a string", _set(patch_size=["6", 6]), "patch_size"),
    ("patch size too big", _set(patch_size=[32, 6]), "patch_size"),
    ("image size", _set(image_size=[16, 16]), "not the bundle's"),
    ("coverage for patchcleanser", _set(axis_coverage=2), "axis_coverage"),
    ("format", _set(format="v0"), "not a mask set"),
    ("not an object", lambda s: "[1, 2]", "not a mask set"),
    ("deep nesting", lambda s: "[" * 100000 + "]" * 100000, "unreadable JSON"),
    ("not json", lambda s: "{", "unreadable JSON"),
]


@pytest.mark.parametrize("name,edit,msg", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_mask_sets_are_refused_in_one_line(bundles, tmp_path, capsys, name, edit, msg):
    from qnn.export.run_edge import main

    d = tmp_path / "h"
    shutil.copytree(bundles["patchcleanser"], d)
    _edit_masks(d, edit)
    _resign(d, "masks.json")
    capsys.readouterr()
    rc = main(["--bundle", str(d), "--threads", "1", "--skip-latency", "--certify"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("run_edge: error:") and "\n" not in err and msg in err, err


def test_bad_expected_certificates_and_a_bundle_without_masks_are_refused(bundles, tmp_path, capsys):
    from qnn.export.run_edge import main
    from qnn.kernels.reference import host_cpu_family

    def refused(d, msg):
        capsys.readouterr()
        rc = main(["--bundle", str(d), "--threads", "1", "--skip-latency", "--certify"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("run_edge: error:") and "\n" not in err and msg in err, err

    src = bundles["patchcleanser"]
    fam = host_cpu_family()
    for key, value, msg in ((f"{fam}.pred", np.full(N_IMAGES, 99), f"'{fam}.pred'"),
                            (f"{fam}.certified", np.zeros(N_IMAGES, np.int64), f"'{fam}.certified'"),
                            (f"{fam}.inference_forwards", np.zeros(N_IMAGES, np.int64), "inference_forwards")):
        d = tmp_path / key
        shutil.copytree(src, d)
        z = dict(np.load(d / "expected_certify.npz"))
        z[key] = value
        np.savez_compressed(d / "expected_certify.npz", **z)
        _resign(d, "expected_certify.npz")
        refused(d, msg)
    plain = tmp_path / "plain"
    shutil.copytree(src, plain)
    man = json.loads((plain / "manifest.json").read_text())
    del man["certify"]
    (plain / "manifest.json").write_text(json.dumps(man))
    refused(plain, "carries no mask set")
    unlisted = tmp_path / "unlisted"
    shutil.copytree(src, unlisted)
    man = json.loads((unlisted / "manifest.json").read_text())
    man["certify"]["masks"] = "other.json"
    (unlisted / "manifest.json").write_text(json.dumps(man))
    refused(unlisted, "not listed")


def test_bundle_refuses_mask_options_that_do_not_fit(trained_ckpt, tmp_path, capsys):
    base = ["bundle", "--checkpoint", trained_ckpt, "--bits", 4, "--n", 4]
    assert "give --certify-patch-size too" in cli_error([*base, "--out", tmp_path / "a", "--mask-positions", 3], capsys)
    assert "certmask only" in cli_error([*base, "--out", tmp_path / "b", "--certify-patch-size", 6,
                                         "--axis-coverage", 2], capsys)
    assert "unknown --method" in cli_error([*base, "--out", tmp_path / "c", "--certify-patch-size", 6,
                                            "--method", "all"], capsys)
    assert "patch size 32" in cli_error([*base, "--out", tmp_path / "d", "--certify-patch-size", 32], capsys)
    assert not any((tmp_path / n).exists() for n in "abcd")

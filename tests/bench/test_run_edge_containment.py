"""The edge runner reads only what its manifest names and hashes, inside the bundle; everything else is refused.

Each hostile bundle is built from a good one, its manifest re-signed so that only the containment rule can catch it.
A file outside the bundle ("outside/secret") carries its correct sha256 in the hostile manifests; the runner must
never open it (every `open` / `os.open` is recorded while the runner runs in this process).
"""

import builtins
import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

RUN_EDGE = ROOT / "export" / "run_edge.py"


def _load_run_edge():
    spec = importlib.util.spec_from_file_location("run_edge_under_test", RUN_EDGE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def tree_hashes(d) -> dict:
    return {str(p.relative_to(d)): _sha(p) for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def good(trained_ckpt, tmp_path_factory):
    from qnn.export.bundle import build_bundle
    from qnn.attacks.patch import PatchConfig
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset

    m, _ = load_checkpoint(trained_ckpt)
    ds = load_dataset("synthetic", "test", n_synthetic=2000).subset(32)
    d = tmp_path_factory.mktemp("good") / "b"
    patch = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    return build_bundle(m, 4, d, ds.x, ds.y, [("p6", patch, PatchConfig())])


@pytest.fixture()
def sandbox(tmp_path):
    """An outside folder with a secret file, and a helper that copies the good bundle and edits its manifest."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.onnx"
    secret.write_bytes(b"secret bytes that must never be read")
    return tmp_path, secret


def _variant(good, root, name, edit):
    d = root / name
    shutil.copytree(good, d, symlinks=True)
    man = json.loads((d / "manifest.json").read_text())
    man = edit(d, man)
    (d / "manifest.json").write_text(json.dumps(man))
    return d


def _run_recording_opens(monkeypatch, argv):
    """Run the edge runner in this process; return (exit code, stderr-free list of every path it opened)."""
    mod = _load_run_edge()
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        opened.append(os.path.realpath(os.fsdecode(path)))
        return real_os_open(path, *a, **k)

    real_session = mod.ort.InferenceSession

    def spy_session(model, *a, **k):  # onnxruntime reads paths in C++, out of the spies' sight: it gets bytes only
        assert isinstance(model, bytes), f"InferenceSession given {type(model).__name__}, not verified bytes"
        return real_session(model, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(mod.ort, "InferenceSession", spy_session)
    try:
        rc = mod.main([str(a) for a in argv])
    finally:
        monkeypatch.undo()
    return rc, opened


def test_every_hostile_manifest_is_refused_and_nothing_outside_is_opened(good, sandbox, monkeypatch, capsys):
    root, secret = sandbox
    h = _sha(secret)

    def add(name):
        def edit(d, man):
            man["files"][name] = h
            man["model"] = name
            return man
        return edit

    def symlink_out(d, man):
        os.symlink(secret, d / "model_link.onnx")
        man["files"]["model_link.onnx"] = h
        man["model"] = "model_link.onnx"
        return man

    def drop(key):
        def edit(d, man):
            del man[key]
            return man
        return edit

    def unlisted(d, man):
        shutil.copy(d / "model.onnx", d / "other.onnx")
        man["model"] = "other.onnx"  # present in the folder, not listed or hashed
        return man

    def unlisted_patch(d, man):
        del man["files"]["patch_p6.npz"]
        return man

    def as_list(d, man):
        return [man]

    cases = {
        "traversal": (add("../outside/secret.onnx"), "not a plain file name"),
        "deep traversal": (add("../../../../../../" + str(secret).lstrip("/")), "not a plain file name"),
        "absolute": (add(str(secret)), "not a plain file name"),
        "symlink out": (symlink_out, "link or leads outside"),
        "no files": (drop("files"), "no 'files'"),
        "empty files": (lambda d, man: {**man, "files": {}}, "no 'files'"),
        "unlisted model": (unlisted, "'model' must name a file listed"),
        "no model key": (drop("model"), "'model' must name a file listed"),
        "unlisted patch": (unlisted_patch, "not listed"),
        "manifest is a list": (as_list, "must be a JSON object"),
        "bad hash": (lambda d, man: {**man, "files": {**man["files"], "model.onnx": "0" * 10}}, "no valid sha256"),
        "unknown format": (lambda d, man: {**man, "format": "qnn-edge-bundle-v9"}, "not one this runner reads"),
    }
    for name, (edit, msg) in cases.items():
        d = _variant(good, root, name.replace(" ", "_"), edit)
        before = tree_hashes(d)
        capsys.readouterr()
        rc, opened = _run_recording_opens(monkeypatch, ["--bundle", d, "--skip-latency", "--threads", "1"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("run_edge: error:") and "\n" not in err and msg in err, (name, err)
        assert str(secret) not in opened and not any(p.startswith(str(secret.parent)) for p in opened), (name, opened)
        assert tree_hashes(d) == before, name

    # the package's own checker applies the same rule
    from qnn.export.bundle import check_manifest
    from qnn.errors import QNNError

    for name in ("traversal", "absolute", "symlink_out", "empty_files", "unlisted_model"):
        with pytest.raises(QNNError):
            check_manifest(root / name)


def test_good_bundle_opens_only_its_own_files(good, tmp_path, monkeypatch, capsys):
    rc, opened = _run_recording_opens(monkeypatch, ["--bundle", good, "--skip-latency", "--threads", "1"])
    assert rc == 0, capsys.readouterr()
    inside = [p for p in opened if p.startswith(str(good.resolve()))]
    assert inside, "the runner read no bundle file through open()"
    names = json.loads((good / "manifest.json").read_text())["files"]
    assert {os.path.basename(p) for p in inside} <= set(names) | {"manifest.json"}


def _resign(d, name):
    man = json.loads((d / "manifest.json").read_text())
    man["files"][name] = _sha(d / name)
    (d / "manifest.json").write_text(json.dumps(man))


def test_hostile_contents_and_options_are_one_line_errors(good, tmp_path, capsys):
    mod = _load_run_edge()

    def bad(argv, msg):
        capsys.readouterr()
        rc = mod.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("run_edge: error:") and "\n" not in err and msg in err, (argv, err)

    # a NaN patch (re-signed) is refused, not scored as 100% ASR
    d = tmp_path / "nanpatch"
    shutil.copytree(good, d)
    z = dict(np.load(d / "patch_p6.npz"))
    z["patch"][0, 0, 0] = np.nan
    np.savez_compressed(d / "patch_p6.npz", **z)
    _resign(d, "patch_p6.npz")
    bad(["--bundle", d, "--skip-latency"], "finite")
    # patch locations outside the image
    d = tmp_path / "loc"
    shutil.copytree(good, d)
    z = dict(np.load(d / "patch_p6.npz"))
    z["loc"][0] = [40, 0]
    np.savez_compressed(d / "patch_p6.npz", **z)
    _resign(d, "patch_p6.npz")
    bad(["--bundle", d, "--skip-latency"], "outside")
    # a model whose output does not have the bundle's class count
    d = tmp_path / "classes"
    shutil.copytree(good, d)
    exp = json.loads((d / "expected.json").read_text())
    exp["num_classes"] = 12
    (d / "expected.json").write_text(json.dumps(exp))
    _resign(d, "expected.json")
    bad(["--bundle", d, "--skip-latency"], "output shape")
    # malformed expected figures and patch arrays (re-signed)
    for name, change, msg in (("nobits", lambda e: e.pop("bits"), "'bits'"),
                              ("tclass", lambda e: e["patches"]["p6"].update(targeted=True, target_class=[1]),
                               "target_class"),
                              ("targeted", lambda e: e["patches"]["p6"].update(targeted="yes"), "targeted")):
        d = tmp_path / name
        shutil.copytree(good, d)
        exp = json.loads((d / "expected.json").read_text())
        change(exp)
        (d / "expected.json").write_text(json.dumps(exp))
        _resign(d, "expected.json")
        bad(["--bundle", d, "--skip-latency"], msg)
    for name, arrays, msg in (("zero", dict(patch=np.zeros((3, 0, 0), np.float32)), "shapes"),
                              ("strings", dict(patch=np.array([["a"]])), "numeric")):
        d = tmp_path / name
        shutil.copytree(good, d)
        z = {**dict(np.load(d / "patch_p6.npz")), **arrays}
        np.savez_compressed(d / "patch_p6.npz", **z)
        _resign(d, "patch_p6.npz")
        bad(["--bundle", d, "--skip-latency"], msg)
    d = tmp_path / "x0d"
    shutil.copytree(good, d)
    np.savez_compressed(d / "eval.npz", x=np.array(3, np.uint8), y=np.zeros(1, np.int64))
    _resign(d, "eval.npz")
    bad(["--bundle", d, "--skip-latency"], "uint8 images")
    # options: checked before the run, and an output never replaces a bundle file
    before = tree_hashes(good)
    bad(["--bundle", good, "--tolerance", "nan"], "tolerance")
    bad(["--bundle", good, "--tolerance", "-1"], "tolerance")
    bad(["--bundle", good, "--json", tmp_path / "missing" / "r.json"], "does not exist")
    bad(["--bundle", good, "--json", tmp_path], "is a folder")
    bad(["--bundle", good, "--json", good / "model.onnx"], "would replace a file of the bundle")
    bad(["--bundle", good, "--save-logits", good / "eval.npz"], "would replace a file of the bundle")
    bad(["--bundle", good, "--iters", "0"], "--iters")
    bad(["--bundle", good, "--batch", "x"], "--batch")
    assert tree_hashes(good) == before

"""Hostile but fair use: bad numbers, bad data, bad files and faults give one line and exit 2, and earlier results
are byte-for-byte unchanged (sha256 of every file before and after)."""

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch

from qnn.config import TrainConfig
from qnn.errors import QNNError
from qnn.train import train
from tests.conftest import cli_error, run_cli

TINY = dict(model="small_cnn", n_synthetic=256, batch_size=64, progress=False, lr=0.05)


def tree_hashes(d) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished training run, copied afresh for each test that attacks it."""
    d = tmp_path_factory.mktemp("earlier") / "run"
    train(TrainConfig(bits=[4], epochs=1, out_dir=str(d), **TINY))
    return d


@pytest.fixture()
def run_copy(earlier_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(earlier_run, d)
    return d, tree_hashes(d)


def _cifar_dir(tmp_path, name, x, y):
    d = tmp_path / name
    d.mkdir()
    for split in ("train", "test"):
        np.savez(d / f"{split}.npz", x=x, y=y)
    return d


# --------------------------------------------------------------------------- class 2: non-finite numbers


def test_non_finite_numbers_are_refused(tmp_path, capsys, trained_ckpt):
    t = ["train", "--model", "small_cnn", "--no-progress", "--out", tmp_path / "t"]
    for flag, v in (("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"), ("--weight-decay", "nan"),
                    ("--distill-temp", "inf"), ("--lambda-gir", "nan")):
        assert flag in cli_error(t + [flag, v], capsys)
    assert "finite" in cli_error(t + ["--defense", "qadtr", "--defense-arg", "lambda_gir=.nan"], capsys)
    assert "finite" in cli_error(t + ["--defense", "pbat", "--defense-arg", "patch_step=.inf"], capsys)
    for key, v in (("momentum", ".nan"), ("lr", ".inf"), ("weight_decay", "-.inf"), ("warmup_epochs", ".nan")):
        (tmp_path / "c.yaml").write_text(f"{key}: {v}\n")
        assert key in cli_error(t + ["-c", tmp_path / "c.yaml"], capsys)
    a = ["attack", "--checkpoint", trained_ckpt, "--out", tmp_path / "a"]
    for flag in ("--step", "--eps", "--scale-max", "--rotation-max", "--patch-frac"):
        assert flag in cli_error(a + [flag, "nan"], capsys)
    assert not (tmp_path / "t").exists() and not (tmp_path / "a").exists()
    with pytest.raises(QNNError, match="finite"):
        TrainConfig(lr=math.nan)


def test_nan_model_patch_and_census_are_not_accepted(tmp_path, capsys, trained_ckpt, monkeypatch):
    from qnn.attacks.patch import PatchConfig

    obj = torch.load(trained_ckpt, weights_only=True)
    k = next(k for k, v in obj["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    obj["state_dict"][k] = obj["state_dict"][k].clone()
    obj["state_dict"][k].view(-1)[0] = float("nan")
    torch.save(obj, tmp_path / "nan.pt")
    for args in (["export", "--checkpoint", tmp_path / "nan.pt", "--bits", "4", "--out", tmp_path / "m.onnx"],
                 ["eval", "--checkpoint", tmp_path / "nan.pt"]):
        assert "non-finite" in cli_error(args, capsys)
    assert not (tmp_path / "m.onnx").exists()
    # a NaN patch is refused by `qnn bundle` (not scored as 100% ASR); no bundle folder appears
    patch = np.random.default_rng(0).random((3, 6, 6)).astype(np.float32)
    patch[1, 2, 3] = np.nan
    np.savez(tmp_path / "nan_patch.npz", patch=patch, config=json.dumps(PatchConfig().to_dict()))
    b = ["bundle", "--checkpoint", trained_ckpt, "--bits", "4", "--n", "16", "--out", tmp_path / "b"]
    assert "finite" in cli_error(b + ["--patch", tmp_path / "nan_patch.npz"], capsys)
    assert not (tmp_path / "b").exists()
    # training that diverges stops with one line and writes no model
    import qnn.train as T

    real = T.train_step

    def diverging(*a, **kw):
        loss, logits = real(*a, **kw)
        return loss * float("nan"), logits

    monkeypatch.setattr(T, "train_step", diverging)
    with pytest.raises(QNNError, match="diverged"):
        train(TrainConfig(bits=[4], epochs=1, out_dir=str(tmp_path / "div"), **TINY))
    assert not (tmp_path / "div").exists()
    monkeypatch.undo()
    # an export whose census finds float compute exits non-zero
    import qnn.export.verify as V

    monkeypatch.setattr(V, "verify", lambda *a, **k: {"fully_integer": False, "float_compute_ops": ["Conv"], "ops": {}})
    capsys.readouterr()
    assert run_cli(["export", "--checkpoint", trained_ckpt, "--bits", "4", "--out", tmp_path / "f.onnx"]) == 1
    assert "NOT fully integer" in capsys.readouterr().err


# --------------------------------------------------------------------------- class 3: earlier results survive


def test_overwrite_validates_before_touching_the_earlier_run(run_copy, tmp_path, capsys):
    d, before = run_copy
    base = ["train", "--model", "small_cnn", "--no-progress", "--bits", "4", "--epochs", "1", "--out", d, "--overwrite"]
    assert "not found" in cli_error(base + ["--dataset", "cifar10", "--data-dir", tmp_path / "typo"], capsys)
    assert "unknown model" in cli_error(base[:2] + ["nosuchnet"] + base[3:], capsys)
    assert "not found" in cli_error(base + ["--init", tmp_path / "missing.pt"], capsys)
    assert "unknown option" in cli_error(base + ["--defense", "qadtr", "--defense-arg", "typo=1"], capsys)
    assert tree_hashes(d) == before
    assert not (tmp_path / "run.partial").exists()


def test_resume_of_a_run_killed_in_its_first_epoch_checks_its_settings(tmp_path):
    from tests.qnn.test_train import _train_epochs

    cfg = TrainConfig(bits=[4], epochs=1, out_dir=str(tmp_path / "r"), **TINY)
    _train_epochs(cfg, stop_after=0)  # killed before any epoch finished: config.json but no last.pt
    assert not (tmp_path / "r.partial" / "last.pt").exists() and (tmp_path / "r.partial" / "config.json").is_file()
    with pytest.raises(QNNError, match="other settings: bits"):
        train(TrainConfig(**{**cfg.to_dict(), "resume": True, "bits": [8]}))
    train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert (tmp_path / "r" / "model.pt").is_file()


def test_interrupted_overwrite_keeps_the_earlier_run_and_resumes(run_copy, tmp_path):
    d, before = run_copy
    from tests.qnn.test_train import _train_epochs

    cfg = TrainConfig(bits=[4], epochs=2, out_dir=str(d), overwrite=True, seed=3, **TINY)
    _train_epochs(cfg, stop_after=1)
    assert tree_hashes(d) == before  # the earlier run is untouched
    assert (tmp_path / "run.partial" / "last.pt").is_file()
    # resuming with other settings names the keys that differ
    for change, key in ((dict(bits=[2, 4]), "bits"), (dict(seed=4), "seed"), (dict(lr=0.1), "lr")):
        with pytest.raises(QNNError, match=f"other settings: {key}"):
            train(TrainConfig(**{**cfg.to_dict(), "resume": True, **change}))
    assert tree_hashes(d) == before
    train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert tree_hashes(d) != before and not (tmp_path / "run.partial").exists()
    assert len(json.loads((d / "metrics.json").read_text())["history"]) == 2


def test_outputs_that_are_inputs_or_locked_are_refused(trained_ckpt, tmp_path, capsys):
    from qnn.outputs import RunLock

    ck = tmp_path / "model.pt"
    shutil.copy(trained_ckpt, ck)
    h = hashlib.sha256(ck.read_bytes()).hexdigest()
    assert "lies inside the input" in cli_error(["export", "--checkpoint", ck, "--bits", "4", "--out", ck], capsys)
    assert "lies inside the input" in cli_error(["eval", "--checkpoint", ck, "--json", ck], capsys)
    assert "lies inside the input" in cli_error(
        ["bundle", "--checkpoint", ck, "--bits", "4", "--out", tmp_path, "--overwrite"], capsys)
    assert "lies inside the input" in cli_error(
        ["attack", "--checkpoint", ck, "--out", tmp_path, "--overwrite"], capsys)
    assert "lies inside the input" in cli_error(
        ["train", "--no-progress", "--init", ck, "--out", tmp_path, "--overwrite"], capsys)
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == h
    # a second run into a folder another run is writing is refused
    with RunLock(tmp_path / "busy"):
        assert "another run is writing" in cli_error(
            ["train", "--model", "small_cnn", "--no-progress", "--epochs", "1", "--out", tmp_path / "busy"], capsys)
    assert not (tmp_path / "busy").exists()
    # outputs that are files where folders are wanted (and the reverse)
    (tmp_path / "afile").write_text("keep me")
    assert "is a file" in cli_error(["train", "--no-progress", "--out", tmp_path / "afile"], capsys)
    assert "is a file" in cli_error(["train", "--no-progress", "--out", tmp_path / "afile" / "sub"], capsys)
    assert "is a folder" in cli_error(["eval", "--checkpoint", ck, "--json", tmp_path], capsys)
    assert (tmp_path / "afile").read_text() == "keep me"
    # an output inside an input folder (the data set) is refused too: it would replace or delete input files
    x, y = np.zeros((20, 32, 32, 3), np.uint8), np.arange(20) % 10
    data = _cifar_dir(tmp_path, "data", x, y)
    before = tree_hashes(data)
    assert "lies inside the input" in cli_error(["eval", "--checkpoint", ck, "--dataset", "cifar10", "--data-dir", data,
                                                 "--json", data / "test.npz"], capsys)
    assert "lies inside the input" in cli_error(["train", "--no-progress", "--dataset", "cifar10", "--data-dir", data,
                                                 "--out", data / "runs", "--overwrite"], capsys)
    assert tree_hashes(data) == before


def test_staged_dir_decides_under_its_lock_and_repairs_an_interrupted_swap(tmp_path):
    from qnn.outputs import StagedDir

    out = tmp_path / "r"
    with StagedDir(out, what="run", marker="last.pt") as a:
        # a second run cannot even decide while the first holds the folder (no later publish over it)
        with pytest.raises(QNNError, match="another run is writing"):
            with StagedDir(out, overwrite=True, what="run"):
                pass
        (a.prepare() / "model.pt").write_text("A")
        a.publish()
    assert (out / "model.pt").read_text() == "A"
    with pytest.raises(QNNError, match="holds an earlier run"):
        with StagedDir(out, what="run"):
            pass
    # a folder holding other results is never resumed in place nor replaced without --overwrite
    with pytest.raises(QNNError, match="not a run to resume"):
        with StagedDir(out, resume=True, what="run", marker="last.pt"):
            pass
    with pytest.raises(QNNError, match="kept for the staging folders"):
        StagedDir(tmp_path / "x.partial")
    # a crash between the swap's two renames: `out` is missing, the earlier result waits aside; the next run
    # puts it back before deciding anything
    (tmp_path / "r.partial").mkdir()
    (tmp_path / "r.partial" / "model.pt").write_text("B")
    out.rename(tmp_path / ".r.old")
    with StagedDir(out, resume=True, what="run", marker="last.pt") as b:
        assert (out / "model.pt").read_text() == "A" and b.work == tmp_path / "r.partial"
        b.publish()
    assert (out / "model.pt").read_text() == "B" and not (tmp_path / ".r.old").exists()


def test_crash_during_bundle_overwrite_keeps_the_earlier_bundle(trained_ckpt, tmp_path, monkeypatch):
    import qnn.export.bundle as B
    from qnn.attacks.patch import PatchConfig
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset

    m, _ = load_checkpoint(trained_ckpt)
    ds = load_dataset("synthetic", "test", n_synthetic=2000).subset(16)
    p = [("p6", torch.rand(3, 6, 6), PatchConfig())]
    b = B.build_bundle(m, 4, tmp_path / "b", ds.x, ds.y, p)
    before = tree_hashes(b)
    real = B._write_bundle

    def crash(model, bits, out, *a):
        real(model, bits, out, *a)
        (out / "model.onnx").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "_write_bundle", crash)
    with pytest.raises(KeyboardInterrupt):
        B.build_bundle(m, 8, tmp_path / "b", ds.x, ds.y, p, overwrite=True)
    assert tree_hashes(b) == before
    B.check_manifest(b)
    monkeypatch.undo()
    with pytest.raises(QNNError, match="patch name"):
        B.build_bundle(m, 4, tmp_path / "c", ds.x, ds.y, [("../x", torch.rand(3, 6, 6), PatchConfig())])
    # a finished overwrite replaces it whole, and the result passes its own manifest
    B.build_bundle(m, 8, tmp_path / "b", ds.x, ds.y, p, overwrite=True)
    assert json.loads((b / "expected.json").read_text())["bits"] == 8
    B.check_manifest(b)


# --------------------------------------------------------------------------- class 4: resume


def test_pipeline_bad_options_keep_the_earlier_run_and_resume_is_per_stage(tmp_path, capsys, monkeypatch):
    import qnn.train as T

    out = tmp_path / "pipe"
    args = ["pipeline", "--out", out, "--n-synthetic", 300, "--bits", "4,8", "--export-bits", "4", "--patch-iters", 2,
            "--n-attack", 32, "--n-eval", 32, "--epochs", 1]
    # interrupt in the second training stage
    real, calls = T.train, {"n": 0}

    def crash_second(cfg):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(cfg)

    monkeypatch.setattr(T, "train", crash_second)
    assert run_cli(args) == 130
    capsys.readouterr()
    monkeypatch.undo()
    part = tmp_path / "pipe.partial"
    trained = ("model.pt", "last.pt", "metrics.json", "config.json")
    qat = {f: v for f, v in tree_hashes(part / "qat").items() if f in trained}
    assert set(qat) == set(trained)
    assert "other settings: model" in cli_error(args + ["--resume", "--model", "resnet20"], capsys)
    assert "other settings: epochs" in cli_error(args[:-1] + [2, "--resume"], capsys)
    assert run_cli(args + ["--resume"]) == 0  # not refused; the finished stage is reused as it was
    assert {f: v for f, v in tree_hashes(out / "qat").items() if f in trained} == qat and not part.exists()
    before = tree_hashes(out)
    assert "export bit-width 3" in cli_error(args + ["--overwrite", "--export-bits", "3"], capsys)
    assert "--n-attack" in cli_error(args + ["--overwrite", "--n-attack", 300], capsys)
    assert "seed" in cli_error(args + ["--overwrite", "--seed", 2**64], capsys)
    assert tree_hashes(out) == before and not part.exists()


# --------------------------------------------------------------------------- class 5: bad data


def test_bad_data_is_refused(tmp_path, capsys, trained_ckpt):
    x = np.zeros((20, 32, 32, 3), np.uint8)
    t = ["train", "--model", "small_cnn", "--no-progress", "--dataset", "cifar10", "--out", tmp_path / "o"]
    e = ["eval", "--checkpoint", trained_ckpt, "--dataset", "cifar10"]
    d = _cifar_dir(tmp_path, "range", x, np.arange(20) % 11)
    assert "0..9" in cli_error(t + ["--data-dir", d], capsys)
    assert "0..9" in cli_error(e + ["--data-dir", d], capsys)
    d = _cifar_dir(tmp_path, "neg", x, np.arange(20) % 10 - 1)
    assert "0..9" in cli_error(e + ["--data-dir", d], capsys)
    d = _cifar_dir(tmp_path, "float", x, (np.arange(20) % 10) + 0.7)
    assert "integer" in cli_error(t + ["--data-dir", d], capsys)
    d = _cifar_dir(tmp_path, "small", np.zeros((20, 16, 16, 3), np.uint8), np.arange(20) % 10)
    assert "32x32" in cli_error(t + ["--data-dir", d], capsys)
    assert "32x32" in cli_error(["bundle", "--checkpoint", trained_ckpt, "--bits", "4", "--dataset", "cifar10",
                                 "--data-dir", d, "--out", tmp_path / "b"], capsys)
    assert "--subset" in cli_error(["eval", "--checkpoint", trained_ckpt, "--subset", "-5"], capsys)
    assert "--subset" in cli_error(["eval", "--checkpoint", trained_ckpt, "--subset", "0"], capsys)
    assert "--patch-size" in cli_error(["attack", "--checkpoint", trained_ckpt, "--patch-size", "0",
                                        "--out", tmp_path / "a"], capsys)
    assert "more than once" in cli_error(["train", "--no-progress", "--bits", "4,8,8,32,4", "--out", tmp_path / "o"],
                                         capsys)
    assert "more than once" in cli_error(e[:3] + ["--bits", "4,4"], capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()
    # images of another size than the model takes (an image folder of 16x16 images for a 32x32 model)
    from qnn.checkpoint import load_checkpoint
    from qnn.data import ArrayDataset, check_data_fits

    m, _ = load_checkpoint(trained_ckpt)
    with pytest.raises(QNNError, match="takes 32x32"):
        check_data_fits(m, ArrayDataset(np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 1]), ("a", "b")))
    with pytest.raises(QNNError, match="outside the model's 10 classes"):
        check_data_fits(m, ArrayDataset(np.zeros((1, 32, 32, 3), np.uint8), np.array([11]), tuple("abcdefghijkl")))


# --------------------------------------------------------------------------- class 6: one line, never a traceback


def test_malformed_files_and_values_are_one_line_errors(tmp_path, capsys, trained_ckpt):
    obj = torch.load(trained_ckpt, weights_only=True)
    for name, edit, msg in (("nosd", lambda o: o.pop("state_dict"), "no state_dict"),
                            ("sdlist", lambda o: o.update(state_dict=[1, 2]), "no state_dict"),
                            ("kwlist", lambda o: o.update(arch_kwargs=[1, 2]), "arch_kwargs"),
                            ("kwbad", lambda o: o.update(arch_kwargs={"bogus": 1}), "arch_kwargs"),
                            ("noarch", lambda o: o.update(arch=None), "architecture"),
                            ("bits", lambda o: o.update(trained_bits="four"), "trained_bits"),
                            # the trained bit-widths are stated twice (trained_bits, the training config): they agree
                            ("bits2", lambda o: o.update(trained_bits=[2]), "disagree with its training config"),
                            ("bits3", lambda o: o.update(config={**o["config"], "bits": [4, 9]}),
                             "the training config's bits: bit-width(s) [9]")):
        o = dict(obj)
        edit(o)
        torch.save(o, tmp_path / f"{name}.pt")
        assert msg in cli_error(["eval", "--checkpoint", tmp_path / f"{name}.pt"], capsys), name
    t = ["train", "--model", "small_cnn", "--no-progress", "--out", tmp_path / "t"]
    for flag, v in (("--threads", "0"), ("--threads", "-2"), ("--seed", "-1"), ("--epochs", "1.5"),
                    ("--batch-size", "x"), ("--first-last-bits", "64")):
        assert flag in cli_error(t + [flag, v], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in cli_error(t + ["--device", "cuda"], capsys)
    assert "unknown device" in cli_error(t + ["--device", "tpu"], capsys)
    for text, key in (('epochs: "three"', "epochs"), ('lr: "fast"', "lr"), ("epochs: 1.9", "epochs"),
                      ("epochs: true", "epochs"), ("bits: [4, 4.5]", "bit-widths"), ("overwrite: 1", "overwrite"),
                      ("model: 3", "model"), ("defense_args: [1]", "defense_args"), ("threads: 0", "threads")):
        (tmp_path / "c.yaml").write_text(text + "\n")
        assert key in cli_error(["train", "--no-progress", "--out", tmp_path / "t", "-c", tmp_path / "c.yaml"],
                                capsys), text
    (tmp_path / "c.yaml").write_text("- a list\n")
    assert "mapping" in cli_error(t + ["-c", tmp_path / "c.yaml"], capsys)
    assert "invalid choice" in cli_error(["nosuchcommand"], capsys)
    assert not (tmp_path / "t").exists()


def test_file_outputs_never_replace_what_the_command_did_not_make(trained_ckpt, tmp_path, capsys):
    """An existing file is replaced only with --overwrite, and a training run's own files never (#36)."""
    import hashlib
    import shutil

    run = tmp_path / "other_run"
    shutil.copytree(trained_ckpt.parent, run)
    (run / "last.pt").write_bytes((run / "model.pt").read_bytes())  # a run that could still resume
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()}  # noqa: E731
    before = digest()
    ev = ["eval", "--checkpoint", trained_ckpt, "--bits", "4", "--subset", "32"]
    ex = ["export", "--checkpoint", trained_ckpt, "--bits", "4"]
    for args in (ev + ["--json", run / "model.pt"], ev + ["--json", run / "metrics.json", "--overwrite"],
                 ex + ["--out", run / "last.pt", "--overwrite"], ex + ["--out", run / "config.json"]):
        assert "file of the training run" in cli_error(args, capsys)
    assert digest() == before
    (tmp_path / "mine.onnx").write_bytes(b"keep")
    assert "exists; pass --overwrite" in cli_error(ex + ["--out", tmp_path / "mine.onnx"], capsys)
    assert (tmp_path / "mine.onnx").read_bytes() == b"keep"
    assert run_cli(ex + ["--out", tmp_path / "mine.onnx", "--overwrite"]) == 0
    assert (tmp_path / "mine.onnx").read_bytes() != b"keep"
    (tmp_path / "r.json").write_text("{}")
    assert "exists; pass --overwrite" in cli_error(ev + ["--json", tmp_path / "r.json"], capsys)
    assert run_cli(ev + ["--json", tmp_path / "r.json", "--overwrite"]) == 0


def test_a_refused_command_leaves_no_lock_file(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "run"
    cli_error(["train", "--bits", "4,9", "--out", out], capsys)
    cli_error(["attack", "--checkpoint", tmp_path / "missing.pt", "--out", out], capsys)
    assert not list(tmp_path.rglob("*.lock")) and not (tmp_path / "new").exists()


def test_a_graph_without_compute_is_not_reported_integer(tmp_path, capsys):
    """An identity-only ONNX graph has no float op, and no integer one either: not 'fully integer'."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "id.onnx")
    assert run_cli(["verify", tmp_path / "id.onnx"]) == 1
    assert "no compute node" in capsys.readouterr().out


# --------------------------------------------------------------------------- resume trusts nothing it reads (#36)


def _tamper(path, **fields):
    st = torch.load(path, weights_only=False)
    for k, v in fields.items():
        if k == "defense_pool":
            st["defense"]["pool"] = v
        else:
            st[k] = v
    torch.save(st, path)


def test_resume_validates_its_state_and_inputs(tmp_path, capsys):
    """A tampered epoch, history or defense state, data changed under the same --data-dir, or an edited user-model
    file: one line, exit 2, the staged run unchanged; the untampered state then resumes."""
    from tests.qnn.test_train import _train_epochs

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (192, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 192)
    data = _cifar_dir(tmp_path, "data", x, y)
    src = tmp_path / "mymodels.py"
    src.write_text((__import__("pathlib").Path(__file__).parent / "user_models.py").read_text())
    out = tmp_path / "r"
    cfg = TrainConfig(**{**TINY, "n_synthetic": None, "model": f"{src}:tiny_cnn"}, dataset="cifar10",
                      data_dir=str(data), bits=[4, 8], epochs=2, out_dir=str(out), defense="qadtr",
                      defense_args={"gir_every": 1})
    _train_epochs(cfg, stop_after=1)
    last = tmp_path / "r.partial" / "last.pt"
    pristine = last.read_bytes()
    argv = ["train", "--model", cfg.model, "--dataset", "cifar10", "--data-dir", data, "--bits", "4,8", "--epochs", "2",
            "--batch-size", "64", "--lr", "0.05", "--defense", "qadtr", "--gir-every", "1", "--no-progress",
            "--out", out, "--resume"]
    cases = [(dict(epoch=99), "epoch 99"), (dict(epoch=-1), "epoch -1"), (dict(epoch="1"), "epoch '1'"),
             (dict(history=[]), "history"), (dict(defense_pool=torch.full((2, 2, 3, 6, 6), float("nan"))), "pixels"),
             (dict(defense={"pool": 1}), "defense state"), (dict(inputs={"train_data": "0" * 64}), "inputs")]
    for fields, said in cases:
        last.write_bytes(pristine)
        _tamper(last, **fields)
        before = tree_hashes(tmp_path / "r.partial")
        assert said in cli_error(argv, capsys), fields
        assert tree_hashes(tmp_path / "r.partial") == before and not out.exists()
    last.write_bytes(pristine)
    x2 = x.copy()
    x2[0, 0, 0, 0] ^= 1  # one pixel of the training set changed under the same folder
    np.savez(data / "train.npz", x=x2, y=y)
    assert "the training images changed" in cli_error(argv, capsys)
    np.savez(data / "train.npz", x=x, y=y)
    src.write_text(src.read_text() + "\n# edited, same parameter shapes\n")
    assert "the model file changed" in cli_error(argv, capsys)
    src.write_text(src.read_text().removesuffix("\n# edited, same parameter shapes\n"))
    assert run_cli(argv) == 0 and (out / "model.pt").is_file()
    assert torch.load(out / "model.pt", weights_only=True)["inputs"]["train_data"]


@pytest.mark.parametrize("args, said", [
    (["--frac-patched", "0.001"], None), (["--adapt-temp", "1e-300"], None),
    (["--no-gir", "--lambda-gir", "3"], "no_gir turns off"), (["--no-aqapa", "--adapt-temp", "1"], "no_aqapa turns off"),
    (["--gir-batch", "1000"], "more than the 32 patched images"), (["--inner-steps", "1000000000"], "[0, 50]"),
    (["--patch-step", "1e9"], "(0, 1]"), (["--inner-step", "2"], "[0, 1]")])
def test_qadtr_ranges_are_the_ones_that_work(tmp_path, capsys, args, said):
    """Values inside the allowed ranges train (no traceback); contradictions and useless values are one line."""
    argv = ["train", "--model", "small_cnn", "--bits", "4,8", "--epochs", "1", "--train-subset", "128",
            "--test-subset", "64", "--batch-size", "64", "--defense", "qadtr", "--no-progress", "--out", tmp_path / "r",
            *args]
    if said is None:
        assert run_cli(argv) == 0
    else:
        assert said in cli_error(argv, capsys)
        assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()


def test_a_failed_run_leaves_no_staging_folder_unless_it_holds_work_to_resume(tmp_path, monkeypatch):
    """A crash before the first finished epoch removes the `.partial` the run made; one after keeps it (last.pt)
    for --resume; a temp file a kill -9 left mid-save is gone from the finished run."""
    import qnn.train as T

    orig, calls = T.train_step, {"n": 0}

    def crash_at(n):
        def step(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise RuntimeError("boom")
            return orig(*a, **k)
        return step

    cfg = TrainConfig(bits=[4], epochs=2, out_dir=str(tmp_path / "r"), **TINY)  # 4 steps an epoch
    monkeypatch.setattr(T, "train_step", crash_at(2))
    with pytest.raises(RuntimeError):
        train(cfg)
    assert not (tmp_path / "r.partial").exists() and not (tmp_path / "r").exists()
    calls["n"] = 0
    monkeypatch.setattr(T, "train_step", crash_at(6))
    with pytest.raises(RuntimeError):
        train(cfg)
    assert (tmp_path / "r.partial" / "last.pt").is_file()
    (tmp_path / "r.partial" / ".last.pt.k9x2.tmp").write_bytes(b"half a state")  # what kill -9 mid-save leaves
    monkeypatch.setattr(T, "train_step", orig)
    train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert (tmp_path / "r" / "model.pt").is_file() and not list((tmp_path / "r").glob(".*.tmp"))


def test_a_crashed_bundle_or_attack_leaves_no_staging_folder(trained_ckpt, tmp_path, monkeypatch):
    import qnn.export.bundle as B
    from qnn.attacks.patch import PatchConfig
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset

    model, _ = load_checkpoint(trained_ckpt)
    ds = load_dataset("synthetic", "test", n_synthetic=2000).subset(16)
    monkeypatch.setattr(B, "_pack_weights", lambda out: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        B.build_bundle(model, 4, tmp_path / "b", ds.x, ds.y, [("p", torch.rand(3, 6, 6), PatchConfig())],
                       pack_weights=True)
    assert not (tmp_path / "b.partial").exists() and not (tmp_path / "b").exists()


def test_a_full_disk_is_one_line_and_keeps_earlier_files(trained_ckpt, run_copy, tmp_path, capsys, monkeypatch):
    """ENOSPC in any writer (results JSON, ONNX, a training run's state, the edge runner's outputs): one line, exit 2,
    the earlier file or run unchanged, no temp file left."""
    import errno
    import os

    import qnn.checkpoint as C
    from qnn.export import run_edge as E

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "r.json").write_text("{}")
    d, before = run_copy
    monkeypatch.setattr(C.os, "fsync", full)
    ev = ["eval", "--checkpoint", trained_ckpt, "--bits", "4", "--subset", "32"]
    assert "No space left on device" in cli_error(ev + ["--json", tmp_path / "r.json", "--overwrite"], capsys)
    assert (tmp_path / "r.json").read_text() == "{}"
    ex = ["export", "--checkpoint", trained_ckpt, "--bits", "4", "--out", tmp_path / "m.onnx"]
    assert "No space left on device" in cli_error(ex, capsys)
    tr = ["train", "--model", "small_cnn", "--bits", "4", "--epochs", "1", "--no-progress", "--out", d, "--overwrite"]
    assert "No space left on device" in cli_error(tr, capsys)
    assert tree_hashes(d) == before and not (tmp_path / "run.partial").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(E.np, "savez", lambda f, **k: full(0))
    with pytest.raises(E.EdgeError, match="No space left on device"):
        E._write_atomic(str(tmp_path / "logits.npz"), lambda f: E.np.savez(f, a=1))
    assert not list(tmp_path.rglob("*.tmp"))


def test_user_factory_exits_and_warnings_are_one_line(tmp_path, capsys):
    """A factory that calls sys.exit or raises KeyboardInterrupt is named (not a silent exit or a traceback); a
    warning raised before a refusal does not come before the error line."""
    src = tmp_path / "m.py"
    src.write_text("import sys, warnings\nimport torch.nn as nn\n"
                   "def exits():\n    sys.exit(3)\n"
                   "def interrupts():\n    raise KeyboardInterrupt\n"
                   "def warns():\n    warnings.warn('this layer is deprecated')\n"
                   "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
                   " nn.Linear(4, 10))\n")
    base = ["train", "--bits", "4", "--epochs", "1", "--no-progress", "--out", tmp_path / "r", "--model"]
    assert "the factory raised SystemExit: 3" in cli_error(base + [f"{src}:exits"], capsys)
    assert "the factory raised KeyboardInterrupt" in cli_error(base + [f"{src}:interrupts"], capsys)
    import subprocess
    import sys

    # in a process of its own: pytest would otherwise collect the warning before it reached stderr
    r = subprocess.run([sys.executable, "-m", "qnn.cli", *map(str, base), f"{src}:warns"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("qnn: error:") and "Softplus" in r.stderr \
        and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()


def test_results_read_back_are_validated(tmp_path):
    """Every reader of a results file (render_docs, the defense grid, its cost cache) refuses NaN, infinities,
    percentages outside [0, 100] and negative durations or counts, in one line naming the value."""
    from qnn.outputs import read_results_json

    good = {"asr_pct": 12.5, "rows": [{"clean_acc_pct": 80.0, "epoch_seconds": 3.0, "n_images": 10}]}
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert read_results_json(tmp_path / "ok.json") == good
    for bad, said in (({"asr_pct": float("nan")}, "finite"), ({"rows": [{"clean_acc_pct": 150.0}]}, "percentage"),
                      ({"asr": {"4": -1.0}}, "percentage"), ({"epoch_seconds": -2}, "negative"),
                      ({"n_images": -5}, "negative"), ([1, 2], "JSON object")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(QNNError, match=said):
            read_results_json(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{trunc")
    with pytest.raises(QNNError, match="not a readable"):
        read_results_json(tmp_path / "bad.json")


def test_a_subset_larger_than_the_set_is_refused_not_cut(capsys, trained_ckpt, tmp_path):
    from qnn.data import load_dataset

    ds = load_dataset("synthetic", "test", n_synthetic=100)
    assert len(ds.subset(100)) == 100 and len(ds.subset(10, start=90)) == 10
    for n, start in ((101, 0), (11, 90)):
        with pytest.raises(QNNError, match="ask for at most"):
            ds.subset(n, start=start)
    assert "ask for at most" in cli_error(["bundle", "--checkpoint", trained_ckpt, "--bits", "4", "--n", "100000",
                                           "--out", tmp_path / "b"], capsys)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()

import json
import os
import subprocess
import sys

import pytest
import torch

from qnn.checkpoint import load_checkpoint, load_float_weights, save_checkpoint
from qnn.config import TrainConfig
from qnn.errors import QNNError
from qnn.models import create_model
from qnn.train import BitSchedule, train
from tests.conftest import ROOT, run_cli

TINY = dict(model="small_cnn", n_synthetic=256, batch_size=64, progress=False, lr=0.05)


def test_resume_reaches_same_weights(tmp_path):
    full = tmp_path / "full"
    train(TrainConfig(bits=[2, 4, 8, 32], epochs=2, out_dir=str(full), **TINY))
    # interrupt a 2-epoch run after epoch 1 (as a crash would), then resume it
    stopped = tmp_path / "stopped"
    cfg = TrainConfig(bits=[2, 4, 8, 32], epochs=2, out_dir=str(stopped), **TINY)
    _train_epochs(cfg, stop_after=1)
    # an unfinished run lives beside its output folder, which appears only when the run has finished
    assert not stopped.exists()
    assert torch.load(tmp_path / "stopped.partial" / "last.pt", weights_only=True)["epoch"] == 1
    cfg.resume = True
    train(cfg)
    a = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(stopped / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs at {k}"
    assert not (tmp_path / "stopped.partial").exists()


def _train_epochs(cfg, stop_after):
    """Run `cfg` but raise after `stop_after` epochs (as a crash would)."""
    import qnn.train as T

    orig = T.evaluate
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        r = orig(*a, **k)
        if calls["n"] > stop_after:
            raise KeyboardInterrupt
        return r

    T.evaluate = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        T.evaluate = orig


def test_metrics_and_config_written(tmp_path):
    out = tmp_path / "r"
    train(TrainConfig(bits=[4], epochs=1, out_dir=str(out), **TINY))
    m = json.loads((out / "metrics.json").read_text())
    assert m["history"][0]["epoch"] == 1 and "4" in m["history"][0]["test_acc"]
    c = json.loads((out / "config.json").read_text())
    assert c["config"]["bits"] == [4] and c["versions"]["torch"]


def test_schedules():
    s = BitSchedule([2, 4, 8, 32], "round_robin", 0, 100)
    assert [s(i) for i in range(5)] == [2, 4, 8, 32, 2]
    r = BitSchedule([2, 4, 8, 32], "random", 7, 100)
    assert [r(i) for i in range(20)] == [BitSchedule([2, 4, 8, 32], "random", 7, 100)(i) for i in range(20)]
    c = BitSchedule([2, 4, 8, 32], "curriculum", 0, 100)
    assert all(c(i) == 32 for i in range(5)) and {c(i) for i in range(60, 100)} == {2, 4, 8, 32}


def _cli_err(args, capsys):
    rc = run_cli(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("qnn: error:") and "\n" not in err
    return err


def test_cli_bad_inputs(tmp_path, capsys, trained_ckpt):
    base = ["train", "--model", "small_cnn", "--no-progress"]
    assert "--batch-size" in _cli_err(base + ["--batch-size", "0", "--out", tmp_path / "a"], capsys)
    assert "epochs" in _cli_err(base + ["--epochs", "-1", "--out", tmp_path / "a"], capsys)
    assert "not allowed" in _cli_err(base + ["--bits", "9", "--out", tmp_path / "a"], capsys)
    assert "empty" in _cli_err(base + ["--bits", ",", "--out", tmp_path / "a"], capsys)
    assert "not found" in _cli_err(base + ["--dataset", "cifar10", "--data-dir", tmp_path / "none", "--out", tmp_path / "a"], capsys)
    (tmp_path / "emptydir").mkdir()
    assert "empty" in _cli_err(base + ["--dataset", "cifar10", "--data-dir", tmp_path / "emptydir", "--out", tmp_path / "a"], capsys)
    # corrupt / truncated checkpoints
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "checkpoint" in _cli_err(["eval", "--checkpoint", bad], capsys)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(trained_ckpt.read_bytes()[:2000])
    assert "checkpoint" in _cli_err(["eval", "--checkpoint", trunc], capsys)
    # checkpoint of another model used as init
    assert "expected 'resnet20'" in _cli_err(base[:1] + ["--model", "resnet20", "--init", trained_ckpt, "--out", tmp_path / "b"], capsys)
    # a pickle holding code is refused by weights_only loading
    evil = tmp_path / "evil.pt"
    import pickle

    evil.write_bytes(pickle.dumps({"format": "qnn-checkpoint-v2", "x": os.system}))
    assert "unsafe" in _cli_err(["eval", "--checkpoint", evil], capsys)


def test_output_dir_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "small_cnn", "--bits", "4", "--epochs", "1", "--no-progress", "--out", out]
    train(TrainConfig(bits=[4], epochs=1, out_dir=str(out), **TINY))
    before = (out / "model.pt").read_bytes()
    assert "holds an earlier" in _cli_err(args, capsys)
    assert (out / "model.pt").read_bytes() == before


def test_eval_cli(trained_ckpt, tmp_path, capsys):
    rc = run_cli(["eval", "--checkpoint", trained_ckpt, "--bits", "32,4,2", "--subset", "200", "--json", tmp_path / "e.json"])
    assert rc == 0
    r = json.loads((tmp_path / "e.json").read_text())
    assert set(r["accuracy_pct"]) == {"32", "4", "2"} and r["n_images"] == 200
    assert "not trained at [3]" in _cli_err(["eval", "--checkpoint", trained_ckpt, "--bits", "3", "--subset", "50"], capsys)


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo): same bit-width draw on every rank, one checkpoint written."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           "-m", "qnn.cli", "train", "--model", "small_cnn", "--bits", "2,4,8,32", "--epochs", "1", "--batch-size", "32",
           "--threads", "1", "--no-progress", "--out", str(out), "-c", str(tmp_path / "c.yaml")]
    (tmp_path / "c.yaml").write_text("n_synthetic: 256\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    model, _ = load_checkpoint(out / "model.pt")
    assert model is not None


def test_init_from_shared_pretrained_weights(tmp_path):
    from tests.conftest import SHARED

    w = SHARED / "weights" / "resnet20-12fca82f.th"
    if not w.is_file():
        pytest.skip("needs ../shared/data")
    m = load_float_weights(create_model("resnet20"), str(w))
    with pytest.raises(QNNError, match="does not match resnet32 .no 'layer1.3.bn1"):
        load_float_weights(create_model("resnet32"), str(w))
    with pytest.raises(QNNError, match="does not match small_cnn .it has 'layer1.1.conv1.weight'"):
        load_float_weights(create_model("small_cnn"), str(w))
    save_checkpoint(tmp_path / "x.pt", m)


def test_pipeline_overwrite_retrains_its_stages(tmp_path):
    """`qnn pipeline --overwrite` starts afresh: the stage folders of an earlier run are not reused."""
    import json

    from tests.conftest import run_cli

    out = tmp_path / "pipe"
    args = ["pipeline", "--out", out, "--n-synthetic", 300, "--bits", "4,8", "--export-bits", "4", "--patch-iters", 2,
            "--n-attack", 32, "--n-eval", 32]
    assert run_cli(args + ["--epochs", 1]) == 0
    assert run_cli(args + ["--epochs", 2, "--overwrite"]) == 0
    for stage in ("qat", "qadtr"):
        assert len(json.loads((out / stage / "metrics.json").read_text())["history"]) == 2
    from qnn.train import versions

    assert "code hash " + versions()["code_hash"] in (out / "report.md").read_text()


def test_distillation_from_a_float_teacher(tmp_path, capsys, trained_ckpt):
    """--distill adds the teacher's soft targets at quantized steps: same seed and data, different weights; the
    teacher is never trained; bad distillation options are one-line errors."""
    from qnn.checkpoint import load_checkpoint
    from qnn.train import distill_loss

    base = dict(bits=[2, 32], epochs=1, init=str(trained_ckpt), **TINY)
    train(TrainConfig(out_dir=str(tmp_path / "plain"), **base))
    train(TrainConfig(out_dir=str(tmp_path / "kd"), distill="init", distill_alpha=0.9, **base))
    a, _ = load_checkpoint(tmp_path / "plain" / "model.pt")
    b, _ = load_checkpoint(tmp_path / "kd" / "model.pt")
    w = lambda m: m.body.get_submodule("layer1.0.conv1").weight  # noqa: E731
    assert not torch.equal(w(a), w(b))
    teacher, _ = load_checkpoint(trained_ckpt)
    assert not torch.equal(w(teacher), w(b))
    # alpha=0 is plain cross-entropy; equal logits leave only (1-alpha) CE
    s = torch.randn(8, 10)
    assert torch.allclose(distill_loss(torch.tensor(2.0), s, s, 0.25, 3.0), torch.tensor(1.5))
    assert distill_loss(torch.tensor(0.0), s, -s, 1.0, 1.0) > 0
    args = ["train", "--model", "small_cnn", "--no-progress", "--out", tmp_path / "x"]
    assert "--distill-alpha" in _cli_err(args + ["--distill", trained_ckpt, "--distill-alpha", "1.5"], capsys)
    assert "plain QAT" in _cli_err(args + ["--distill", trained_ckpt, "--defense", "pbat"], capsys)
    assert "needs --init" in _cli_err(args + ["--distill", "init"], capsys)
    assert "not found" in _cli_err(args + ["--distill", tmp_path / "missing.pt"], capsys)


def test_calibrate_left_out_bit_width_does_not_depend_on_the_global_rng(trained_ckpt):
    """calibrate_ gives a never-trained bit-width the same BN statistics and scales whatever torch's RNG state is
    (the scale init samples activations), and leaves the caller's RNG state as it was."""
    import torch

    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset
    from qnn.train import calibrate_

    train = load_dataset("synthetic", "train", None, n_synthetic=600)
    states = []
    for seed in (0, 1):
        m, _ = load_checkpoint(trained_ckpt)
        torch.manual_seed(seed)
        before = torch.random.get_rng_state()
        calibrate_(m, train, 3)
        assert torch.equal(torch.random.get_rng_state(), before)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_code_hash_names_the_sources_and_runs_record_it(tmp_path):
    """versions() records a hash of the project's Python sources beside the git SHA (a copied working tree can carry
    a stale .git); the hash changes with a file's content or name, and ignores other files."""
    from pathlib import Path

    from qnn.train import code_hash, versions

    (tmp_path / "qnn").mkdir()
    f = tmp_path / "qnn" / "a.py"
    f.write_text("x = 1\n")
    h0 = code_hash(tmp_path)
    (tmp_path / "qnn" / "notes.md").write_text("ignored")
    assert code_hash(tmp_path) == h0
    f.write_text("x = 2\n")
    h1 = code_hash(tmp_path)
    assert h1 != h0
    f.rename(tmp_path / "qnn" / "b.py")
    assert code_hash(tmp_path) not in (h0, h1)
    v = versions()
    assert v["code_hash"] == code_hash(Path(__file__).resolve().parents[2]) and len(v["code_hash"]) == 12
    assert "git_dirty" in v


def test_deterministic_switch_turns_on_deterministic_kernels_and_is_recorded(tmp_path):
    import json

    import torch

    try:
        train(TrainConfig(model="small_cnn", bits=[4], epochs=1, n_synthetic=128, batch_size=64, progress=False,
                          out_dir=str(tmp_path / "d"), deterministic=True))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert json.loads((tmp_path / "d" / "metrics.json").read_text())["config"]["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(False)

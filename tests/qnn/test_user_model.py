"""`--model path/to/file.py:factory`: a user's own float CNN through train, eval and integer export; a checkpoint of
it never runs code by itself; every bad model file is one line and exit 2."""

import json
import shutil

from tests.conftest import ROOT, cli_error, run_cli

USER = ROOT / "tests" / "qnn" / "user_models.py"


def test_own_model_trains_and_evaluates_and_its_checkpoint_needs_that_file(tmp_path, capsys):
    spec = f"{USER}:tiny_cnn"
    assert run_cli(["train", "--model", spec, "--bits", "4,32", "--epochs", 1, "--train-subset", 128, "--test-subset", 64, "--batch-size", 64, "--no-progress",
                    "--out", tmp_path / "r"]) == 0
    ck = tmp_path / "r" / "model.pt"
    e = ["eval", "--checkpoint", ck, "--bits", "4,32", "--subset", 32]
    assert run_cli(e + ["--model", spec, "--json", tmp_path / "e.json"]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())["accuracy_pct"]) == {"4", "32"}
    capsys.readouterr()
    assert "trained from user code" in cli_error(e, capsys)  # the checkpoint alone never runs the file
    changed = tmp_path / "user_models.py"
    shutil.copy(USER, changed)
    with open(changed, "a") as f:
        f.write("\nprint('this line must never run')\n")
    assert "is not the file and factory" in cli_error(e + ["--model", f"{changed}:tiny_cnn"], capsys)
    assert "is not the file and factory" in cli_error(e + ["--model", f"{USER}:with_softplus"], capsys)
    x = ["export", "--checkpoint", ck, "--bits", 4, "--out", tmp_path / "m.onnx"]
    assert "trained from user code" in cli_error(x, capsys) and not (tmp_path / "m.onnx").exists()
    assert run_cli(x + ["--model", spec]) == 0 and run_cli(["verify", tmp_path / "m.onnx"]) == 0


def test_bad_model_files_are_one_line_errors(tmp_path, capsys):
    t = ["train", "--bits", "4", "--epochs", 1, "--train-subset", 64, "--no-progress", "--out", tmp_path / "o"]
    (tmp_path / "broken.py").write_text("import nonexistent_module_xyz\n")
    for spec, msg in ((tmp_path / "missing.py", "model file not found"), (USER, "defines no function 'nope'"),
                      (tmp_path / "broken.py", "importing it failed"), (USER, "not a torch nn.Module"),
                      (USER, "cannot be traced"), (USER, "of type Softplus")):
        factory = {"defines no function 'nope'": "nope", "not a torch nn.Module": "not_a_module",
                   "cannot be traced": "untraceable", "of type Softplus": "with_softplus"}.get(msg, "tiny_cnn")
        assert msg in cli_error(t + ["--model", f"{spec}:{factory}"], capsys), msg
    assert "file.py:factory" in cli_error(t + ["--model", f"{USER}:not-a-name"], capsys)
    assert not (tmp_path / "o").exists()


def test_list_and_version(capsys):
    import pytest

    from qnn import __version__

    assert run_cli(["list", "models"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert {"resnet20", "mobilenetv2_cifar", "vgg11_cifar"} <= set(out) and any("file.py:factory" in o for o in out)
    assert run_cli(["list", "defenses"]) == 0 and "qadtr" in capsys.readouterr().out.split()
    assert run_cli(["list", "formats"]) == 0 and capsys.readouterr().out.split() == ["int", "qcdq", "qonnx"]
    assert "invalid choice" in cli_error(["list", "weights"], capsys)
    with pytest.raises(SystemExit) as e:
        run_cli(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qnn {__version__}"


def test_grayscale_model_goes_through_the_whole_chain_bit_exact(tmp_path, capsys):
    """A 1-channel 28x28 model: the data is made to fit it, and train -> eval -> attack -> export -> verify ->
    bundle -> bench/run_edge.py run it; the integer model's logits equal PyTorch's at 8, 4 and 2 bits."""
    import subprocess
    import sys

    import numpy as np
    import onnxruntime as ort
    import torch

    from qnn.attacks.patch import load_patch
    from qnn.checkpoint import load_checkpoint
    from qnn.data import load_dataset
    from qnn.export.onnx_export import normalise
    from qnn.layers import set_bit_width_

    spec, cfg = f"{USER}:grayscale_28", tmp_path / "c.yaml"
    cfg.write_text("image_size: 28\n")  # the model does not say its size (it pools globally): the option does
    assert run_cli(["train", "-c", cfg, "--model", spec, "--bits", "2,4,8", "--epochs", 1, "--train-subset", 128,
                    "--test-subset", 32, "--batch-size", 64, "--no-progress", "--out", tmp_path / "r"]) == 0
    ck = tmp_path / "r" / "model.pt"
    m = ["--checkpoint", ck, "--model", spec]
    assert run_cli(["eval", *m, "--bits", "8,4,2", "--subset", 32, "--json", tmp_path / "e.json"]) == 0
    assert run_cli(["attack", *m, "--bits", 2, "--iterations", 3, "--n-attack", 64, "--n-eval", 32,
                    "--out", tmp_path / "a"]) == 0
    assert tuple(load_patch(tmp_path / "a" / "patch_2b.npz")[0].shape) == (1, 6, 6)
    model, _ = load_checkpoint(ck, user_model=spec)
    x, _ = load_dataset("synthetic", "test", like=model).subset(16).tensors()
    assert tuple(x.shape) == (16, 1, 28, 28)
    for b in (8, 4, 2):
        for fmt in ("int", "qcdq", "qonnx") if b == 4 else ("int",):
            onnx_file = tmp_path / f"m{b}_{fmt}.onnx"
            assert run_cli(["export", *m, "--bits", b, "--format", fmt, "--out", onnx_file]) == 0, fmt
        assert run_cli(["verify", tmp_path / f"m{b}_int.onnx"]) == 0
        set_bit_width_(model, b)
        model.eval()
        with torch.no_grad():
            ref = model(x).numpy()
        sess = ort.InferenceSession(str(tmp_path / f"m{b}_int.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": normalise(x.numpy(), model.mean, model.std)})[0]
        assert np.array_equal(ref, got), b
    assert run_cli(["verify", tmp_path / "m4_qcdq.onnx"]) == 0
    assert run_cli(["bundle", *m, "--bits", 2, "--n", 32, "--patch", tmp_path / "a" / "patch_2b.npz",
                    "--out", tmp_path / "b"]) == 0
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run_edge.py"), "--bundle", str(tmp_path / "b"),
                        "--threads", "1", "--skip-latency", "--json", str(tmp_path / "edge.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    edge = json.loads((tmp_path / "edge.json").read_text())
    assert edge["pass"] and edge["logits_identical"] == {"clean": 32, "patch_patch_2b": 32}


def test_data_that_does_not_fit_the_model_is_one_line_before_training(tmp_path, capsys):
    from tests.qnn.test_data import _write_batches

    _write_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    t = ["train", "--bits", 4, "--epochs", 1, "--no-progress", "--out", tmp_path / "o"]
    cifar = ["--dataset", "cifar10", "--data-dir", tmp_path / "cifar"]
    err = cli_error(t + ["--model", f"{USER}:grayscale_28"] + cifar, capsys)
    assert "training set: images have 3 channels (RGB), the model's first conv takes 1 channel (grayscale)" in err
    for yaml, model, msg in (("num_classes: 5", "small_cnn", "num_classes 5: cifar10 at"),
                             ("image_size: 28", "small_cnn", "image_size 28: model 'small_cnn' takes 32x32 images")):
        (tmp_path / "c.yaml").write_text(yaml + "\n")
        assert msg in cli_error(t + ["-c", tmp_path / "c.yaml", "--model", model] + cifar, capsys), msg
    assert not (tmp_path / "o").exists()

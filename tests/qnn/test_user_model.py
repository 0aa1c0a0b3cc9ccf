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

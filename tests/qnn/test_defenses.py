import pytest

from qnn.config import TrainConfig
from qnn.defenses import list_defenses, make_defense
from qnn.errors import QNNError
from qnn.models import create_model
from qnn.train import train
from tests.conftest import cli_error as _err, run_cli


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
                      out_dir=str(out), defense="qadtr"))
    st = torch.load(out / "last.pt", weights_only=True)["defense"]
    g = torch.Generator().manual_seed(0 + 4242)
    init = torch.rand(4, 3, 6, 6, generator=g)
    assert st["pool"].shape == init.shape and not torch.equal(st["pool"], init)



def test_defense_bad_inputs(tmp_path, capsys):
    base = ["train", "--model", "small_cnn", "--no-progress", "--out", tmp_path / "x"]
    assert "unknown defense" in _err(base + ["--defense", "magic"], capsys)
    assert "lambda_gir" in _err(base + ["--defense", "qadtr", "--lambda-gir", "-1"], capsys)
    assert "pool size" in _err(base + ["--defense", "qadtr", "--pool-size", "0"], capsys)
    assert "empty" in _err(base + ["--defense", "qadtr", "--bits", ""], capsys)
    cfg = TrainConfig(model="small_cnn")
    with pytest.raises(QNNError):
        make_defense("qadtr", {"pool_size": -3}, cfg, create_model("small_cnn"))

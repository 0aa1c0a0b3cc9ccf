import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> Path:
    """A small switchable model trained briefly on the synthetic set at {2,4,8,32}."""
    from qnn.config import TrainConfig
    from qnn.train import train

    out = tmp_path_factory.mktemp("sw")
    train(TrainConfig(model="small_cnn", bits=[2, 4, 8, 32], epochs=3, n_synthetic=2000, batch_size=64,
                      out_dir=str(out), overwrite=True, progress=False, lr=0.1))
    return out / "model.pt"


def run_cli(args, capsys=None):
    from qnn.cli import main

    return main([str(a) for a in args])


def cli_error(args, capsys) -> str:
    """Run the CLI, assert a one-line `qnn: error:` message and exit 2; return the message."""
    rc = run_cli(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("qnn: error:") and "\n" not in err, err
    return err

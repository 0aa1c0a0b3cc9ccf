import pytest


def test_a_quantized_training_step_makes_no_host_syncs():
    """After the first forwards, a 4-bit training step reads nothing back from the model's device (on a GPU each such
    read stalls the launch queue; the quantizers used to make 52 per step). Counted on the CPU with the profiler."""
    import torch

    from qnn.bench.train_speed import model_at, profile_step

    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    r = profile_step(model_at("resnet20", 4, x), x, y)
    assert r["host_syncs"] == 0 and "aten::" in r["table"]


def test_cuda_without_a_gpu_is_refused(capsys):
    import torch

    from qnn.bench.train_speed import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["--device", "cuda", "--out", "/nonexistent/x"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_interleaved_run_writes_every_precision(tmp_path):
    import json

    from qnn.bench.train_speed import main

    assert main(["--threads", "1", "--batch", "4", "--warmup", "1", "--iters", "2", "--model", "small_cnn",
                 "--out", str(tmp_path / "ts")]) == 0
    r = json.loads((tmp_path / "ts_small_cnn.json").read_text())
    assert set(r["ms_per_step"]) == {"32", "8", "4", "2"} and r["ratio"]["32"] == 1.0
    assert "interleaved" in (tmp_path / "ts_small_cnn.md").read_text()

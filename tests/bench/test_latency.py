import json


def test_latency_runs_on_a_zoo_model(tmp_path):
    """bench/latency.py end to end on a small model: integer and float ONNX, MAC count, results files."""
    from qnn.bench.latency import main

    out = tmp_path / "lat"
    assert main(["--models", "small_cnn", "--bits", "4", "--batches", "1", "--threads", "1", "--iters", "1",
                 "--warmup", "0", "--out", str(out)]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    (row,) = r["results"]
    assert row["model"] == "small_cnn" and row["bits"] == 4 and row["macs_per_image"] > 0
    assert row["ort_int_ms"] > 0 and row["ort_float_ms"] > 0
    assert "--models small_cnn" in r["command"] and out.with_suffix(".png").is_file()


def test_peer_latency_times_ours_against_ort_static_quantization(tmp_path):
    """bench/peer_latency.py end to end on a small model: our integer export, ORT's quantize_static of the same float
    network and ORT float, timed in one process."""
    from qnn.bench.peer_latency import main

    out = tmp_path / "peer"
    assert main(["--models", "small_cnn", "--batches", "1", "--threads", "1", "--rounds", "2", "--warmup", "0",
                 "--n-calib", "32", "--data-dir", str(tmp_path / "none"), "--out", str(out)]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    (row,) = r["results"]
    assert set(row["ms"]) == {"ours int", "ours full-range", "ORT quantize_static", "ORT float"}
    assert all(v > 0 for v in row["ms"].values()) and row["ours_vs_ort_quant"] > 0 and row["full_range_vs_ort_quant"] > 0
    assert "peer_latency.py" in r["command"] and r["accuracy"] is None
    # the accuracy comparison needs both checkpoints
    assert main(["--models", "small_cnn", "--accuracy-qat", "x.pt", "--out", str(out)]) == 2

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

"""bench/certify_table.py on a model trained briefly on the synthetic set: PyTorch's certificates equal ORT's on
every image, cells resume, a file of other settings is refused."""

from __future__ import annotations

import json

from qnn.bench import certify_table


def _args(ckpt, out, *more):
    return ["--masking", str(ckpt), "--qat", str(ckpt), "--dataset", "synthetic", "--n", "6", "--bits", "32,4",
            "--patch-sizes", "12", "--mask-positions", "2", "--latency-images", "2", "--cross-check-iters", "1",
            "--ensemble-at", "4:12", "--protocol", "smoke", "--threads", "1", "--out", str(out), *more]


def test_certify_table_runs_resumes_and_refuses_other_settings(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "ct"
    assert certify_table.main(_args(trained_ckpt, out, "--methods", "patchcleanser")) == 0
    res = json.loads((tmp_path / "ct.json").read_text())
    cells = res["cells"]
    assert set(cells) == {"masking/patchcleanser/32/12", "masking/patchcleanser/4/12", "qat/patchcleanser/32/12",
                          "qat/patchcleanser/4/12"}
    c = cells["masking/patchcleanser/4/12"]
    assert c["ort"]["n_equal"] == 6 and c["ort"]["fully_integer"] and c["ort"]["latency_ms_p50"] > 0
    assert c["cross_check"]["violations"] == 0 and c["ensemble_cross_check"]["violations"] == 0
    assert "ort" not in cells["masking/patchcleanser/32/12"] and len(c["certified"]) == 6
    assert (tmp_path / "ct.md").read_text().startswith("# Certified") and (tmp_path / "ct.png").stat().st_size > 0
    before = (tmp_path / "ct.json").read_text()
    capsys.readouterr()
    assert certify_table.main(_args(trained_ckpt, out, "--methods", "patchcleanser,certmask")) == 0
    assert "4 of 8 cells left" in capsys.readouterr().err
    res = json.loads((tmp_path / "ct.json").read_text())
    assert {k: v for k, v in res["cells"].items() if "patchcleanser" in k} == json.loads(before)["cells"]
    assert res["cells"]["qat/certmask/4/12"]["ort"]["n_equal"] == 6
    kept = (tmp_path / "ct.json").read_bytes()
    assert certify_table.main(_args(trained_ckpt, out, "--mask-positions", "3")) == 2
    assert "other settings" in capsys.readouterr().err and (tmp_path / "ct.json").read_bytes() == kept

import json

import pytest

from tests.conftest import ROOT  # noqa: F401  (puts the repository on sys.path)


def test_left_out_clean_pairs_seeds_against_the_baseline(trained_ckpt, tmp_path, capsys):
    """Two settings from one runs folder layout plus an --add entry: per-seed accuracies, their mean, and the paired
    difference to the baseline (zero here: both settings are the same checkpoint; 3 and 5 bits are re-calibrated)."""
    from qnn.bench.left_out_clean import main

    runs = tmp_path / "runs"
    for s in ("none", "qadtr x=1"):
        d = runs / s.replace(" ", "_") / "s1"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(trained_ckpt.read_bytes())
    out = tmp_path / "res" / "lo"
    rc = main(["--budget", "smoke", "--runs-dir", str(runs), "--settings", "none,qadtr x=1", "--seeds", "1",
               "--add", f"none:0={trained_ckpt}", "--add", f"qadtr x=1:0={trained_ckpt}", "--bits", "3,5",
               "--out", str(out)])
    assert rc == 0
    r = json.loads((tmp_path / "res" / "lo.json").read_text())
    q, n = r["summary"]["qadtr x=1"]["3"], r["summary"]["none"]["3"]
    assert q["n_seeds"] == 2 and q["n_paired"] == 2 and q["diff_vs_baseline"] == 0.0
    assert set(q["per_seed"]) == {"0", "1"} and q["per_seed"]["0"] == q["per_seed"]["1"] == q["mean"]
    assert n["diff_vs_baseline"] is None and 0 <= n["mean"] <= 100
    assert "qadtr x=1" in (tmp_path / "res" / "lo.md").read_text()


@pytest.mark.parametrize("args,msg", [
    (["--add", "none:0=/nonexistent/model.pt"], "checkpoint not found"),
    (["--add", "none=/x.pt"], "SETTING:SEED=PATH"),
    (["--settings", "none"], "--settings needs --runs-dir"),
    ([], "no checkpoints"),
    (["--budget", "huge", "--add", "none:0=x"], "unknown budget"),
])
def test_left_out_clean_bad_input_one_line_exit_2(tmp_path, capsys, args, msg):
    from qnn.bench.left_out_clean import main

    out = tmp_path / "lo"
    assert main(["--budget", "smoke", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "lo.json").exists()


def test_left_out_clean_corrupt_checkpoint_is_refused(tmp_path, capsys):
    from qnn.bench.left_out_clean import main

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--budget", "smoke", "--add", f"none:0={bad}", "--out", str(tmp_path / "lo")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

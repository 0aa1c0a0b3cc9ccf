import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SWEEP = str(ROOT / "bench" / "defense_sweep.py")


def _run(*args, cwd=ROOT, timeout=900):
    return subprocess.run([sys.executable, SWEEP, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("grid,extra,msg", [
    (None, [], "grid file not found"),
    ("- {name: a, defense: none}\n- {name: a, defense: qadtr}\n", [], "appears twice"),
    ('- {name: "q g=1+2,3", defense: none}\n- {name: "q g=1+2+3", defense: qadtr}\n', [], "appears twice"),
    ("- {defense: none}\n", [], "needs 'name' and 'defense'"),
    ("[unclosed\n", [], "not valid YAML"),
    ("- {name: a, defense: none, bits: []}\n", [], "bits must be"),
    ("- {name: a, defense: none, epochs: 0}\n", [], "epochs must be"),
    ("- {name: a, defense: none, train: {batch_size: 8}}\n", [], "train may change only"),
    ("- {name: a, defense: none, deploy: 1}\n", [], "deploy must be"),
    ("- {name: a, defense: pbat, bits: per-bit, deploy: true}\n", [], "deploy must be"),
    ("- {name: a, defense: none}\n", ["--shard", "3/2"], "--shard"),
    ("- {name: a, defense: none}\n", ["--seeds", "x"], "--seeds"),
    ("- {name: a, defense: none}\n", ["--budget", "huge"], "unknown budget"),
])
def test_bad_input_one_line_exit_2(tmp_path, grid, extra, msg):
    g = tmp_path / "g.yaml"
    if grid is not None:
        g.write_text(grid)
    r = _run("--grid", str(g), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), *extra, timeout=120)
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o.json").exists()


def test_sharded_sweep_merges_per_bit_models_and_resumes(tmp_path):
    """Two shards share the jobs; the report merges PBAT's per-bit models into one row; a re-run trains nothing."""
    g = tmp_path / "g.yaml"
    g.write_text("- {name: none, defense: none}\n"
                 "- {name: pbat, defense: pbat, args: {iters: 1, patch_size: 6}, bits: per-bit}\n"
                 "- {name: qadtr, defense: qadtr, args: {patch_size: 6}}\n")
    common = ["--budget", "smoke", "--grid", str(g), "--seeds", "0", "--runs-dir", str(tmp_path / "runs")]
    for shard in ("0/2", "1/2"):
        r = _run(*common, "--shard", shard, "--out", str(tmp_path / "shard"))
        assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "shard.json").exists()  # a shard reports but does not write the merged results
    r = _run(*common, "--out", str(tmp_path / "all"))
    assert r.returncode == 0 and "== train" not in r.stdout, r.stdout[-2000:]
    s = json.loads((tmp_path / "all.json").read_text())["summary"]
    assert list(s) == ["none", "pbat", "qadtr"]
    assert set(s["pbat"]["per_bits"]) == {"32", "8", "4", "2"} and set(s["qadtr"]["per_bits"]) == {"32", "8", "4", "2"}
    assert s["none"]["cost_vs_none"] == pytest.approx(1.0) and s["qadtr"]["cost_vs_none"] > 0
    assert all(0 <= r["unseen_asr_pct"] <= 100 and r["n_seeds"] == 1 and r["unseen_asr_sd"] is None
               for r in s["qadtr"]["per_bits"].values())
    assert "| qadtr |" in (tmp_path / "all.md").read_text()


def test_a_finished_job_run_with_other_options_is_refused(tmp_path):
    """A cached job folder whose recorded options differ from the grid's is stale: refused, not silently reused."""
    import json

    import pytest

    from qnn.bench.defense_sweep import run_job
    from qnn.errors import QNNError

    d = tmp_path / "qadtr" / "s0"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"args": {"pool_size": 2}, "per_bits": {}}))
    job = {"key": "qadtr/s0", "name": "qadtr", "defense": "qadtr", "args": {"pool_size": 4}, "bits": [2, 32], "seed": 0}
    with pytest.raises(QNNError, match="other options|was run with options"):
        run_job(job, {}, None, tmp_path, "cpu", 1)
    job["args"] = {"pool_size": 2}
    assert run_job(job, {}, None, tmp_path, "cpu", 1)["args"] == {"pool_size": 2}
    job["train"] = {"lr": 0.05}  # same defense options, other training settings: stale too
    with pytest.raises(QNNError, match="was run with options"):
        run_job(job, {}, None, tmp_path, "cpu", 1)


def test_train_overrides_reach_the_training_config():
    """A setting's `train: {lr: ...}` changes the budget's TrainConfig for that setting only."""
    from qnn.bench.defense_table import BUDGETS, budget_config

    b = BUDGETS["smoke"]
    assert budget_config(b, "none", {}, [4], 1, 1, "cpu").lr == b["lr"]
    assert budget_config(b, "none", {}, [4], 1, 1, "cpu", train_over={"lr": 0.3}).lr == 0.3
    assert budget_config(b, "none", {}, [2, 4], 1, 1, "cpu", train_over={"schedule": "round_robin"}).schedule == "round_robin"


def test_report_splits_unseen_asr_by_configuration_averaged_over_seeds(tmp_path):
    """aggregate(): each unseen configuration's ASR is averaged over seeds and printed, a column per (bits, config)."""
    from qnn.bench.defense_sweep import aggregate
    from qnn.bench.defense_table import BUDGETS, unseen_of

    each = {0: [30.0, 10.0, 2.0], 1: [20.0, 14.0, 4.0]}
    for seed, e in each.items():
        d = tmp_path / "q" / f"s{seed}"
        d.mkdir(parents=True)
        r = {"clean_acc_pct": 80.0, "seen_asr_pct": 5.0, "adaptive_asr_pct": 6.0, "unseen_asr_pct": sum(e) / 3,
             "unseen_asr_pct_each": e}
        (d / "eval.json").write_text(json.dumps({"args": {}, "per_bits": {"4": r}, "epoch_seconds": 1.0}))
    grid = [{"name": "q", "defense": "qadtr", "args": {}, "bits": [4]}]
    summary, md = aggregate(grid, tmp_path, [4], cost=False, seeds=[0, 1], unseen=unseen_of(BUDGETS["smoke"]))
    assert summary["q"]["per_bits"]["4"]["unseen_asr_pct_each"] == pytest.approx([25.0, 12.0, 3.0])
    assert summary["q"]["per_bits"]["4"]["unseen_asr_pct_by_seed"] == pytest.approx({"0": 14.0, "1": 38.0 / 3})
    assert "| 4b 10x10 sq | 4b 6.25% circ | 4b 8x8 sq fixed |" in md and "| q | 25.0 | 12.0 | 3.0 |" in md


@pytest.mark.parametrize("grid", sorted((ROOT / "bench" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_grid_loads(grid):
    """The grids in bench/sweeps/ are commands the README and results cite: each must pass load_grid's checks,
    and each setting's defense options must be ones its defense reads."""
    from qnn.bench.defense_sweep import load_grid
    from qnn.defenses import _DEFENSES, list_defenses

    for g in load_grid(str(grid)):
        assert g["defense"] in list_defenses()
        _DEFENSES[g["defense"]].Options.from_args(g["args"], g["defense"])  # names, types and ranges


def test_report_header_names_settings_with_their_own_epochs(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text("- {name: a, defense: none}\n- {name: b, defense: qadtr, epochs: 3}\n")
    r = _run("--grid", str(g), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--report-only",
             timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 epoch(s) unless a setting says otherwise (b: 3)" in (tmp_path / "o.md").read_text()


def test_deploy_evaluates_one_model_at_every_bit_width(tmp_path):
    """`deploy: true`: a model trained at 32 bits only is evaluated at every evaluated bit-width (BN re-calibrated),
    with the adaptive patch EOT over all of them; the same folder under deploy: false is refused as stale."""
    from qnn.bench.defense_sweep import aggregate, load_grid

    g = tmp_path / "g.yaml"
    g.write_text("- {name: fp, defense: none, bits: [32], deploy: true}\n")
    common = ["--budget", "smoke", "--grid", str(g), "--seeds", "0", "--runs-dir", str(tmp_path / "runs"),
              "--no-cost", "--out", str(tmp_path / "o")]
    r = _run(*common)
    assert r.returncode == 0, r.stderr[-2000:]
    e = json.loads((tmp_path / "runs" / "fp" / "s0" / "eval.json").read_text())
    assert e["trained_bits"] == [32] and e["deployed_bits"] == [32, 8, 4, 2]
    assert set(e["per_bits"]) == {"32", "8", "4", "2"}
    assert all("adaptive_asr_pct" in v and 0 <= v["unseen_asr_pct"] <= 100 for v in e["per_bits"].values())
    # the low-bit rows are the 32-bit model re-calibrated, not copies of its 32-bit figures
    assert e["per_bits"]["2"]["clean_acc_pct"] != e["per_bits"]["32"]["clean_acc_pct"]
    g.write_text("- {name: fp, defense: none, bits: [32]}\n")
    with pytest.raises(Exception, match="deploy True"):
        aggregate(load_grid(str(g)), tmp_path / "runs", [32, 8, 4, 2], cost=False, seeds=[0])

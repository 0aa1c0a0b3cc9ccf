"""The defense-grid runner behind bench/defense_table.py: rows, compute matching, cells, resume, refusals, statistics."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

TABLE = str(ROOT / "bench" / "defense_table.py")
GRID = """\
- {name: none, defense: none}
- {name: qadtr, defense: qadtr, args: {gir_every: 4}}
- {name: pbat, defense: pbat, args: {iters: 2, patch_size: 6}, bits: per-bit}
- {name: pbat at qadtr's compute, defense: pbat, args: {iters: 2, patch_size: 6}, bits: per-bit, compute: qadtr}
"""


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, TABLE, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke table: four rows (a compute-matched per-bit one among them), seed 0, two scored bit-widths."""
    d = tmp_path_factory.mktemp("table")
    (d / "g.yaml").write_text(GRID)
    args = ["--budget", "smoke", "--grid", str(d / "g.yaml"), "--runs-dir", str(d / "runs"), "--out", str(d / "t"),
            "--bits", "32,4,3"]
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, args, r


def test_every_cell_is_written_with_its_provenance(smoke):
    d, _, _ = smoke
    res = json.loads((d / "t.json").read_text())
    cells = res["cells"]
    from qnn.evaluation import PROTOCOLS, decode_scores

    proto = PROTOCOLS["smoke"]
    members = {m.name for m in proto.members}
    # switchable rows: every member at 32 and 4 bits on both unseen configurations and the seen one, plus the
    # left-out 3 bits on the 10x10; per-bit rows: no EOT member (one precision), no left-out bit-width
    for row in ("none", "qadtr"):
        for b in (32, 4):
            for c in ("10x10 sq", "6.25% circ", "6x6 sq (seen)"):
                assert {k.split(" | ")[-1] for k in cells if k.startswith(f"{row} | seed 0 | {b} bits | {c} |")} == members
        assert f"{row} | seed 0 | 3 bits | 10x10 sq | adam 0.05" in cells
    for row in ("pbat", "pbat at qadtr's compute"):
        got = {k.split(" | ")[-1] for k in cells if k.startswith(f"{row} | seed 0 | 4 bits | 10x10 sq |")}
        assert got == members - {"adam 0.05 EOT bit-widths"}
        assert not any(k.startswith(f"{row} | seed 0 | 3 bits") for k in cells)
    for k, c in cells.items():
        f = decode_scores(c["scores"])
        assert len(f) == proto.n_score and f.max() <= proto.placements
        ok = f >= 0
        assert c["asr_pct"] == pytest.approx(100 * f[ok].sum() / (proto.placements * ok.sum()))
        assert c["clean_acc_pct"] == pytest.approx(100 * ok.mean())
        assert len(c["checkpoint_sha256"]) == 64 and len(c["weights_sha256"]) == 64 and c["code"]["code_hash"] and c["row_definition"]["name"] == c["row"]
        assert c["score_seconds"] > 0 and c["train_seconds"] > 0
    # an EOT patch is crafted once and scored at every bit-width, the left-out one too: one crafting for its cells
    eot = [c for k, c in cells.items() if k.startswith("qadtr | seed 0 |") and k.endswith("| 10x10 sq | adam 0.05 EOT bit-widths")]
    assert len(eot) == 3 and len({c["seconds"] for c in eot}) == 1 and {c["crafted_at"] for c in eot} == {"EOT"}
    assert len({c["patch_mean"] for c in eot}) == 1


def test_compute_matched_row_gets_its_targets_compute(smoke):
    d, _, _ = smoke
    cells = json.loads((d / "t.json").read_text())["cells"]
    ratios = json.loads((d / "runs" / "cost.json").read_text())["ratio_vs_qat"]
    qadtr = next(c for c in cells.values() if c["row"] == "qadtr")["compute_qat_epochs"]
    matched = {}
    for c in cells.values():
        if c["row"] == "pbat at qadtr's compute":
            matched[str(c["trained_bits"])] = c["compute_qat_epochs"]
    # only the scored bit-widths' models are in the cells, but every one of the four was trained on the same share
    assert len(matched) == 2 and all(v > 0 for v in matched.values())
    pbat_keys = [k for k in ratios if '"pbat"' in k]
    share = qadtr / sum(ratios[k] for k in pbat_keys)
    for bits, v in matched.items():
        key = next(k for k in pbat_keys if f'"bits": {bits}' in k)
        assert v == pytest.approx(ratios[key] * share, rel=0.05)  # rounded to whole images


def test_rerun_keeps_finished_cells(smoke):
    d, args, _ = smoke
    before = (d / "t.json").read_text()
    r = _run(*args)
    assert r.returncode == 0 and "0 cells left" in r.stdout and "== train" not in r.stdout
    assert json.loads((d / "t.json").read_text())["cells"] == json.loads(before)["cells"]
    # --plan prints what is left and touches nothing
    r = _run(*args, "--plan")
    assert r.returncode == 0 and "0 cells left" in r.stdout and (d / "t.json").read_text() == before


def test_a_lost_checkpoint_retrained_to_the_bit_keeps_its_cells_and_other_weights_do_not(smoke, tmp_path):
    """Cells are keyed on the weights, not the checkpoint file (which also holds timings): runs/ can be lost. A lost
    model with every cell finished is not retrained; one with cells left is, and its finished cells are kept."""
    import shutil

    d, args, _ = smoke
    runs = tmp_path / "runs"
    shutil.copytree(d / "runs", runs)
    shutil.copy(d / "t.json", tmp_path / "t.json")
    other = [{str(d / "runs"): str(runs), str(d / "t"): str(tmp_path / "t")}.get(a, a) for a in args] + ["--rows", "none"]
    (folder,) = [p for p in runs.iterdir() if p.name.startswith("none_s0_")]
    old_file = (folder / "model.pt").read_bytes()
    shutil.rmtree(folder)
    before = json.loads((d / "t.json").read_text())["cells"]
    r = _run(*other)
    assert r.returncode == 0 and "0 cells left" in r.stdout and "0 of 1 models to train" in r.stdout, r.stderr[-2000:]
    assert "== train" not in r.stdout and not folder.exists()
    assert json.loads((tmp_path / "t.json").read_text())["cells"] == before
    # one cell lost too: the model is retrained to the bit, that cell comes back the same, the others are kept
    res = json.loads((tmp_path / "t.json").read_text())
    lost = next(k for k in before if k.startswith("none | seed 0 | 4 bits | 10x10 sq |"))
    del res["cells"][lost]
    (tmp_path / "t.json").write_text(json.dumps(res))
    r = _run(*other)
    assert r.returncode == 0 and "1 of 1 models to train" in r.stdout, r.stderr[-2000:]
    assert (folder / "model.pt").read_bytes() != old_file  # retrained: same weights, other timings
    after = json.loads((tmp_path / "t.json").read_text())["cells"]
    assert {k: c for k, c in after.items() if k != lost} == {k: c for k, c in before.items() if k != lost}
    assert all(after[lost][f] == before[lost][f] for f in ("scores", "asr_pct", "weights_sha256", "patch_mean"))
    # a cell whose weights differ from the model's is done again
    key = next(k for k in after if k.startswith("none | seed 0 | 4 bits | 10x10 sq |") and k != lost)
    res = json.loads((tmp_path / "t.json").read_text())
    res["cells"][key]["weights_sha256"] = "0" * 64
    (tmp_path / "t.json").write_text(json.dumps(res))
    r = _run(*other)
    assert r.returncode == 0 and key in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "t.json").read_text())["cells"][key]["weights_sha256"] == before[key]["weights_sha256"]


def test_file_of_another_protocol_or_malformed_cell_is_refused(smoke, tmp_path):
    d, args, _ = smoke
    other = [a if a != str(d / "t") else str(tmp_path / "t") for a in args]
    res = json.loads((d / "t.json").read_text())
    (tmp_path / "t.json").write_text(json.dumps({**res, "protocol": {**res["protocol"], "placements": 9}}))
    r = _run(*other)
    assert r.returncode == 2 and "made with another protocol" in r.stderr and r.stderr.count("\n") == 1
    key = next(iter(res["cells"]))
    for bad in (100.5, -1, "12", float("nan")):
        cells = dict(res["cells"])
        cells[key] = {**cells[key], "asr_pct": bad}
        (tmp_path / "t.json").write_text(json.dumps({**res, "cells": cells}))
        before = (tmp_path / "t.json").read_bytes()
        r = _run(*other)
        assert r.returncode == 2 and any(w in r.stderr for w in ("malformed", "percentage", "finite")) \
                and r.stderr.count("\n") == 1, r.stderr
        assert (tmp_path / "t.json").read_bytes() == before


def test_report_has_verdicts_masking_and_plot(smoke):
    d, _, _ = smoke
    md = (d / "t.md").read_text()
    assert "QADT-R minus per-bit PBAT" in md and "qadtr - pbat at qadtr's compute" in md
    assert (d / "t.png").stat().st_size > 1000
    from qnn.defense_report import hours_by_seed

    res = json.loads((d / "t.json").read_text())
    h = hours_by_seed(res)["0"]
    n_models = len({c["checkpoint_sha256"] for c in res["cells"].values()})
    # every model's training once (not once per cell), every cell scored, crafting below the cells' sum (EOT shares)
    assert h["models"] == h["models_timed"] == n_models and h["cells"] == h["cells_timed"] == len(res["cells"])
    train = {c["checkpoint_sha256"]: c["train_seconds"] for c in res["cells"].values()}
    assert h["train_h"] == pytest.approx(sum(train.values()) / 3600)
    assert 0 < h["craft_h"] < sum(c["seconds"] for c in res["cells"].values()) / 3600
    assert "Hours of the machine spent, per seed" in md


@pytest.mark.parametrize("grid,extra,msg", [
    (None, [], "grid file not found"),
    ("- {name: a, defense: none}\n- {name: a, defense: qadtr}\n", [], "appears twice"),
    ("- {defense: none}\n", [], "needs 'name' and 'defense'"),
    ("[unclosed\n", [], "not valid YAML"),
    ("- {name: a, defense: none, bits: []}\n", [], "bits must be"),
    ("- {name: a, defense: none, epochs: 0}\n", [], "epochs must be"),
    ("- {name: a, defense: none, train: {batch_size: 8}}\n", [], "train may change only"),
    ("- {name: a, defense: pbat, bits: per-bit, deploy: true}\n", [], "deploy must be"),
    ("- {name: a, defense: none, compute: b}\n", [], "compute must name another row"),
    ("- {name: a, defense: none, colour: red}\n", [], "unknown field"),
    ("- {name: a, defense: none}\n", ["--seeds", "x"], "--seeds"),
    ("- {name: a, defense: none}\n", ["--rows", "b"], "no row b"),
    ("- {name: a, defense: none}\n", ["--configs", "3x3"], "--configs: unknown"),
    ("- {name: a, defense: none}\n", ["--protocol", "huge"], "unknown evaluation protocol"),
])
def test_bad_input_one_line_exit_2(tmp_path, grid, extra, msg):
    g = tmp_path / "g.yaml"
    if grid is not None:
        g.write_text(grid)
    r = _run("--grid", str(g), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), *extra, timeout=120)
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "runs").exists()


def test_unknown_budget_is_refused():
    r = _run("--budget", "huge")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_statistics_on_hand_made_cells():
    """The verdict's arithmetic on two rows with known per-image outcomes: a paired t interval over seeds and a
    bootstrap over images, both of the maximum over attacks."""
    from qnn.defense_report import EQUAL_COMPUTE, paired_t, summarize, verdict
    from qnn.evaluation import encode_scores

    a, b = EQUAL_COMPUTE[0]
    rng = np.random.default_rng(0)
    cells = {}
    for seed in (0, 1, 2):
        for row, p in ((a, 0.1), (b, 0.4)):
            for cfg in ("10x10 sq", "6.25% circ"):
                for att in ("s", "t"):
                    f = rng.binomial(1, p if att == "s" else p / 2, 400)
                    cells[f"{row}{seed}{cfg}{att}"] = {
                        "row": row, "seed": seed, "bits": 4, "config": cfg, "attack": att, "scores": encode_scores(f),
                        "clean_acc_pct": 100.0, "trained_bits": [4], "compute_qat_epochs": 1.0,
                        "row_definition": {"deploy": False}, "checkpoint_sha256": f"{row}{seed}", "seconds": 1.0}
    res = {"protocol": {"placements": 1, "members": [{"name": "s"}, {"name": "t"}]}, "cells": cells,
           "grid": [{"name": a}, {"name": b}], "budget": {"left_out": [3], "eval_bits": [4]}}
    s = summarize(res, n_boot=200)
    c = s["comparisons"][0]
    assert c["bits"] == 4 and len(c["diff_by_seed"]) == 3 and -35 < c["mean_diff"] < -25
    assert c["t95"][1] < 0 and c["bootstrap95"][1] < 0 and verdict(c) == "QADT-R lower (better)"
    # the weaker attack reads each model about half: masking is named where the spread passes 5 points
    assert any(m["row"] == b and m["strong"] == "s" for m in s["masking"])
    lo, hi = paired_t([1.0, 2.0, 3.0])
    assert lo == pytest.approx(2 - 4.303 / np.sqrt(3)) and hi == pytest.approx(2 + 4.303 / np.sqrt(3))

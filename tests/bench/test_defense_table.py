import json
import subprocess
import sys

from tests.conftest import ROOT


def test_unknown_budget_is_refused():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "defense_table.py"), "--budget", "huge"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown budget" in r.stderr and r.stderr.count("\n") == 1


def test_smoke_budget_end_to_end(tmp_path):
    """The smoke table runs end to end (trains 4 defenses briefly, attacks them) and writes its outputs."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "defense_table.py"), "--budget", "smoke",
                        "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((tmp_path / "t.json").read_text())["table"]
    assert set(t) == {"none", "pbat", "dwq", "qadtr"}
    # PBAT as the spec has it: one fixed-precision model per bit-width (no left-out bit-widths)
    assert set(t["pbat"]["models"]) == {"pbat@32", "pbat@8", "pbat@4", "pbat@2"}
    assert set(t["pbat"]["per_bits"]) == {"32", "8", "4", "2"}
    from qnn.bench.defense_table import BUDGETS, unseen_of

    n_unseen = len(unseen_of(BUDGETS["smoke"]))
    for name, e in t.items():
        assert set(e["per_bits"]) >= {"32", "8", "4", "2"} and (name == "pbat" or "3" in e["per_bits"])
        assert 0 <= e["per_bits"]["4"]["unseen_asr_pct"] <= 100 and "adaptive_asr_pct" in e["per_bits"]["2"]
        # ASR is the worst over the budget's ensemble, each attack's figure kept beside it
        r = e["per_bits"]["4"]
        assert set(r["seen_per_attack"]) == {"sign 0.05", "adam 0.05"}
        assert r["seen_asr_pct"] == max(r["seen_per_attack"].values())
        assert len(r["unseen_per_attack"]) == len(r["unseen_asr_pct_each"]) == n_unseen
        assert all(v == max(p.values()) for v, p in zip(r["unseen_asr_pct_each"], r["unseen_per_attack"]))
    md = (tmp_path / "t.md").read_text()
    assert md.count("|") > 20 and "total train cost" in md and (tmp_path / "t.png").is_file()
    # the unseen mean split by configuration: the qadtr row's 4-bit cells are its per-configuration ASRs
    section = md.split("by configuration")[1].split("All figures")[0]
    row = next(line for line in section.splitlines() if line.startswith("| qadtr |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    four = cells[1 + 2 * n_unseen:1 + 3 * n_unseen]  # columns: 32, 8, 4, 2 bits x configurations
    assert len(cells) == 1 + n_unseen * 4 and four == [f"{v:.1f}" for v in t["qadtr"]["per_bits"]["4"]["unseen_asr_pct_each"]]
    # the interleaved cost measurement: QAT is its own reference, the others are ratios to it
    cost = json.loads((tmp_path / "t.json").read_text())["cost_interleaved_vs_qat"]
    assert cost["none"] == 1.0 and set(cost) == {"none", "qadtr", "pbat (one 4-bit model)"} and cost["qadtr"] > 0
    assert "measured interleaved" in md


def test_defense_cost_bad_options_exit_2(capsys):
    from qnn.bench.defense_cost import main as cost_main

    assert cost_main(["--variants", "qadtr:{not json"]) == 2
    assert "bad options" in capsys.readouterr().err


def test_cpu_budget_has_a_longer_qadtr_row_within_pbats_compute():
    """The cpu/full tables add QADT-R trained 4x the epochs (still less compute than PBAT's four models)."""
    from qnn.bench.defense_table import BUDGETS, defenses

    for budget in ("cpu", "full"):
        d = defenses(BUDGETS[budget])
        dname, _, bits, extra = d["qadtr-4epochs (less compute than pbat)"]
        assert dname == "qadtr" and bits == [2, 4, 8, 32] and extra == {"epochs": 4 * BUDGETS[budget]["epochs"]}
    assert not any(len(v) > 3 for v in defenses(BUDGETS["smoke"]).values())


def test_cpu_budget_has_qadtr_per_bit_beside_pbat():
    """The no-DBWT ablation at every bit-width: one QADT-R model per precision, as the spec's PBAT is trained."""
    from qnn.bench.defense_table import BUDGETS, PER_BIT, defenses

    for budget in ("cpu", "full"):
        d = defenses(BUDGETS[budget])
        assert d["qadtr-per-bit (no DBWT)"] == ("qadtr", {}, PER_BIT) and d["pbat"][2] == PER_BIT
    assert "qadtr-per-bit (no DBWT)" not in defenses(BUDGETS["smoke"])


def test_cpu_budget_has_one_full_precision_pbat_deployed_at_every_bit_width():
    """The spec's other reading of PBAT (one full-precision model) sits beside the per-bit PBAT models."""
    from qnn.bench.defense_table import BUDGETS, PBAT_FP, defenses

    for budget in ("cpu", "full"):
        d = defenses(BUDGETS[budget])
        assert d[PBAT_FP][0] == "pbat" and d[PBAT_FP][2] == [32] and d[PBAT_FP][3] == {"deploy": True}
        assert d[PBAT_FP][1] == d["pbat"][1]  # same PBAT options as the per-bit models
    assert PBAT_FP not in defenses(BUDGETS["smoke"])

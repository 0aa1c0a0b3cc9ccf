import subprocess
import sys

from tests.conftest import ROOT

SWEEP = str(ROOT / "bench" / "defense_sweep.py")


def test_sweep_needs_a_grid(tmp_path):
    r = subprocess.run([sys.executable, SWEEP, "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--grid is required" in r.stderr and r.stderr.count("\n") == 1


def test_sweep_is_the_table_runner_on_its_grid(tmp_path):
    """One row, one scored bit-width: the sweep trains it and writes the table runner's cells."""
    import json

    (tmp_path / "g.yaml").write_text("- {name: none, defense: none, bits: [4, 32]}\n")
    r = subprocess.run([sys.executable, SWEEP, "--grid", str(tmp_path / "g.yaml"), "--runs-dir", str(tmp_path / "runs"),
                        "--out", str(tmp_path / "o"), "--bits", "4", "--configs", "10x10 sq"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cells = json.loads((tmp_path / "o.json").read_text())["cells"]
    assert {c["row"] for c in cells.values()} == {"none"} and {c["bits"] for c in cells.values()} == {4}
    assert "python bench/defense_table.py" not in (tmp_path / "o.md").read_text()

import subprocess
import sys

from tests.conftest import ROOT


def test_refuses_a_budget_without_cifar10(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_data.py"), "--budget", "smoke", "--out", str(tmp_path / "g")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "CIFAR-10 one" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "g").exists()

"""The installed layout: one `qnn` namespace, with kernels/, export/ and bench/ inside it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_namespace(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: setuptools builds in the source tree, and a stale build/ would leak old files
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "results", "build", "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"qnn", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for f in ("qnn/kernels/reference.py", "qnn/export/onnx_export.py", "qnn/export/run_edge.py",
              "qnn/bench/run_edge.py",
              "qnn/configs/suite_unseen.yaml", "qnn/models/resnet.py", "qnn/attacks/patch.py"):
        assert f in names, f

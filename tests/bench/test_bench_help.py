"""Every benchmark program prints its --help (argparse formats each option's help text only then: a stray '%' in one
breaks it) and documents every option."""

import subprocess
import sys

from tests.conftest import ROOT

CODE = r"""
import argparse, contextlib, importlib.util, io, sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]) / "bench"))
bad, undocumented = [], []
real_parse = argparse.ArgumentParser.parse_args
def spy(self, *a, **k):
    for act in self._actions:
        if not act.help and not isinstance(act, argparse._HelpAction):
            undocumented.append(f"{current}: {'/'.join(act.option_strings) or act.dest}")
    return real_parse(self, *a, **k)
argparse.ArgumentParser.parse_args = spy
for f in sorted(Path(sys.argv[1], "bench").glob("*.py")):
    current = f.name
    spec = importlib.util.spec_from_file_location(f.stem, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "main"):
        continue
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            mod.main(["--help"])
        bad.append(f"{f.name}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None) or "usage" not in out.getvalue():
            bad.append(f"{f.name}: --help exit {e.code}")
    except Exception as e:
        bad.append(f"{f.name}: {type(e).__name__}: {e}")
print("BAD", bad)
print("UNDOCUMENTED", undocumented)
"""


def test_every_bench_program_prints_help():
    r = subprocess.run([sys.executable, "-c", CODE, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BAD []" in r.stdout, r.stdout
    assert "UNDOCUMENTED []" in r.stdout, r.stdout

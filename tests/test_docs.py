"""The README and docs stay true to the tree: short README, every path they name exists, every command in the
README parses, results/README.md indexes exactly the files under results/, and the rendered tables are current."""

from __future__ import annotations

import functools
import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), RESULTS / "README.md"]


def expand_braces(s: str) -> list[str]:
    """Shell-style brace expansion, `a{1,2}.{md,json}` -> four names; the docs write file families that way."""
    parts = re.split(r"\{([^{}]*,[^{}]*)\}", s)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def code_blocks(text: str) -> list[str]:
    """Fenced blocks and 4-space indented blocks of a markdown text, continuation lines joined."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    blocks += re.findall(r"(?:^ {4}\S[^\n]*\n?)+", outside, re.M)
    return [b.replace("\\\n", " ") for b in blocks]


def commands(text: str) -> list[list[str]]:
    """Each simple command in the code blocks, as argv; `&&`, `|` and `;` separate commands."""
    out = []
    for block in code_blocks(text):
        for line in block.splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars="&|;")
            lex.whitespace_split, lex.commenters = True, "#"
            argv: list[str] = []
            for tok in [*lex, ";"]:
                if tok in ("&&", "|", ";", "||", "&"):
                    if argv:
                        out.append(argv)
                    argv = []
                else:
                    argv.append(tok)
    return out


README_COMMANDS = commands((ROOT / "README.md").read_text())


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 130, f"README.md has {n} lines; the limit is 130 (move detail to docs/)"


def test_results_index_lists_every_file_both_ways():
    index = (RESULTS / "README.md").read_text()
    listed = set()
    for line in index.splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            for name in re.findall(r"`([^`]+)`", cells[1]):
                listed.update(expand_braces(name))
    # a live run's lock file (`.NAME.lock`, removed when the run ends; never committed) is not a result
    on_disk = {p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*")
               if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock"))} - {"README.md"}
    assert not on_disk - listed, f"files under results/ missing from results/README.md: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"results/README.md lists files that do not exist: {sorted(listed - on_disk)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_paths_named_in_docs_exist(doc):
    text = doc.read_text()
    missing = []
    for link in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+:", link) and not (doc.parent / link).exists():
            missing.append(link)
    # paths written in prose and commands are relative to the repository root
    for path in re.findall(r"(?<![\w/.-])((?:results|docs|bench)/[\w./{},*-]+)", text):
        for p in expand_braces(path.rstrip(".,")):
            # a path without extension is a benchmark's --out prefix: its .json/.md must exist
            if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists() or list(ROOT.glob(p + ".*"))):
                missing.append(p)
    assert not missing, f"{doc.name} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("argv", [c for c in README_COMMANDS if c[0] == "qnn"], ids=" ".join)
def test_readme_qnn_commands_parse(argv):
    from qnn.cli import build_parser

    parser, _ = build_parser()
    try:
        parser.parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"`{' '.join(argv)}` does not parse (exit {e.code})")


@functools.lru_cache(maxsize=None)
def script_help(script: Path) -> str:
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


SCRIPT_COMMANDS = [c for c in README_COMMANDS if c[0] in ("python", "python3") and len(c) > 1 and c[1].endswith(".py")]


@pytest.mark.parametrize("argv", SCRIPT_COMMANDS, ids=" ".join)
def test_readme_script_commands_use_existing_flags(argv):
    # on the Pi the README runs the bundle's copy of the edge runner (export/run_edge.py)
    script = ROOT / argv[1] if (ROOT / argv[1]).exists() else ROOT / "export" / Path(argv[1]).name
    assert script.exists(), argv[1]
    helptext = script_help(script)
    unknown = [a.split("=")[0] for a in argv[2:] if a.startswith("--") and a.split("=")[0] not in helptext]
    assert not unknown, f"{argv[1]} --help does not list {unknown}"


def test_readme_commands_were_found():
    # a README rewrite that loses its code blocks must not pass the two tests above vacuously
    assert any(c[:2] == ["qnn", "pipeline"] for c in README_COMMANDS)
    assert any(c[0] == "qnn" and "--model" in c and ".py:" in c[c.index("--model") + 1] for c in README_COMMANDS)
    assert SCRIPT_COMMANDS


def test_rendered_tables_are_current():
    from qnn.bench import render_docs

    assert render_docs.main(["--check"]) == 0, "run python bench/render_docs.py"

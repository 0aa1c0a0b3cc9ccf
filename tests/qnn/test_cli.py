"""The `qnn` command line documents itself: every option of every subcommand has a help line."""

import argparse

import pytest

from qnn.cli import build_parser, main


def _options(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, path + [name])
        elif action.dest != "help":
            yield " ".join(path), action


def test_every_option_has_help():
    parser, cmds = build_parser()
    seen = list(_options(parser, ["qnn"]))
    assert {p.split()[1] for p, _ in seen if " " in p} == set(cmds)
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in seen if not (a.help or "").strip()]
    assert not missing, missing


def test_train_help_lists_the_defense_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--defense", "--no-aqapa", "--no-gir", "--lambda-gir", "--pool-size", "--defense-arg"):
        assert opt in out, opt


def test_version(capsys):
    from qnn import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out

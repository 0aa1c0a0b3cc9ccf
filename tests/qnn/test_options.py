"""Settings declared once (`qnn.options`): every config's fields carry one default and one validation, and the
command-line flags are generated from them."""

import dataclasses

import pytest

from qnn.errors import QNNError


def _configs():
    from qnn.attacks.ensemble import Attack
    from qnn.attacks.patch import PatchConfig
    from qnn.config import TrainConfig
    from qnn.defenses import _DEFENSES  # importing the package registers every defense
    from qnn.evaluation import Protocol
    from qnn.quantization import QuantizeConfig

    defense_options = {cls.Options for cls in _DEFENSES.values()}
    return [TrainConfig, PatchConfig, QuantizeConfig, Attack, Protocol, *sorted(defense_options, key=str)]


def test_every_config_field_has_one_default_and_one_validation():
    """Declared with `option()`: a help line, a default where the field is not required, and a validation beyond
    its type (range, choices, or a check function) unless it is a free string (a path, a name) or a switch."""
    from qnn.options import default_of, is_option, value_type

    for cls in _configs():
        for f in dataclasses.fields(cls):
            where = f"{cls.__name__}.{f.name}"
            assert is_option(f), f"{where} is not declared with qnn.options.option()"
            assert f.metadata["help"].strip(), where
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            assert required == (cls.__name__ in ("Attack", "Protocol") and f.name in ("name", "members")), where
            m, kind = f.metadata, value_type(cls, f)
            checked = m["lo"] is not None or m["hi"] is not None or m["choices"] is not None or m["check"] is not None
            assert checked or kind in (str, bool), f"{where} ({kind.__name__}) has no validation"
            if not required and m["choices"] is not None:
                assert default_of(f) in m["choices"], where


def test_the_train_and_attack_flags_are_the_configs_fields():
    """`qnn train --help` and `qnn attack --help` list every command-line option of TrainConfig / PatchConfig with
    its help and the field's default; a flag left out means the field's default (argparse gives None)."""
    import argparse

    from qnn.attacks.cli import add_parser as add_attack
    from qnn.attacks.patch import PatchConfig
    from qnn.cli import _add_train
    from qnn.config import TrainConfig
    from qnn.options import default_of, flag_of

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    _add_train(sub)
    add_attack(sub)
    helps = {name: " ".join(p.format_help().split()) for name, p in sub.choices.items()}
    for cmd, cls in (("train", TrainConfig), ("attack", PatchConfig)):
        for f in dataclasses.fields(cls):
            if not f.metadata["cli"]:
                continue
            flag = flag_of(f)
            assert flag in helps[cmd], (cmd, flag)
            assert " ".join(f.metadata["help"].split())[:40] in helps[cmd], (cmd, flag)
            d = default_of(f)
            if d not in (None, False, True, [], {}):
                shown = ",".join(map(str, d)) if isinstance(d, list) else (f"{d:g}" if isinstance(d, float) else str(d))
                assert f"(default {shown})" in helps[cmd], (cmd, flag, shown)
    a = parser.parse_args(["train"])
    from qnn.options import given

    assert given(a, TrainConfig) == {}
    a = parser.parse_args(["train", "--epochs", "3", "--no-progress", "--out", "x"])
    assert given(a, TrainConfig) == {"epochs": 3, "progress": False, "out_dir": "x"}


def test_option_checks_run_in_python_yaml_and_flags_alike(tmp_path, capsys):
    from qnn.attacks.patch import PatchConfig
    from qnn.config import TrainConfig
    from tests.conftest import cli_error

    with pytest.raises(QNNError, match="momentum must be in"):
        TrainConfig(momentum=1.5)
    with pytest.raises(QNNError, match="unknown optimizer 'sgd'"):
        PatchConfig(optimizer="sgd")
    (tmp_path / "c.yaml").write_text("momentum: 1.5\n")
    assert "momentum must be in" in cli_error(["train", "-c", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "t")],
                                              capsys)
    assert "--momentum" in cli_error(["train", "--momentum", "1.5", "--out", str(tmp_path / "t")], capsys)
    assert not (tmp_path / "t").exists()


def test_a_frozen_config_is_checked_too():
    from qnn.attacks.ensemble import Attack
    from qnn.evaluation import Protocol

    assert Attack("a", step=1).step == 1.0 and isinstance(Attack("a", step=1).step, float)
    with pytest.raises(QNNError, match="placements must be in"):
        Protocol("p", (Attack("a"),), placements=10)
    with pytest.raises(QNNError, match="names must differ"):
        Protocol("p", (Attack("a"), Attack("a")))

"""Settings declared once. A config is a dataclass whose fields are made with `option()`: each carries its default, a
one-line help, the values it allows (a range, choices, or a check function) and how it is spelled on the command line.
`add_flags` writes a command's flags from the fields (so `qnn train --help` is `TrainConfig`), and `check_options`
validates an instance against them, whether its values came from flags, a YAML file or Python.

Flags are added with default None ("not given"), so that a config file's value or the field's own default applies:
each setting has one default, the field's.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from qnn.errors import QNNError
from qnn.validate import arg_float, arg_int, check_field_types, check_float, check_int


def option(default=dataclasses.MISSING, help: str = "", *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, choices=None, check=None, flag: str | None = None, cli: bool = True,
           factory=None):
    """A config field with its default (or `factory` for a mutable one) and its one-line `help`.

    Allowed values: numbers in [lo, hi] ((lo, hi] with `lo_open`), one of `choices`, and whatever `check(name, value)`
    accepts (it raises QNNError otherwise; a value it returns replaces the given one: a normalised form).
    `flag`: the command-line spelling when not --field-name (a bool that defaults to True is spelled --no-field-name,
    and its `help` says what that flag does);
    `cli=False`: a setting of config files and Python only."""
    if not help:
        raise ValueError("an option needs its help line")
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": tuple(choices) if choices else None,
            "check": check, "flag": flag, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_option(f: dataclasses.Field) -> bool:
    return "help" in f.metadata


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def value_type(cls, f: dataclasses.Field) -> type:
    """The field's type with Optional removed: bool, int, float, str, list, dict, tuple..."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def check_options(obj) -> None:
    """Validate every option of the dataclass instance `obj` in place: its type (`check_field_types`), range, choices
    and check function. One line (QNNError) naming the setting otherwise."""
    check_field_types(obj)
    for f in dataclasses.fields(obj):
        if not is_option(f):
            continue
        m, v = f.metadata, getattr(obj, f.name)
        if v is None:  # check_field_types refused None where the field is not optional
            continue
        if m["choices"] is not None and v not in m["choices"]:
            raise QNNError(f"unknown {f.name} {v!r}; choose from {', '.join(map(str, m['choices']))}")
        if m["check"] is not None:  # first: it may say more than the range (an open upper end, a normal form)
            got = m["check"](f.name, v)
            if got is not None:
                object.__setattr__(obj, f.name, v := got)  # frozen configs too
        if m["lo"] is not None or m["hi"] is not None:
            if value_type(type(obj), f) is float:
                object.__setattr__(obj, f.name, check_float(f.name, v, m["lo"], m["hi"], m["lo_open"]))
            else:
                check_int(f.name, v, m["lo"], m["hi"])


def flag_of(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    negated = default_of(f) is True
    return ("--no-" if negated else "--") + f.name.replace("_", "-")


def _shown(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def add_flags(parser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per command-line option of config class `cls` (all but `skip`), type- and range-checked by argparse
    where the field says so, default None (not given)."""
    for f in dataclasses.fields(cls):
        if not is_option(f) or not f.metadata["cli"] or f.name in skip:
            continue
        m, kind, default = f.metadata, value_type(cls, f), default_of(f)
        if kind is bool:
            parser.add_argument(flag_of(f), dest=f.name, action="store_false" if default else "store_true",
                                default=None, help=m["help"])
            continue
        typ = arg_int(m["lo"], m["hi"]) if kind is int else arg_float(m["lo"], m["hi"], m["lo_open"]) \
            if kind is float else str
        text = m["help"]
        if m["choices"] is not None:
            text += f": {' | '.join(map(str, m['choices']))}"
        if default is not None and default != [] and default != {}:
            text += f" (default {_shown(default)})"
        parser.add_argument(flag_of(f), dest=f.name, type=typ, metavar=flag_of(f).lstrip("-").replace("-", "_").upper(),
                            help=text)


def given(args, cls) -> dict:
    """The options of `cls` set on the command line (`args`: argparse's namespace): {field: value}."""
    names = {f.name for f in dataclasses.fields(cls) if is_option(f)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}

"""Checks of single values, shared by the command line (argparse types) and the config dataclasses.

Every number a user gives passes through here: a float must be finite and in its range, an int must be an int (not a
bool, not 1.9) and in its range. A bad value raises QNNError with one line naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from typing import Any

from qnn.errors import QNNError


def _range_text(lo, hi, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"<= {hi}"


MAX_SEED = 2**31 - 1  # seeds are multiplied and offset before they reach torch's 64-bit generators


def check_float(name: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite float (ints are accepted) within [lo, hi] (or (lo, hi] with lo_open)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise QNNError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise QNNError(f"{name} must be a finite number, got {v}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise QNNError(f"{name} must be {_range_text(lo, hi, lo_open)}, got {v}")
    return v


def check_int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool, not a float such as 1.9 or 2.0) within [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise QNNError(f"{name} must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise QNNError(f"{name} must be {_range_text(lo, hi, False)}, got {v}")
    return v


def _argtype(parse, check, describe: str):
    def convert(text: str):
        try:
            v = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {describe}, got {text!r}") from None
        try:
            return check(v)
        except QNNError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value ", "", 1)) from None

    convert.__name__ = describe  # argparse names the type in its messages
    return convert


def arg_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """argparse `type=`: a finite float in range (argparse then prints one line and exits 2)."""
    return _argtype(float, lambda v: check_float("value", v, lo, hi, lo_open), "a finite number")


def arg_int(lo: int | None = None, hi: int | None = None):
    """argparse `type=`: an int in range."""
    return _argtype(int, lambda v: check_int("value", v, lo, hi), "an integer")


def arg_seed():
    """argparse `type=`: a seed, 0..MAX_SEED."""
    return arg_int(0, MAX_SEED)


def check_field_types(obj) -> None:
    """Check each field of a config dataclass against its annotation (bool, int, float, str, optional of those):
    what a YAML file gives (`epochs: "three"`, `epochs: 1.9`, `epochs: true`, `lr: .nan`) is refused with one line.
    Fields of other types (lists, tuples, dicts) are checked by the dataclass itself."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, v = hints[f.name], getattr(obj, f.name)
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional else hint
        if v is None:
            if optional:
                continue
            raise QNNError(f"{f.name} must be given (got null)")
        if base is bool:
            if not isinstance(v, bool):
                raise QNNError(f"{f.name} must be true or false, got {v!r}")
        elif base is int:
            check_int(f.name, v)
        elif base is float:
            object.__setattr__(obj, f.name, check_float(f.name, v))  # frozen configs too
        elif base is str:
            if isinstance(v, os.PathLike):
                object.__setattr__(obj, f.name, os.fspath(v))
            elif not isinstance(v, str):
                raise QNNError(f"{f.name} must be a string, got {v!r}")

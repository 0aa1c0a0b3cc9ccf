"""Typed defense options: each defense's settings are one frozen dataclass, converted and range-checked here, in one
place, whether they come from `qnn train` flags, `--defense-arg KEY=VALUE`, a YAML config or Python."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from qnn.errors import QNNError
from qnn.options import check_options


def _cast(name: str, v, kind):
    """`v` as the field's type; one line naming the option otherwise."""
    bad = QNNError(f"defense option {name}={v!r} is not {'a list of ints' if kind is tuple else 'a ' + kind.__name__}")
    if kind is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise bad
    if kind is tuple:  # a list of ints: "5,6,7" or [5, 6, 7] or 5; "" = empty
        items = v.split(",") if isinstance(v, str) else (v if isinstance(v, (list, tuple)) else [v])
        try:
            return tuple(_cast(name, int(i) if isinstance(i, str) else i, int) for i in items if str(i).strip())
        except (QNNError, ValueError):
            raise bad from None
    if isinstance(v, bool) or (kind is int and isinstance(v, float)):
        raise bad
    try:
        v = kind(v)
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(v):
        raise QNNError(f"defense option {name}={v!r} must be a finite number")
    return v


class DefenseOptions:
    """Base of a defense's options dataclass (fields made with `option`)."""

    @classmethod
    def kinds(cls) -> dict[str, type]:
        """{name: bool | int | float | tuple (a list of ints)}; an Optional field counts as its inner type."""
        out = {}
        for name, hint in typing.get_type_hints(cls).items():
            inner = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
            out[name] = typing.get_origin(inner[0]) or inner[0]
        return out

    @classmethod
    def from_args(cls, args: dict | None, defense: str):
        """The options from a {name: value} mapping: unknown names, wrong types and values out of range are refused
        with one line."""
        kinds = cls.kinds()
        unknown = sorted(set(args or {}) - set(kinds))
        if unknown:
            raise QNNError(f"unknown option(s) for defense '{defense}': {', '.join(unknown)}; "
                           f"known: {', '.join(kinds) or 'none'}")
        opts = cls(**{k: _cast(k, v, kinds[k]) for k, v in (args or {}).items() if v is not None})
        try:
            check_options(opts)
        except QNNError as e:
            raise QNNError(f"defense '{defense}' option {e}") from None
        opts.check_given(frozenset(k for k, v in (args or {}).items() if v is not None))
        return opts

    def check_given(self, given: frozenset[str]) -> None:
        """Refuse options given together that contradict each other (`given`: the names set explicitly)."""

    @classmethod
    def describe(cls) -> dict[str, tuple[type, str, object, tuple]]:
        """{name: (type, help, default, (lo, hi, lo_open))} for the command line."""
        kinds = cls.kinds()
        return {f.name: (kinds[f.name], f.metadata["help"], f.default,
                         (f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open", False)))
                for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class NoOptions(DefenseOptions):
    """Plain QAT has no options."""

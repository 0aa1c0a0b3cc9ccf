"""Options that several commands add to their parsers: the commands live beside their code (`qnn.attacks.cli`,
`qnn.export.cli`, ...), below `qnn.cli`, which gathers them."""

from __future__ import annotations


def add_user_model_option(p) -> None:
    """--model for commands that load a checkpoint: needed (and checked) only for a user's own model file."""
    p.add_argument("--model", help="for a checkpoint trained from your own model: the same path/to/file.py:factory "
                                   "(a checkpoint never runs code by itself)")

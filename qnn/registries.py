"""Named registries: the defenses and the attacks are classes registered under the names users type."""

from __future__ import annotations


def registrar(table: dict[str, type]):
    """`register = registrar(TABLE)`; then `@register("name")` on a class puts it in TABLE under that name and sets
    its `name` attribute."""

    def register(name: str):
        def deco(cls):
            table[name] = cls
            cls.name = name
            return cls

        return deco

    return register

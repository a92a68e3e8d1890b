"""One registry type for everything that is "one file plus one line": losses, sources,
teachers.

    >>> colors = Registry("color")
    >>> @colors.register("red")
    ... def red():
    ...     return "#f00"
    >>> colors.names(), colors.lookup("red")()
    (['red'], '#f00')
    >>> colors.lookup("blue")
    Traceback (most recent call last):
    ...
    silverlabel.errors.UserError: unknown color 'blue' (known: red)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from silverlabel.errors import UserError


class Registry(dict):
    """``name -> entry`` in registration order, filled by :meth:`register`; ``modules`` (the
    files that register the built-in entries) are imported before the first lookup."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        super().__init__()
        self.kind = kind
        self.modules = modules

    def register(self, name: str, make: Callable[[Any], Any] | None = None) -> Callable:
        """Decorator: registers the decorated object (or ``make(obj)``) under ``name``."""

        def deco(obj):
            self[name] = obj if make is None else make(obj)
            return obj

        return deco

    def load(self) -> Registry:
        for module in self.modules:
            importlib.import_module(module)
        return self

    def names(self) -> list[str]:
        return list(self.load())

    def lookup(self, name: str) -> Any:
        if name not in self.load():
            raise UserError(f"unknown {self.kind} {name!r} (known: {', '.join(self)})")
        return self[name]

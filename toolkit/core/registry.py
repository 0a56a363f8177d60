"""Named parts (architectures, tasks): a registry from name to object, built-ins loaded lazily.

A built-in is one line, `name: "module:attribute"`, imported only when first asked for, so that
reading a recipe does not import every model. Anything else registers at run time with
`register` (a test's toy model, a user's plug-in module).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """A name nobody registered; the message lists the known ones (and the closest)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """name -> object. `what` names the recipe key that selects from it, for error messages."""

    def __init__(self, what: str, builtins: Mapping[str, str]) -> None:
        self.what = what
        self._builtins = dict(builtins)
        self._loaded: dict[str, T] = {}

    def names(self) -> list[str]:
        return sorted({*self._builtins, *self._loaded})

    def builtin_names(self) -> list[str]:
        """The names that come with the toolkit (what its documentation lists)."""
        return sorted(self._builtins)

    def registered(self) -> dict[str, T]:
        """The run-time registrations: name -> object."""
        return {name: obj for name, obj in self._loaded.items() if name not in self._builtins}

    def register(self, name: str, obj: T) -> T:
        """Make `obj` known as `name`; registering a name twice is a mistake, so it fails."""
        if name in self._loaded or name in self._builtins:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._loaded[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Forget a run-time registration (tests clean up after themselves)."""
        self._loaded.pop(name, None)

    def get(self, name: str) -> T:
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._builtins:
            raise UnknownName(self.unknown(name))
        module, _, attr = self._builtins[name].partition(":")
        obj = getattr(importlib.import_module(module), attr)
        self._loaded[name] = obj
        return obj

    def unknown(self, name: object) -> str:
        """`'x' is not one of: a, b; did you mean 'y'?` for an unregistered name."""
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{name!r} is not one of: {', '.join(known)}{hint}"

"""The registry: built-ins loaded on first use, run-time registration, no silent replacement."""

from __future__ import annotations

import sys

import pytest

from toolkit.core.registry import Registry


def test_builtins_are_imported_only_when_asked_for() -> None:
    reg = Registry("thing", {"json": "json:dumps", "lazy": "tests.unit.lazy_part:VALUE"})
    sys.modules.pop("tests.unit.lazy_part", None)
    assert reg.names() == ["json", "lazy"]
    assert "tests.unit.lazy_part" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        reg.get("lazy")  # the module does not exist: the import happens here, not before
    import json

    assert reg.get("json") is json.dumps


def test_registering_twice_is_refused_and_unregister_forgets() -> None:
    reg: Registry[int] = Registry("model.arch", {"mae": "json:dumps"})
    reg.register("toy", 1)
    with pytest.raises(ValueError, match=r"model\.arch 'toy' is already registered"):
        reg.register("toy", 2)
    with pytest.raises(ValueError, match="'mae' is already registered"):
        reg.register("mae", 3)  # a built-in cannot be shadowed either
    reg.unregister("toy")
    with pytest.raises(KeyError, match="'toy' is not one of: mae"):
        reg.get("toy")
    assert "did you mean 'mae'" in reg.unknown("maw")

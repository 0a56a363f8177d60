"""The README's and the architecture notes' table of tasks and architectures is the registries':
a part added (or renamed) without its row fails here, with the row to write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from toolkit.models import MODELS
from toolkit.tasks import TASKS
from toolkit.tasks.catalog import catalog

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_the_documented_table_is_the_registries(doc: str) -> None:
    text = (ROOT / doc).read_text()
    found = re.search(r"<!-- registries:.*?-->\n(.*?)\n<!-- /registries -->", text, flags=re.S)
    assert found, f"{doc}: no <!-- registries --> block"
    assert found.group(1) == catalog(), f"{doc}: write this table instead:\n{catalog()}"


def test_the_table_names_every_built_in_part() -> None:
    table = catalog()
    for name in (*TASKS.builtin_names(), *MODELS.builtin_names()):
        assert f"`{name}`" in table
    assert len(table.splitlines()) == 2 + len(TASKS.builtin_names())

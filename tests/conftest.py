"""Every test leaves this process as it found it: no rank environment, no process group."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# What a run in this process may set for itself; left behind, it turns every later command a
# test starts into a rank of a group that no longer exists (and wraps later models in DDP).
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "ACCELERATE_USE_DEEPSPEED")  # fmt: skip


@pytest.fixture(autouse=True)
def _leaves_no_rank_behind() -> Iterator[None]:
    before = {key: os.environ.get(key) for key in RANK_ENV}
    yield
    after = {key: os.environ.get(key) for key in RANK_ENV}
    changed = {key: (before[key], after[key]) for key in RANK_ENV if before[key] != after[key]}
    assert not changed, f"the test left the rank environment changed: {changed}"
    assert not torch.distributed.is_initialized(), "the test left a process group behind"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:  # fmt: skip
    """Registering is testing: once every collected test module is imported (and has registered
    what it registers), each (architecture, task) pair in the registries gets the basics of
    tests/e2e/test_registered.py as an item of its own, `test_basics[<arch>-<task>]`. Runs
    before `-k` and `-m` deselect (conftest hooks run before the built-in plugins'). The parts
    test modules registered are then forgotten, so that every other test sees the built-ins
    only; a basics item registers its part again while it runs."""
    from tests.e2e import test_registered as basics
    from toolkit.models import MODELS
    from toolkit.tasks import TASKS

    extra = {"models": MODELS.registered(), "tasks": TASKS.registered()}
    for name in extra["models"]:
        MODELS.unregister(name)
    for name in extra["tasks"]:
        TASKS.unregister(name)
    module = next((i.getparent(pytest.Module) for i in items
                   if getattr(i, "module", None) is basics), None)  # fmt: skip
    if module is None:
        return  # that file is not collected in this session
    last = max(i for i, item in enumerate(items) if item.getparent(pytest.Module) is module)
    made = []
    for arch, task in basics.pairs(extra):

        def test(tmp_path, capsys, arch=arch, task=task):
            with basics.registered(extra):
                basics.check_basics(arch, task, tmp_path, capsys)

        item = pytest.Function.from_parent(module, name=f"test_basics[{arch}-{task}]",
                                           callobj=test)  # fmt: skip
        made.append(item)
    items[last + 1 : last + 1] = made

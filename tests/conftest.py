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

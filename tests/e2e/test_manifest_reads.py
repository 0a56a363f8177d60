"""The shards' manifest is read once per job: a fresh training run, its resumption, the relaunch
of the finished run and an evaluation of it each read manifest.json once (at 1e5 shards one read
takes seconds)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DEBUG_RECIPE, make_shards, tiny
from toolkit import evaluate
from toolkit import train as train_cli
from toolkit.data.format import MANIFEST

pytestmark = pytest.mark.slow  # three short trainings and an evaluation: about 15 s


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many times manifest.json was read since the last call (read_manifest, by whatever
    name a module imported it, reads a local one through Path.read_bytes; read_text counted
    too, should any other code read it so)."""
    count = [0]

    def counting(method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self.name == MANIFEST:
                count[0] += 1
            return method(self, *args, **kwargs)

        return counted

    monkeypatch.setattr(Path, "read_text", counting(Path.read_text))
    monkeypatch.setattr(Path, "read_bytes", counting(Path.read_bytes))

    def since() -> int:
        n, count[0] = count[0], 0
        return n

    return since


def test_one_read_of_the_manifest_per_job(tmp_path: Path, reads: Callable[[], int]) -> None:
    shards = make_shards(tmp_path, 12, val_fraction=0.25, shard_size=4)
    run = tmp_path / "run"
    train = [str(DEBUG_RECIPE), *tiny(shards, run, "train.checkpoint_every=1")]
    reads()
    assert train_cli.main([*train, "train.max_steps=1"]) == 0
    assert reads() == 1  # start-up: relaunch check, preflight, loaders
    assert train_cli.main([*train, "train.max_steps=2"]) == 0
    assert reads() == 1  # ... and the finished check of the run it resumes
    assert train_cli.main([*train, "train.max_steps=2"]) == 0
    assert reads() == 1  # a finished run, left as it is
    assert evaluate.main([str(run)]) == 0
    assert reads() == 1  # the shards' check and the loader

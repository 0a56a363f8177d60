"""A checkpoint saved by 2 CPU processes (gloo), under DDP and under DeepSpeed ZeRO-2 and ZeRO-3:
no rank lists the checkpoint or stats a file another rank wrote, and COMPLETE still lists every
file with its size."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.slow

# The rank a per-rank file carries in its name (accelerate's RNG state, DeepSpeed's shards).
_RANK = re.compile(r"(?:zero_pp_rank_|random_states_)(\d+)")


def _writer(rel: str) -> int:
    """The rank that writes a checkpoint file: the one its name carries, else the main one."""
    m = _RANK.search(Path(rel).name)
    return int(m.group(1)) if m else 0


class _Calls:
    """os.stat and os.scandir, recorded while on, for paths under `root`."""

    def __init__(self, root: Path) -> None:
        self.root, self.on = str(root), False
        self.stats: list[str] = []
        self.lists: list[str] = []
        self._stat, self._scandir = os.stat, os.scandir
        os.stat, os.scandir = self._counted_stat, self._counted_scandir

    def _under(self, path: Any) -> str | None:
        if isinstance(path, int):  # a file descriptor
            return None
        text = os.fsdecode(os.fspath(path)) if path is not None else "."
        text = os.path.abspath(text)
        return text if self.on and text.startswith(self.root) else None

    def _counted_stat(self, path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if (text := self._under(path)) is not None:
            self.stats.append(text)
        return self._stat(path, *args, **kwargs)

    def _counted_scandir(self, path: Any = ".") -> Any:
        if (text := self._under(path)) is not None:
            self.lists.append(text)
        return self._scandir(path)


def _worker(rank: int, port: int, stage: int | None, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})  # fmt: skip
    from toolkit.core.schema import DeepSpeedConfig, TrainConfig
    from toolkit.engine.accel import Engine
    from toolkit.engine.checkpointer import Checkpointer
    from toolkit.engine.optim import build_scheduler
    from toolkit.engine.state import TrainState
    from toolkit.runs.recipe import SchedulerConfig

    ds = DeepSpeedConfig(zero_stage=stage) if stage is not None else None
    engine = Engine(TrainConfig(precision="no"), ds, micro_batch=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, SchedulerConfig(name="cosine"), steps_per_epoch=4,
                            total_steps=8)  # fmt: skip
    model, opt, sched = engine.prepare(model, opt, sched)
    ckpt = Checkpointer(engine, Path(out) / "run", keep_last=2, recipe_yaml="name: x\n")
    calls = _Calls(ckpt.root)
    save_state = engine.save_state

    def library_save(path: Path) -> None:  # what accelerate and DeepSpeed do is theirs
        calls.on = False
        save_state(path)
        calls.on = True

    engine.save_state = library_save  # type: ignore[method-assign]
    calls.on = True
    final = ckpt.save(TrainState(step=2, world_size=2))
    calls.on = False
    tmp = str(ckpt.root / f".tmp-{final.name}")
    seen = {"stats": [os.path.relpath(p, tmp) for p in calls.stats if p.startswith(tmp + os.sep)],
            "lists": [os.path.relpath(p, tmp) for p in calls.lists if p.startswith(tmp)]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    engine.close(model, opt, sched)


@pytest.mark.parametrize("stage", [None, 2, 3], ids=["ddp", "zero2", "zero3"])
def test_each_rank_stats_only_the_files_it_wrote(tmp_path: Path, stage: int | None) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, stage, str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    on_disk = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    listed = json.loads((ckpt / "COMPLETE").read_text())["files"]
    assert listed == {k: v for k, v in on_disk.items() if k != "COMPLETE"}
    assert any(_writer(f) == 1 for f in listed)  # rank 1 wrote files of its own
    for rank, calls in reversed(list(enumerate(seen))):
        others = sorted(f for f in calls["stats"] if _writer(f) != rank)
        assert not others, f"rank {rank} stat-ed files another rank wrote: {others}"
        mine = {f for f in listed if _writer(f) == rank}
        if rank:  # it gave the size of each file it wrote itself, and listed nothing
            assert set(calls["stats"]) >= mine and not calls["lists"], calls

"""The checkpointer on one CPU process: complete checkpoints and retention, damage, resume of
every named part, falling back past a checkpoint that will not load, the rescale to another
number of processes, frozen weights in the export, and reading weights back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from toolkit.core.errors import UserError
from toolkit.engine.accel import Engine
from toolkit.engine.checkpointer import (
    Checkpointer,
    Parts,
    complete_checkpoints,
    init_from,
    read_weights,
    rescale,
)
from toolkit.engine.optim import build_scheduler
from toolkit.engine.state import TrainState
from toolkit.runs.recipe import SchedulerConfig, TrainConfig


class Cursor:
    """The loader's part of a checkpoint: its epoch/batch cursor."""

    batches_per_epoch = 10

    def __init__(self) -> None:
        self.state = {"epoch": 0, "batch": 0}

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = dict(state)


def new_engine() -> Engine:
    return Engine(TrainConfig(precision="no"), None, micro_batch=1)


@pytest.fixture
def engine():
    e = new_engine()
    yield e
    e.abandon()


def relaunch(engine: Engine) -> Engine:
    """A new process's engine: accelerate counts the models prepared in it."""
    engine.abandon()
    return new_engine()


def parts(engine: Engine, seed: int = 0) -> Parts:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, SchedulerConfig(name="cosine"), steps_per_epoch=10,
                            total_steps=100)  # fmt: skip
    model, opt, sched = engine.prepare(model, opt, sched)
    return Parts(model, opt, sched, Cursor())


def step(p: Parts) -> None:
    p.model(torch.rand(5, 3)).square().mean().backward()
    p.optimizer.step()
    p.optimizer.zero_grad()
    p.scheduler.step()


def test_save_writes_complete_checkpoints_and_keeps_the_last_ones(engine, tmp_path) -> None:
    ckpt = Checkpointer(engine, tmp_path, keep_last=2, recipe_yaml="name: x\n")
    p = parts(engine)
    for s in (1, 2, 3):
        step(p)
        ckpt.save(TrainState(step=s))
    names = sorted(d.name for d in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000002", "step-00000003"]
    assert (tmp_path / "checkpoints/latest").read_text() == "step-00000003\n"
    newest = tmp_path / "checkpoints/step-00000003"
    listed = json.loads((newest / "COMPLETE").read_text())["files"]
    on_disk = {str(f.relative_to(newest)) for f in newest.rglob("*") if f.is_file()}
    assert set(listed) == on_disk - {"COMPLETE"} >= {"train_state.json", "recipe.yaml"}
    assert (newest / "recipe.yaml").read_text() == "name: x\n"


def test_a_checkpoint_after_a_restart_on_more_processes_supersedes_later_steps(
    engine, tmp_path
) -> None:
    """A run at step 6 on one process, resumed on two, goes on from step 3: its next checkpoint
    (step 4) is the newest, and the one-process checkpoint of step 6 must not be resumed from
    again (that would undo what the two processes trained)."""
    ckpt = Checkpointer(engine, tmp_path, keep_last=3, recipe_yaml="")
    parts(engine)  # what accelerate saves
    for s in (2, 4, 6):
        ckpt.save(TrainState(step=s, world_size=1))
    six = tmp_path / "checkpoints" / "step-00000006"
    shutil.copytree(six, tmp_path / "six")
    ckpt.save(TrainState(step=4, world_size=2))
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["step-00000004", "step-00000002"]
    # Had the run died between writing step 4 and removing step 6, `latest` still tells.
    shutil.copytree(tmp_path / "six", six)
    assert [c.name for c in complete_checkpoints(tmp_path)][:2] == ["step-00000004", six.name]
    ckpt.save(TrainState(step=5, world_size=2))
    assert next(c.name for c in complete_checkpoints(tmp_path)) == "step-00000005"
    resume = ckpt.find()
    assert resume is not None and resume.world_size == 2


def test_restore_brings_back_every_part(engine, tmp_path) -> None:
    ckpt = Checkpointer(engine, tmp_path, keep_last=3, recipe_yaml="")
    p = parts(engine)
    step(p)
    p.data.state = {"epoch": 1, "batch": 4}
    ckpt.save(TrainState(step=1, data=p.data.state_dict(), best=3.0, best_step=1))
    saved = {k: v.clone() for k, v in p.model.state_dict().items()}
    lr = p.optimizer.param_groups[0]["lr"]
    step(p)  # the live run moves on, then dies

    fresh_engine = relaunch(engine)
    q = parts(fresh_engine, seed=1)  # another initialisation
    again = Checkpointer(fresh_engine, tmp_path, keep_last=3, recipe_yaml="")
    resume = again.find()
    assert resume is not None and resume.path.name == "step-00000001" and not resume.reshard
    state = again.restore(resume, q)
    assert (state.step, state.best, q.data.state) == (1, 3.0, {"epoch": 1, "batch": 4})
    assert all(torch.equal(q.model.state_dict()[k], v) for k, v in saved.items())
    assert q.optimizer.param_groups[0]["lr"] == lr  # the scheduler's step came back too
    assert q.optimizer.state_dict()["state"]  # and the Adam moments


def test_a_damaged_or_unloadable_newest_checkpoint_falls_back(engine, tmp_path, caplog) -> None:
    ckpt = Checkpointer(engine, tmp_path, keep_last=3, recipe_yaml="")
    p = parts(engine)
    for s in (1, 2, 3):
        step(p)
        ckpt.save(TrainState(step=s))
    truncated = tmp_path / "checkpoints/step-00000003/optimizer.bin"
    truncated.write_bytes(truncated.read_bytes()[:10])
    garbled = tmp_path / "checkpoints/step-00000002/optimizer.bin"  # same size, unreadable
    garbled.write_bytes(b"x" * garbled.stat().st_size)
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000001"]
    assert "step-00000003 is damaged: optimizer.bin has 10 bytes" in caplog.text
    engine = relaunch(engine)
    ckpt = Checkpointer(engine, tmp_path, keep_last=3, recipe_yaml="")
    state = ckpt.restore(ckpt.find(), parts(engine))
    assert state.step == 1 and "step-00000002 failed to load" in caplog.text
    oldest = tmp_path / "checkpoints/step-00000001/optimizer.bin"
    oldest.write_bytes(b"x" * oldest.stat().st_size)
    engine = relaunch(engine)
    ckpt = Checkpointer(engine, tmp_path, keep_last=3, recipe_yaml="")
    with pytest.raises(UserError, match="no checkpoint could be loaded"):
        ckpt.restore(ckpt.find(), parts(engine))
    engine.abandon()


def test_rescale_carries_progress_over_by_samples_seen(engine) -> None:
    p = parts(engine)
    reference = parts(engine)
    for _ in range(8):
        step(reference)
    state = TrainState(step=4, world_size=2, data={"epoch": 3, "batch": 4})
    rescale(state, 1, p.scheduler, batches_per_epoch=10)
    # 4 steps of 2 processes are 8 steps of one: the schedule is where 8 steps put it
    assert (state.step, state.world_size, state.data) == (8, 1, {"epoch": 3, "batch": 8})
    assert p.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]


def test_export_puts_the_frozen_values_back(engine, tmp_path) -> None:
    ckpt = Checkpointer(engine, tmp_path, keep_last=1, recipe_yaml="")
    p = parts(engine)
    ckpt.save(TrainState(step=1))
    exact = torch.full((4, 3), 1 / 3, dtype=torch.float32)
    ckpt.frozen = {"0.weight": exact}  # what DeepSpeed would have rounded
    path = ckpt.export(p.model, 1)
    weights = load_file(str(path))
    assert torch.equal(weights["0.weight"], exact)
    assert torch.equal(weights["1.weight"], p.model.state_dict()["1.weight"])
    assert read_weights(tmp_path).keys() == weights.keys()  # a run directory: its export


def test_read_weights_of_checkpoints_and_files_and_the_errors(engine, tmp_path) -> None:
    ckpt = Checkpointer(engine, tmp_path / "run", keep_last=1, recipe_yaml="")
    p = parts(engine)
    ckpt.save(TrainState(step=1))
    live = p.model.state_dict()
    for source in (tmp_path / "run", tmp_path / "run/checkpoints/step-00000001"):
        got = read_weights(source)  # no export yet: the newest checkpoint's weights
        assert all(torch.equal(got[k], v) for k, v in live.items())
    with pytest.raises(UserError, match="no such run directory"):
        read_weights(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no weights found"):
        read_weights(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_weights(tmp_path / "bad.safetensors")


def test_init_from_loads_by_name_and_refuses_other_shapes(tmp_path) -> None:
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    init_from(target, str(tmp_path / "w.safetensors"))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    wide = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    with pytest.raises(UserError, match=r"init.from .*w.safetensors: 0.weight: checkpoint has"):
        init_from(wide, str(tmp_path / "w.safetensors"))


def test_each_rank_gives_the_files_it_wrote_and_the_main_process_the_rest(tmp_path) -> None:
    """The main process merges these into COMPLETE: a file another rank wrote is given by that
    rank, with the size it saw, whatever the main process's view of it, which it does not stat."""
    from toolkit.engine.checkpointer import sizes, sizes_of_others

    ds = tmp_path / "pytorch_model"
    ds.mkdir()
    for name, size in (("random_states_0.pkl", 3), ("random_states_1.pkl", 4),
                       ("scheduler.bin", 5), ("pytorch_model/mp_rank_00_model_states.pt", 6),
                       ("pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt", 8)):  # fmt: skip
        (tmp_path / name).write_bytes(b"x" * size)
    mine = [tmp_path / "random_states_1.pkl", ds / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            ds / "not_written_in_this_layout.pt"]  # fmt: skip
    given = sizes(tmp_path, mine)
    assert given == {
        "random_states_1.pkl": 4,
        "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt": 8,
    }
    given["random_states_1.pkl"] = 40  # rank 1's view wins: the main process does not stat it
    assert sizes_of_others(tmp_path, given) == {
        "random_states_0.pkl": 3,
        "scheduler.bin": 5,
        "pytorch_model/mp_rank_00_model_states.pt": 6,
    }

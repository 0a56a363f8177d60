"""The loop's own decisions, which are pure functions of the step: step counts, epoch ends
straddled by accumulation, when to evaluate and checkpoint; the per-step random stream; the
scalars it logs; the stop flag a signal sets."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from toolkit.engine.steps import StepPlan
from toolkit.runs.loop import STOP_SIGNALS, _mix, _StopFlag, step_scalars
from toolkit.runs.recipe import TrainConfig


def plan(batches: int, **train: object) -> StepPlan:
    return StepPlan(batches, TrainConfig(**train))


def test_total_steps_from_epochs_or_max_steps() -> None:
    assert plan(10, epochs=3).total == 30
    assert plan(10, epochs=3, grad_accum=4).total == 7  # 30 micro-batches, 4 per step
    assert plan(10, epochs=3, max_steps=5).total == 5
    assert plan(10, epochs=3, grad_accum=4).per_epoch == 2


def test_epoch_ends_with_accumulation_straddling_epochs() -> None:
    p = plan(10, epochs=3, grad_accum=4)  # steps end after micro-batches 4, 8, 12, ...
    # epochs end after micro-batches 10, 20, 30: inside steps 3 (9-12), 5 (17-20), 8 (29-32)
    assert [s for s in range(1, 10) if p.epoch_end(s)] == [3, 5, 8]
    assert p.epochs_done(5) == 2.0


def test_eval_and_checkpoint_every_n_steps_or_at_epoch_ends() -> None:
    p = plan(4, epochs=2, eval_every=3, checkpoint_every=0)
    assert [s for s in range(1, 9) if p.eval_due(s)] == [3, 6]
    assert [s for s in range(1, 9) if p.checkpoint_due(s)] == [4, 8]
    q = plan(4, epochs=2, eval_every=0, checkpoint_every=5)
    assert [s for s in range(1, 9) if q.eval_due(s)] == [4, 8]
    assert [s for s in range(1, 9) if q.checkpoint_due(s)] == [5]


def test_the_step_stream_is_a_function_of_seed_step_micro_and_rank() -> None:
    seeds = {_mix(0, step, micro, rank) for step in range(3) for micro in range(2)
             for rank in range(2)}  # fmt: skip
    assert len(seeds) == 12 and _mix(0, 1, 0, 1) == _mix(0, 1, 0, 1)
    assert all(0 <= s < 2**63 for s in seeds)  # a valid torch seed


def test_step_scalars_name_every_group_learning_rate() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.5, "name": "default"}], lr=0.5)
    scalars = step_scalars(0.25, 1.5, opt, 10.0, 0.1, 0.5)
    assert scalars == {"train/loss": 0.25, "train/grad_norm": 1.5, "train/images_per_s": 10.0,
                       "train/data_wait": 0.1, "epoch": 0.5, "train/lr/default": 0.5}  # fmt: skip


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_stop_signal_sets_the_flag_and_the_old_handler_comes_back(sig: int) -> None:
    seen = []
    previous = signal.signal(sig, lambda s, f: seen.append(s))
    try:
        flag = _StopFlag()
        assert not flag.requested
        os.kill(os.getpid(), sig)
        assert flag.requested and seen == []  # the loop's handler, not the old one
        flag.restore()
        os.kill(os.getpid(), sig)
        assert seen == [sig]
    finally:
        signal.signal(sig, previous)

"""The step plan: how many optimiser steps a run takes on a number of processes, and which steps
evaluate and checkpoint. Pure functions of the step, so a resumed run does exactly what the
uninterrupted one did, and whether a run has reached its end can be told without building it."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.core import schema
from toolkit.data.plan import rank_plan


@dataclass(frozen=True)
class StepPlan:
    """Step counts of the run and which steps evaluate and checkpoint."""

    batches_per_epoch: int
    cfg: schema.TrainConfig

    @classmethod
    def of(cls, r: schema.Recipe, train_samples: int, world_size: int) -> StepPlan:
        """The plan of `r` on `world_size` processes over `train_samples` samples: the batches
        each rank gets per epoch, as the loader lays them out (`data/plan.py`)."""
        batches = rank_plan(train_samples, r.data.batch_size, 0, world_size, train=True).batches
        return cls(batches, r.train)

    @property
    def per_epoch(self) -> int:
        return max(1, self.batches_per_epoch // self.cfg.grad_accum)

    @property
    def total(self) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        return max(1, self.cfg.epochs * self.batches_per_epoch // self.cfg.grad_accum)

    def epochs_done(self, step: int) -> float:
        """Epochs of data consumed after `step` steps (fractional: for loss curves)."""
        return step * self.cfg.grad_accum / self.batches_per_epoch

    def epoch_end(self, step: int) -> bool:
        """True when the batches of this step finished an epoch (steps may straddle epochs)."""
        k, b = self.cfg.grad_accum, self.batches_per_epoch
        return step * k // b > (step - 1) * k // b

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return step % every == 0 if every else self.epoch_end(step)

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return step % every == 0 if every else self.epoch_end(step)

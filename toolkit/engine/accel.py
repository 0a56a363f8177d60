"""The one module that imports accelerate (and DeepSpeed): devices, precision, DDP, collectives."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch import nn

from toolkit.recipe import DeepSpeedConfig, TrainConfig

logger = logging.getLogger(__name__)


class Engine:
    """What the loop needs from accelerate, behind names that say what they do.

    Without a GPU, accelerate does not detect a distributed launch by itself and fails silently
    (every rank believes it is rank 0 of 1, and reductions return sums), so the CPU path asks
    for `cpu=True` and the gloo backend explicitly. The LR scheduler is stepped once per optimiser
    step by the loop (`step_scheduler_with_optimizer=False`); accelerate would otherwise step it
    once per process.
    """

    def __init__(self, train: TrainConfig, deepspeed: DeepSpeedConfig | None) -> None:
        if deepspeed is not None:
            raise NotImplementedError("DeepSpeed is not wired in yet: set deepspeed: null")
        cpu = not torch.cuda.is_available()
        expected = int(os.environ.get("WORLD_SIZE", "1"))
        handlers = []
        if expected > 1:  # a backend named for a single process makes accelerate fail
            backend = "gloo" if cpu else "nccl"
            handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30)))
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=train.precision,
            gradient_accumulation_steps=train.grad_accum,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=handlers,
        )
        if self.world_size != expected:
            raise RuntimeError(
                f"WORLD_SIZE is {expected} but accelerate formed a group of {self.world_size}"
            )

    # --- who and where -----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def seed(self, seed: int, per_rank: bool) -> None:
        """Seed python, numpy and torch: the same on every rank (model init) or per rank."""
        set_seed(seed + (self.rank if per_rank else 0))

    # --- training ------------------------------------------------------------------------------
    def prepare(self, *objects: Any) -> tuple[Any, ...]:
        return self.accelerator.prepare(*objects)

    def accumulate(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.accelerator.accumulate(model)

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        """Clip the global gradient norm (no clipping when max_norm is None); return the norm."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = self.accelerator.clip_grad_norm_(params, max_norm or float("inf"))
        return float(norm) if norm is not None else float("nan")

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with self.accelerator.autocast():
            yield

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    # --- collectives ---------------------------------------------------------------------------
    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all ranks (every rank must call it)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # --- state on disk -------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Model, optimiser, scheduler and every rank's RNG state (all ranks call this)."""
        self.accelerator.save_state(str(path))

    def load_state(self, path: Path) -> None:
        self.accelerator.load_state(str(path))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32 on the CPU (collective; every rank calls it)."""
        state = self.accelerator.get_state_dict(model)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def close(self, *objects: Any) -> None:
        """Free the prepared objects and leave the process group in step with the other ranks,
        so no rank exits while another still talks to it."""
        self.accelerator.free_memory(*objects)
        gc.collect()
        self.barrier()
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # accelerate keeps process-wide singletons; reset them so another run in this process
        # (the chain of stages of a demo or a test) starts from a clean slate.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

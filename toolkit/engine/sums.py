"""What the loop learns from each step without waiting for the device: sums over ranks read a
step late, the loss checked for non-finite values, throughput over the log window."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops; the last good checkpoint stays."""


class LaggedSum:
    """An all-reduce started when a step's work is queued and read later, so the host never
    waits for the device inside a step. On a GPU the sum is copied to pinned host memory behind
    an event, and reading waits for that event alone, not for the steps queued since; on the CPU
    (gloo) the reduction runs in the background until it is read."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.work = torch.distributed.all_reduce(values, async_op=True) if distributed else None
        self.event = None
        if values.is_cuda:
            if self.work is not None:
                self.work.wait()  # on the GPU: the copy below waits for the sum, the host does not
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> list[float]:
        """The sums (waits for them if they are not there yet)."""
        if self.event is not None:
            self.event.synchronize()
            return self.host.tolist()
        if self.work is not None:
            self.work.wait()
        return self.values.tolist()


class StepSums:
    """Each step's loss and stop votes, summed over ranks without the host waiting for the
    device inside a step: the sum starts when the step's work is queued and is read a step later,
    or at once where a decision needs it (a log line, a checkpoint, an evaluation, the end). Every
    rank reads the same sums at the same steps, so every rank stops at the same step, and a
    non-finite loss stops the run before a checkpoint or an evaluation could hold it."""

    def __init__(self, engine: Any, checkpoints: Path) -> None:
        self.engine = engine
        self.checkpoints = checkpoints
        self.pending: list[tuple[int, int, Any]] = []  # (step, samples, LaggedSum)
        self.stopped = False

    def start(self, step: int, loss_sum: torch.Tensor, samples: int, stop: bool) -> None:
        device = loss_sum.device  # filled by kernels: no host-to-device copy that would wait
        votes = torch.full((), float(stop), dtype=torch.float64, device=device)
        values = torch.stack([loss_sum.double(), votes])
        self.pending.append((step, samples, self.engine.start_sum(values)))

    def read_all(self, keep: int = 0) -> float | None:
        """Read every sum but the newest `keep`; the mean loss of the last one read."""
        loss = None
        while len(self.pending) > keep:
            step, samples, lagged = self.pending.pop(0)
            loss_sum, votes = lagged.read()
            loss = loss_sum / samples
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss} at step {step}; stopping. The last good "
                                    f"checkpoint stays in {self.checkpoints}")  # fmt: skip
            self.stopped = self.stopped or votes > 0
        return loss


class Window:
    """Images per second and the share of time spent waiting for data, since the last log line."""

    def __init__(self) -> None:
        self.start, self.samples, self.wait = time.perf_counter(), 0, 0.0

    def add(self, samples: int, wait: float) -> None:
        self.samples += samples
        self.wait += wait

    def rates(self) -> tuple[float, float]:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rates = (self.samples / elapsed, self.wait / elapsed)
        self.start, self.samples, self.wait = now, 0, 0.0
        return rates

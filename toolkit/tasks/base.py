"""What a task is: the batch it needs, its loss, its per-sample metrics, its sample map and the
reference row it is judged against. The loop, validation, `evaluate` and `report` ask a task;
none of them knows which task it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.core.metrics import MetricAccumulator
from toolkit.core.schema import Recipe
from toolkit.core.stats import Statistic, mean_statistic
from toolkit.data.format import MANIFEST, Manifest
from toolkit.models import MODELS, build_model


@dataclass(frozen=True)
class Placement:
    """Where a batch goes: the device, and the mixed-precision context a forward runs in. Inputs
    stay fp32: under autocast (bf16 training) the model's matrix products cast what they take,
    and what the task computes from the output (losses, metrics) is in fp32."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Callable[[], AbstractContextManager] = nullcontext


@dataclass
class BatchResult:
    """One evaluated batch: per-sample metric values ([N] each, any device) of the model and of
    the task's reference (None without one), and sample-map rows ([C, H, W] tiles, one row per
    sample, titled by `Task.tiles`) for the first `tiles` samples asked for."""

    metrics: dict[str, Tensor]
    reference: dict[str, Tensor] | None
    tiles: list[list[Tensor]]


class Task(ABC):
    """A registered task (`task: <name>` in a recipe). Subclasses set the class attributes and
    implement `losses` and `evaluate`; `problems` checks a recipe for the task."""

    name: ClassVar[str]
    title: ClassVar[str]  # report heading, e.g. "super-resolution"
    default_arch: ClassVar[str]  # model.arch when the recipe names none
    fields: ClassVar[tuple[str, ...]]  # batch tensors the loader must produce: "hr", "lr", ...
    # Per-sample validation metrics (names in toolkit.core.metrics.METRICS), "loss" among them: the
    # training loss of each sample, computed by `losses` as in training.
    metrics: ClassVar[tuple[str, ...]]
    table: ClassVar[tuple[str, ...]]  # the metrics the report's table shows
    # More tables of the report, (name, metrics, what they mean) each: a row per run and the
    # reference's, with intervals (super-resolution: the physics-aware metrics)
    more_tables: ClassVar[tuple[tuple[str, tuple[str, ...], str], ...]] = ()
    compare: ClassVar[tuple[str, ...]] = ()  # ... and its comparison figure (compare.png)
    score: ClassVar[str]  # the metric that says which evaluation is best
    reference: ClassVar[str | None] = None  # the row every model is judged against ("bicubic")
    tiles: ClassVar[tuple[str, ...]]  # sample-map columns; the last two: output and target
    scored_tiles: ClassVar[tuple[str, ...]] = ()  # tiles titled with their PSNR to the target
    loss_label: ClassVar[str] = "loss"  # what the loss axis of a loss curve says

    def __init__(self, r: Recipe) -> None:
        self.seed = r.train.seed

    @classmethod
    def problems(cls, r: Recipe) -> Iterator[tuple[str, str]]:
        """(dotted key, message) for what in `r` this task cannot train with."""
        return iter(())

    # How shards come to carry a field they lack, for the line that refuses them.
    _FIELD_SOURCES: ClassVar[dict[str, str]] = {
        "label": "labelled shards come from class folders: `python -m toolkit.shard SRC OUT "
        "--labels` with SRC/<class>/<image>",
    }

    def shard_problems(
        self, manifest: Manifest, trained: dict[str, Any] | None = None
    ) -> Iterator[str]:
        """Why shards cannot feed this task (the fields it needs), before anything trains or
        evaluates; `trained`: the record of the shards the run trained on, for an evaluation
        on others."""
        missing = [f for f in self.fields if f not in manifest.fields]
        if missing:
            how = "; ".join(self._FIELD_SOURCES[f] for f in missing if f in self._FIELD_SOURCES)
            yield (
                f"{manifest.root / MANIFEST}: the shards carry no {' or '.join(missing)}, which "
                f"the {self.name} task needs" + (f"; {how}" if how else "")
            )

    def use_shards(self, manifest: Manifest) -> None:
        """Take what the task needs from the manifest of the shards it runs on, as the job read
        it once (none by default)."""
        return None

    def model_inputs(self) -> dict[str, Any]:
        """What the architecture's builder needs from the task (the SR scale, ...)."""
        return {}

    def build_model(self, r: Recipe) -> nn.Module:
        return build_model(r.model, **self.model_inputs())

    @abstractmethod
    def losses(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, rng: torch.Generator | None
    ) -> tuple[Tensor, Any]:
        """(per-sample loss [N] in fp32, the model's output). `rng` is the training step's
        random stream; None in evaluation, where any randomness must come from the sample keys
        (the same result on any number of ranks)."""

    @staticmethod
    def supervised(
        model: nn.Module, batch: dict[str, Any], at: Placement, source: str, target: str
    ) -> tuple[Any, Tensor]:
        """The model's output for `batch[source]`, under the placement's autocast, and
        `batch[target]`, both on the device: the forward of a task that maps one field to
        another."""
        x = batch[source].to(at.device, non_blocking=True)
        y = batch[target].to(at.device, non_blocking=True)
        with at.autocast():
            return model(x), y

    def train_loss(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, rng: torch.Generator
    ) -> Tensor:
        """The scalar a training step minimises: the mean of the per-sample losses."""
        return self.losses(model, batch, at, rng)[0].mean()

    @abstractmethod
    def evaluate(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, tiles: int
    ) -> BatchResult:
        """Every metric of `metrics` per sample (its "loss" from `losses`), the reference's, and
        the sample-map rows of the first `tiles` samples. Any other per-sample values the task
        adds (a classifier's scores, a spectrum) are gathered with them for `scores` and
        `extras`: on N processes as on one."""

    def scores(self, values: MetricAccumulator) -> dict[str, float]:
        """The model's figures from every rank's gathered per-sample values: by default the mean
        of each metric; a task may add figures of the whole split (a classifier's AUCs)."""
        return {n: values.values(n).mean().item() for n in self.metrics}

    def extras(self, values: MetricAccumulator) -> dict[str, Any]:
        """More of the evaluation for eval.json, beyond numbers (a confusion matrix, ROC
        curves); none by default."""
        return {}

    def statistic(self, values: Mapping[str, np.ndarray]) -> tuple[Statistic, np.ndarray | None]:
        """The `table` metrics of a bootstrap resample (`toolkit.core.stats`), from one evaluation's
        per-sample values (sorted by key), and the strata to resample within (None: all
        together). By default the mean of each metric's per-sample values."""
        return mean_statistic(np.stack([values[n] for n in self.table], axis=1)), None

    def label(self, r: Recipe) -> str:
        """The row name of a run in tables: the recipe's label, else architecture and freeze."""
        if r.label:
            return r.label
        title = MODELS.get(r.model.arch).title  # type: ignore[arg-type]
        return f"{title}, frozen {', '.join(r.freeze)}" if r.freeze else title

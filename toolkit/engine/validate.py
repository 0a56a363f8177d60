"""One pass over a split through a task: per-sample metrics (model and reference), a sample map,
and the evaluation as `eval.json` holds it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.core.atomic import write_atomic
from toolkit.core.metrics import MetricAccumulator
from toolkit.core.stats import Samples
from toolkit.tasks import Placement, Task

GRID_SAMPLES = 4  # samples shown in the TensorBoard image grid


@dataclass
class Validation:
    model: MetricAccumulator  # per-sample metrics of the model (the task's `metrics`)
    reference: MetricAccumulator | None  # the task's reference on the same samples (bicubic)
    tiles: list[list[Tensor]]  # sample-map rows, from this rank's first batch

    def gathered(self) -> Validation | None:
        """Every rank's per-sample values, all of them, on the main process; None on the others
        (collective: every rank calls it)."""
        model = self.model.gather()
        reference = None if self.reference is None else self.reference.gather()
        return None if model is None else Validation(model, reference, self.tiles)


@torch.no_grad()
def validate(
    task: Task,
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    at: Placement,
    grid_samples: int = GRID_SAMPLES,
) -> Validation:
    """Evaluate `model` (unwrapped: no DDP collectives, ranks may differ) on every valid sample
    of `batches`; metrics in fp64 whatever the model computes in. The sample map shows the
    first `grid_samples` samples of the first batch."""
    ours = MetricAccumulator()
    ref = MetricAccumulator() if task.reference else None
    tiles: list[list[Tensor]] = []
    for batch in batches:
        valid = batch["valid"]
        keys = [k for k, ok in zip(batch["key"], valid.tolist(), strict=True) if ok]
        result = task.evaluate(model, batch, at, 0 if tiles else grid_samples)
        ours.add(keys, _select(result.metrics, valid))
        if ref is not None and result.reference is not None:
            ref.add(keys, _select(result.reference, valid))
        if not tiles:
            tiles = [[t.detach().float().cpu() for t in row] for row in result.tiles]
    return Validation(ours, ref, tiles)


def _select(values: dict[str, Tensor], valid: Tensor) -> dict[str, Tensor]:
    return {k: v.detach().double().cpu()[valid.cpu()] for k, v in values.items()}


def summary(task: Task, result: Validation, split: str) -> dict[str, Any]:
    """The evaluation as `eval.json` holds it: the task, means over every sample of the split for
    the model and (under the reference's name) the reference, and per-image statistics (mean,
    median and the five worst keys) of each metric."""
    per_image = {"model": {n: result.model.stats(n) for n in task.metrics}}
    out: dict[str, Any] = {
        "split": split,
        "count": result.model.count,
        "task": task.name,
        "model": task.scores(result.model),
        **task.extras(result.model),
        "reference": task.reference,
    }
    if task.reference is not None and result.reference is not None:
        out[task.reference] = result.reference.summary()
        per_image[task.reference] = {n: result.reference.stats(n) for n in result.reference.scalars}
    out["per_image"] = per_image
    return out


def samples_path(path: Path) -> Path:
    """The per-sample values beside an evaluation: eval.json -> eval.samples.npz."""
    return path.with_name(f"{path.stem}.samples.npz")


def write_eval(path: Path, doc: dict[str, Any], result: Validation | None = None) -> dict[str, Any]:
    """Write an evaluation (a run's `eval.json`) atomically: a reader never sees half of it.
    With `result`, every sample's values (the model's metrics, a classifier's labels and scores,
    the reference's metrics) go to `<name>.samples.npz` beside it, which `doc["samples"]` names:
    what the report's intervals and paired differences are computed from. It is written first,
    so an eval.json never names a file that is not there yet."""
    if result is not None:
        model = result.model
        # one number per sample: a vector (a spectrum) is summarised in eval.json instead
        parts = {"model": {n: model.values(n).numpy() for n in model.scalars}}
        if result.reference is not None and doc.get("reference"):
            if result.reference.keys != model.keys:  # both are added batch by batch, together
                raise ValueError("the reference's samples differ from the model's")
            ref = result.reference
            parts[doc["reference"]] = {n: ref.values(n).numpy() for n in ref.scalars}
        where = samples_path(path)
        Samples.of(model.keys, parts).write(where)
        doc = {**doc, "samples": where.name}
    write_atomic(path, json.dumps(doc, indent=2) + "\n")
    return doc

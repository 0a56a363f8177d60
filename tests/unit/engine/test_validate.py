"""Validation through a task: only valid samples count, each once; the reference alongside;
the evaluation as eval.json holds it."""

from __future__ import annotations

import pytest

from tests.unit.tasks.test_tasks import batch, tiny_recipe
from toolkit.engine.model import build_model
from toolkit.engine.validate import summary, validate
from toolkit.tasks import Placement, task_of


def test_validation_counts_valid_samples_only_and_summarises_with_the_reference() -> None:
    r = tiny_recipe("task=sr", "model.arch=srmae", "model.sr_channels=4")
    task, model = task_of(r), build_model(r).eval()
    result = validate(task, model, [batch(4), batch(3, valid=1)], Placement(), grid_samples=3)
    assert result.model.keys == ["k0", "k1", "k2", "k3", "k0"]  # the second batch's k0 only
    assert result.reference is not None and result.reference.count == 5
    assert len(result.tiles) == 3
    doc = summary(task, result, "val")
    assert (doc["split"], doc["count"], doc["task"], doc["reference"]) == (
        "val",
        5,
        "sr",
        "bicubic",
    )
    assert set(doc["model"]) == set(task.metrics)
    assert set(doc["bicubic"]) == set(task.metrics) - {"loss"}
    assert doc["model"]["psnr"] == pytest.approx(result.model.values("psnr").mean().item())
    assert set(doc["per_image"]) == {"model", "bicubic"}

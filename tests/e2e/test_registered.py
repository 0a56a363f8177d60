"""Registering is testing: every (architecture, task) pair the registries hold, including parts a
test file registers (tests/e2e/test_toy_registration.py), gets the basics here with no edit of
this file: built from its recipe section, its dry run (on the meta device) counting the same
parameters, a forward and backward reaching every trainable parameter, two training steps with
a checkpoint, and the saved weights evaluated again to the same numbers.

The items are made by `pytest_collection_modifyitems` in tests/conftest.py once every test module
is imported, one per pair: `test_basics[<arch>-<task>]`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import DEBUG_RECIPE, make_pairs
from toolkit import evaluate, launch
from toolkit.data.sharding import shard
from toolkit.engine.model import build_model
from toolkit.models import MODELS
from toolkit.runs import recipe
from toolkit.runs.directory import eval_loader
from toolkit.runs.entry import run
from toolkit.tasks import TASKS, Placement, task_of

BUILT_IN = {("mae", "mae"), ("srmae", "sr"), ("edsr", "sr"), ("rcan", "sr"),
            ("vit_classifier", "classify"), ("cnn", "classify")}  # fmt: skip


def pairs(extra: dict[str, dict[str, Any]] | None = None) -> list[tuple[str, str]]:
    """Every (architecture, task) the registries hold, with the test modules' registrations
    (`extra`, which the collection took out of the registries again)."""
    with registered(extra or {}):
        return [(arch, task) for arch in MODELS.names() for task in MODELS.get(arch).tasks]


@contextmanager
def registered(extra: dict[str, dict[str, Any]]) -> Iterator[None]:
    """The test modules' parts registered for the time of the block."""
    models, tasks = extra.get("models", {}), extra.get("tasks", {})
    for name, spec in models.items():
        MODELS.register(name, spec)
    for name, task in tasks.items():
        TASKS.register(name, task)
    try:
        yield
    finally:
        for name in models:
            MODELS.unregister(name)
        for name in tasks:
            TASKS.unregister(name)


def source_for(fields: tuple[str, ...], root: Path, size: int, classes: int) -> Path:
    """Source files holding what a task's `fields` ask of the shards, at the model's size (and
    its number of classes, for labels)."""
    known = {"hr", "lr", "label"}
    if not set(fields) <= known:
        pytest.fail(f"no test data for the fields {sorted(set(fields) - known)}: teach "
                    "tests/e2e/test_registered.py `source_for` to write them")  # fmt: skip
    if "lr" in fields:
        return make_pairs(root, 12, size=size, scale=2)
    rng = np.random.default_rng(0)
    for i in range(4 * classes):
        # Classes told apart by their brightness; unlabelled data puts them in one folder.
        cls = f"c{i % classes}" if "label" in fields else "."
        (root / cls).mkdir(parents=True, exist_ok=True)
        image = rng.uniform(0.0, 0.5, (size, size)) + 0.4 * (i % classes) / classes
        np.save(root / cls / f"{i:04d}.npy", image.astype(np.float32))
    return root


def basics_recipe(arch: str, task: str, tmp_path: Path) -> recipe.Recipe:
    """The debug recipe's training settings with the pair's architecture, its small instance."""
    spec = MODELS.get(arch)
    defaults = spec.config(**spec.small)
    fields = TASKS.get(task).fields
    classes = getattr(defaults, "num_classes", 3)
    shards = tmp_path / "shards"
    source = source_for(fields, tmp_path / "raw", defaults.img_size, classes)
    shard(source, shards, val_fraction=0.34, shard_size=4, labels="label" in fields)
    doc = recipe.to_dict(recipe.load(DEBUG_RECIPE))
    doc.update(name=f"basics-{arch}", task=task, model={"arch": arch, **spec.small})
    doc["data"].update(shards=str(shards), batch_size=2, num_workers=0)
    doc["train"].update(epochs=1, max_steps=2, checkpoint_every=1, eval_every=0, log_every=1)
    doc["run"] = {"dir": str(tmp_path / "run")}
    return recipe.from_dict(doc)


def check_basics(arch: str, task: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    r = basics_recipe(arch, task, tmp_path)
    assert isinstance(r.model, MODELS.get(arch).config)

    # Built from its section, with parameters to train.
    torch.manual_seed(0)
    model = build_model(r)
    total = sum(p.numel() for p in model.parameters())
    assert total > 0 and any(p.requires_grad for p in model.parameters())

    # The dry run builds it on the meta device: the same parameters, counted without data.
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.dump(r))
    capsys.readouterr()
    assert launch.main([str(path), "--local", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["params"]["total"] == total

    # A forward and backward on a real batch reach every trainable parameter (one left out
    # would stop DDP, which expects a gradient for each).
    batch = next(iter(eval_loader(r, "train")))
    loss = task_of(r).train_loss(
        model.train(), batch, Placement(), torch.Generator().manual_seed(0)
    )
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"{arch}/{task}: no gradient reaches {missing[:5]}"

    # Two steps through the training loop, a checkpoint each, the weights exported.
    assert run(r) == 0
    run_dir = Path(r.run.dir)
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in logged if "train/loss" in x]
    assert len(losses) == 2 and all(np.isfinite(losses))
    exported = load_file(str(run_dir / "model.safetensors"))
    assert set(exported) == set(model.state_dict())
    assert any(not torch.equal(exported[n], p.detach()) for n, p in model.named_parameters()
               if p.requires_grad)  # fmt: skip
    trained = json.loads((run_dir / "eval.json").read_text())
    assert set(TASKS.get(task).metrics) <= set(trained["model"])

    # The saved weights, loaded again by `evaluate`, give the numbers the loop gave.
    capsys.readouterr()
    assert evaluate.main([str(run_dir), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["model"] == trained["model"]
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["arch"] == arch


def test_the_built_in_parts_are_among_the_pairs() -> None:
    # The parametrisation is only as good as this list: every built-in pair is in it.
    assert set(pairs()) >= BUILT_IN
    assert {arch for arch, _ in BUILT_IN} == set(MODELS.builtin_names())
    assert {task for _, task in BUILT_IN} == set(TASKS.builtin_names())

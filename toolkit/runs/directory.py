"""Run directories as a library: locate a run (or checkpoint, or weights file) and its recipe,
build its model with its weights, its evaluation loader, where an evaluation is written, and
its parameter counts. `evaluate`, `report` and `launch` use these; no CLI imports another."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from toolkit.core.errors import UserError
from toolkit.data import subset
from toolkit.data.fit import Expected, shards_misfit, unit_misfit
from toolkit.data.format import (
    MANIFEST,
    TRAINED_ON,
    Manifest,
    mismatches,
    read_manifest,
)
from toolkit.data.format import trained_on as record_of
from toolkit.data.loader import Loader, build_loader
from toolkit.data.normalise import resolve
from toolkit.engine.checkpointer import (
    RECIPE,
    STATE,
    WEIGHTS,
    complete_checkpoints,
    exported_step,
    read_weights,
)
from toolkit.engine.model import build_model
from toolkit.engine.state import TrainState
from toolkit.engine.steps import StepPlan
from toolkit.runs import recipe
from toolkit.runs.hold import Held, holder_of, refusal
from toolkit.runs.recipe import RecipeError
from toolkit.tasks import Task, task_of


@dataclass
class Target:
    """What to evaluate: the recipe describing the model, and where its weights come from."""

    recipe: recipe.Recipe
    source: Path  # run directory, checkpoint directory or .safetensors file
    run_dir: Path  # the run the weights belong to: where an evaluation is written
    label: str  # "" for the run's own final weights, else what they are (e.g. step-00000500)

    @property
    def task(self) -> Task:
        return task_of(self.recipe)


def locate(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Target:
    """The recipe and run directory of a run directory, checkpoint directory or weights file."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such run directory, checkpoint or weights file")
    where = path.resolve()  # "." or "step-00000500" name no run otherwise
    label = ""
    if where.is_file():
        folder = where.parent
        if (folder / STATE).is_file():  # a checkpoint's model.safetensors (DDP)
            run_dir, described_by, label = folder.parent.parent, folder / RECIPE, folder.name
        else:
            run_dir, described_by = folder, folder / RECIPE
            label = "" if where.name == WEIGHTS else where.stem
    elif (where / STATE).is_file():  # checkpoints/step-N: it keeps its own recipe
        run_dir, described_by, label = where.parent.parent, where / RECIPE, where.name
    else:
        run_dir, described_by = where, where / RECIPE
    if not described_by.is_file():
        raise UserError(
            f"{path}: no {RECIPE} at {described_by} to say which model the weights are for"
        )
    return Target(recipe.load(described_by, overrides), path, run_dir, label)


@dataclass(frozen=True)
class Finished:
    """A run that reached the last step its recipe plans for the processes that trained it."""

    run_dir: Path
    step: int
    world_size: int  # processes that trained it
    written: bool  # its export (and eval.json, where there is a validation split) is written

    def line(self) -> str:
        """What a relaunch says instead of training again."""
        return (
            f"{self.run_dir}: complete (trained to its last step, {self.step}, on "
            f"{self.world_size} process(es)); nothing was changed. Evaluate it with `python -m "
            f"toolkit.evaluate {self.run_dir}`, train a new run elsewhere with run.dir=..., or "
            "raise train.max_steps or train.epochs to train this one further"
        )


def finished(
    r: recipe.Recipe, ckpts: list[Path], manifest: Manifest | None = None
) -> Finished | None:
    """Whether the run in `r.run_dir` (whose complete checkpoints, newest first, are `ckpts`)
    has reached its end: its newest checkpoint is at the last step that `r` plans for the
    number of processes that wrote it. Any other number of processes relaunching it would map
    that position to another step and train again, so a finished run is judged by its own world
    size, never the relaunch's. The sample counts come from the shards (`manifest`, where the
    caller has read it), or from the run's own record of them where the shards are gone (a
    scratch file system purged)."""
    if not ckpts:
        return None
    state = TrainState.read(ckpts[0] / STATE)
    counts = _sample_counts(r, manifest)
    if state.step < StepPlan.of(r, counts["train"], state.world_size).total:
        return None
    evaluated = not counts.get("val") or (r.run_dir / "eval.json").is_file()
    written = exported_step(r.run_dir) == state.step and evaluated
    return Finished(r.run_dir, state.step, state.world_size, written)


def _sample_counts(r: recipe.Recipe, manifest: Manifest | None = None) -> dict[str, int]:
    """Samples per split that `r` reads: the train count is its subset's, where it cuts one
    (counted from the manifest: no shard is listed to tell whether a run is finished)."""
    try:
        manifest = (
            manifest
            if manifest is not None
            else read_manifest(r.data.shards, r.data.storage_options)
        )
        if r.data.holdout is not None:  # its counts depend on the keys: listed
            manifest = subset.restrict(manifest, r.data)
        counts = {split: manifest.count(split) for split in manifest.splits}
        if "train" in counts:
            counts["train"] = subset.size(manifest, r.data)
        return counts
    except UserError:
        record = _read_record(r.run_dir)
        if record is None or not isinstance(record.get("count"), dict):
            raise
        return {k: int(v) for k, v in record["count"].items()}


def another_run(then: recipe.Recipe, now: recipe.Recipe) -> str | None:
    """How `now` differs from the recipe a run was trained with where its checkpoint cannot go
    on under it: another task, SR factor, frozen set, parameter layout (DDP or a ZeRO stage) or
    model (a tensor another shape, or missing), training subset, or optimiser groups (per layer
    or not: the optimiser's state would not load); None where it can (more steps, another
    learning rate, another mask ratio)."""
    for key, a, b in (
        ("task", then.task, now.task),
        ("freeze", then.freeze, now.freeze),
        ("deepspeed.zero_stage", _stage(then), _stage(now)),
        # the factor matters to a task that makes LR images (its model's shapes may not show it)
        ("data.scale", then.data.scale if "lr" in task_of(then).fields else None,
         now.data.scale if "lr" in task_of(now).fields else None),
        # a run of a study goes on with the samples it started on (toolkit/data/subset.py)
        ("data.limit", then.data.limit, now.data.limit),
        ("data.per_class", then.data.per_class, now.data.per_class),
        ("data.holdout", then.data.holdout, now.data.holdout),
        ("data.subset_seed", _subset_seed(then), _subset_seed(now)),
        ("optim.layer_decay", _layered(then), _layered(now)),
    ):  # fmt: skip
        if a != b:
            return f"{key} {a} in the run, {b} here"
    shapes = [state_shapes(x) for x in (then, now)]
    for name in [*shapes[0], *(n for n in shapes[1] if n not in shapes[0])]:  # model order
        a, b = (s.get(name) for s in shapes)
        if a != b:
            return f"model tensor {name} {a or 'absent'} in the run, {b or 'absent'} here"
    return None


def _subset_seed(r: recipe.Recipe) -> int | None:
    """The subset's seed, where there is a subset for it to choose."""
    return r.data.subset_seed if subset.wanted(r.data) else None


def _layered(r: recipe.Recipe) -> str:
    """Whether the optimiser's groups are split per layer (`optim.layer_decay`)."""
    return "per layer" if r.optim.layer_decay not in (None, 1.0) else "off"


def _stage(r: recipe.Recipe) -> int | str:
    return r.deepspeed.zero_stage if r.deepspeed is not None else "none (DDP)"


def state_shapes(r: recipe.Recipe) -> dict[str, tuple[int, ...]]:
    """Every tensor of the recipe's model's state (parameters and buffers, such as a probe's
    batch-norm statistics) and its shape, built on the meta device."""
    import torch

    with torch.device("meta"):
        model = task_of(r).build_model(r)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_relaunch(
    r: recipe.Recipe, world_size: int, manifest: Manifest | None = None
) -> Finished | None:
    """Whether `r` may train in `r.run_dir` on `world_size` processes: None for a new run or one
    to resume; the Finished run that is left as it is (the caller says so and trains nothing);
    a user error for a run of another model or layout (it would not load, or would mean
    something else), and for one whose last writes were cut short and that a relaunch on
    another number of processes cannot finish. A run another process holds is refused first:
    its writer prunes and writes checkpoints while they would be read. `manifest`: the one of
    `r`'s shards, where the caller has read it."""
    holder = holder_of(r.run_dir)
    if holder is not None:
        raise Held(f"run.dir: {refusal(r.run_dir, holder)}")
    ckpts = complete_checkpoints(r.run_dir)
    if not ckpts:
        return None
    try:
        then = recipe.load(ckpts[0] / RECIPE)
    except RecipeError as err:  # a recipe of an older toolkit that today's schema refuses
        raise UserError(f"{ckpts[0] / RECIPE}: the run's recipe does not load ({err})") from None
    difference = another_run(then, r)
    if difference is not None:
        raise UserError(
            f"{r.run_dir}: holds a run this recipe cannot continue ({difference}); give this run "
            f"its own run.dir, or relaunch with the run's own recipe ({r.run_dir / RECIPE})"
        )
    done = finished(r, ckpts, manifest)
    if done is None or done.written:
        return done
    if done.world_size != world_size:
        raise UserError(
            f"{r.run_dir}: training reached its last step ({done.step}) on {done.world_size} "
            f"process(es), but its export or eval.json was not written (cut short at the end); "
            f"relaunch it on {done.world_size} process(es) to write them"
        )
    return None  # the same world: the relaunch resumes at the last step and only finishes


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / TRAINED_ON
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: not a record of the training data ({err})") from None
    return doc if isinstance(doc, dict) else None


def training_record(target: Target) -> dict[str, Any] | None:
    """What the run records of the shards it trained on (`data.json`); for a run older than that
    record, the same read from the manifest of the shards its own recipe names (not those of
    an override) where it is still readable; else None."""
    record = _read_record(target.run_dir)
    if record is not None:
        return record
    try:
        own = recipe.load(target.run_dir / RECIPE)
        return record_of(
            read_manifest(own.data.shards, own.data.storage_options), own.data.normalise or ""
        )
    except (UserError, RecipeError):
        return None


def expected_by(target: Target, min_side: int = 1) -> Expected:
    """What data must look like to fit the target's model: its channels, the smallest side it
    takes, its normalisation and the range of its training values (where known)."""
    r = target.recipe
    record = training_record(target) or {}
    value_range = record.get("value_range")
    return Expected(
        run=str(target.run_dir),
        channels=r.model.in_chans,
        norm=resolve(r.data.normalise, None),  # recipe.yaml records the one used in training
        value_range=(float(value_range[0]), float(value_range[1])) if value_range else None,
        min_side=min_side,
    )


def load_model(target: Target) -> nn.Module:
    """The recipe's model with the target's weights, every tensor accounted for, in eval mode."""
    from toolkit.models import load_weights

    r = target.recipe
    model = target.task.build_model(r)
    try:
        report = load_weights(model, read_weights(target.source))
    except ValueError as err:
        raise UserError(f"{target.source}: {err}") from None
    if report.fresh:
        raise UserError(
            f"{target.source}: the weights lack {report.fresh[0]} ({len(report.fresh)} tensors "
            f"in all) of the {r.model.arch} model its {RECIPE} describes; are they of an earlier "
            "stage?"
        )
    return model.eval()


def shard_problems(
    r: recipe.Recipe, manifest: Manifest, trained: dict[str, Any] | None = None
) -> list[str]:
    """Why shards cannot feed the recipe's model and task: channels, image size, the SR factor,
    the fields the task needs (labels, and as many classes as the model has), and values the
    normalisation cannot hold (`unit` on data beyond [0, 1]). `trained`: what the run trained
    on (`data.json`), for an evaluation on other shards: their values must fit it too."""
    task = task_of(r)
    scale = r.data.scale if "lr" in task.fields else None
    out = mismatches(manifest, r.model.in_chans, r.model.img_size, scale)
    out += task.shard_problems(manifest, trained)
    norm = resolve(r.data.normalise, manifest)  # how these shards are mapped (an override)
    where = str(manifest.root / MANIFEST)
    problem = unit_misfit(where, manifest.value_range, "data.normalise", norm)
    if problem is not None and manifest.normalise:
        problem += f" (the shards' own is {manifest.normalise})"
    if problem is None and trained and trained.get("value_range"):
        low, high = trained["value_range"]
        # ... against what the model saw: the run's own map of its training values
        trained_norm = resolve(trained.get("normalise") or r.data.normalise, manifest)
        expected = Expected(str(r.run_dir), r.model.in_chans, trained_norm, (low, high))
        problem = shards_misfit(where, manifest.value_range, norm, expected)
    if problem is not None:
        out.append(problem)
    return out


def check_shards(target: Target, split: str) -> Manifest:
    """Shards the target's model and task can read, with samples in `split`, and values that
    fit what it was trained on: their manifest (with the held-out part cut, where the recipe
    holds one out) for the loader; a user error otherwise."""
    r = target.recipe
    manifest = read_manifest(r.data.shards, r.data.storage_options)
    problems = shard_problems(r, manifest, training_record(target))
    if problems:
        raise UserError(problems[0])
    if r.data.holdout is not None:  # its val split is the held-out part of train
        manifest = subset.restrict(manifest, r.data)
    if not manifest.count(split):
        raise UserError(f"{manifest.root / 'manifest.json'}: split {split!r} has no samples")
    return manifest


def eval_loader(
    r: recipe.Recipe,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    manifest: Manifest | None = None,
) -> Loader:
    """This rank's share of `split`, each sample once, centre-cropped, in a fixed order;
    `manifest`: the shards' as already read (`check_shards`), else read here."""
    return build_loader(r.data, split, crop=r.model.img_size, seed=r.train.seed, rank=rank,
                        world_size=world_size, fields=task_of(r).fields, evaluation=True,
                        manifest=manifest)  # fmt: skip


def eval_path(target: Target, split: str, custom: bool) -> Path:
    """`eval.json` for the run's own weights on its own validation data, the result the report
    shows; any other evaluation gets a name of its own (eval-step-00000500.json,
    eval-train.json, eval-custom.json for other shards or overrides) and leaves that one be."""
    parts = [p for p in (target.label, "" if split == "val" else split, "custom" if custom else "")
             if p]  # fmt: skip
    return target.run_dir / ("eval.json" if not parts else f"eval-{'-'.join(parts)}.json")


def param_summary(r: recipe.Recipe) -> dict[str, Any]:
    """Parameter counts and optimiser groups of the recipe's model, built on the meta device
    (shapes only: instant and allocation-free even for large models)."""
    import torch

    from toolkit.engine.optim import build_groups
    from toolkit.models import param_counts

    with torch.device("meta"):
        model = build_model(r)
    total, trainable = param_counts(model)
    groups = [
        {
            "rule": g.rule,
            "layer": g.layer,
            "lr": g.lr,
            "weight_decay": g.weight_decay,
            "params": g.numel,
        }
        for g in build_groups(model, r.optim)
    ]
    return {"total": total, "trainable": trainable, "groups": groups}

"""Recipes read and checked: `extends` chains and overrides resolved, the model section built from
its architecture's dataclass, the checks across sections, the `stage:` compatibility.

The schema (one dataclass per section) is `toolkit.core.schema`; the machinery (extends,
overrides, strict types, "did you mean") is `toolkit.core.config`. The model section's fields
belong to the architecture `model.arch` names (`toolkit.models`), and `task` picks a registered
task (`toolkit.tasks`): both registries sit below this module, which is why it lives above them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from toolkit.core.config import (
    Origins,
    RecipeError,
    apply_override,
    build,
    kind,
    read_with_extends,
    setting,
    to_plain,
)
from toolkit.core.schema import (
    ClusterConfig,
    DataConfig,
    DeepSpeedConfig,
    GroupRule,
    InitConfig,
    ModelBase,
    OptimConfig,
    Recipe,
    RunConfig,
    SchedulerConfig,
    TrainConfig,
)
from toolkit.data.normalise import parse
from toolkit.models import MODELS
from toolkit.tasks import TASKS

# The schema's names, importable from here as before the schema moved to toolkit.core.schema.
__all__ = [
    "ClusterConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "GroupRule",
    "InitConfig",
    "ModelBase",
    "OptimConfig",
    "Recipe",
    "RecipeError",
    "RunConfig",
    "SchedulerConfig",
    "TrainConfig",
    "dump",
    "from_dict",
    "load",
    "setting",
    "shipped",
    "to_dict",
]

logger = logging.getLogger(__name__)


def shipped() -> Path:
    """The recipes that come with the toolkit: toolkit/recipes in an installed package (the wheel
    carries them there), else the checkout's recipes/."""
    here = Path(__file__).resolve().parents[1]  # toolkit/
    installed = here / "recipes"
    return installed if installed.is_dir() else here.parent / "recipes"


# --- loading -------------------------------------------------------------------------------------


def load(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe file, resolving `extends:` and applying dotted `key=value` overrides."""
    path = Path(path)
    origins = Origins(str(path))
    data = read_with_extends(path, origins)
    for item in overrides:
        apply_override(data, item, origins, path, Recipe)
    return _validated(data, origins)


def from_dict(data: Mapping[str, Any], origin: str = "<recipe>") -> Recipe:
    """Build and validate a recipe from an already-parsed mapping (e.g. a checkpoint's copy)."""
    origins = Origins(origin)
    origins.record(data, origin)
    return _validated(dict(data), origins)


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, with the YAML key names."""
    return to_plain(recipe)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML text; `load` of that text gives an equal recipe."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=False)


# --- the `stage:` recipes written before tasks and architectures existed ------------------------

# stage -> (task, architecture, model keys that architecture does not take)
_STAGES = {
    "pretrain": ("mae", "mae", ("sr_channels",)),
    "finetune": ("sr", "srmae", ()),
}


def _from_stage(data: dict[str, Any], origins: Origins) -> None:
    """Read an old `stage:` recipe (and the recipe.yaml of an old run) as task + architecture:
    its one model section held every field of both models, so the MAE drops `sr_channels`."""
    stage = data.pop("stage")
    if "task" in data:
        origins.fail("stage", "replaced by `task`; remove `stage` (this recipe gives both)")
    if stage not in _STAGES:
        choices = ", ".join(f"`task: {t}` for `stage: {s}`" for s, (t, _, _) in _STAGES.items())
        origins.fail("stage", f"{stage!r}: `stage` is replaced by `task`: write {choices}")
    task, arch, dropped = _STAGES[stage]
    data["task"] = task
    model = data.get("model")
    if isinstance(model, dict):
        model.setdefault("arch", arch)
        for key in dropped:
            model.pop(key, None)
    logger.info("%s: stage %s is read as task %s, model.arch %s", origins.of("stage"), stage,
                task, arch)  # fmt: skip


# --- validation ----------------------------------------------------------------------------------


def _validated(data: dict[str, Any], origins: Origins) -> Recipe:
    if "stage" in data:
        _from_stage(data, origins)
    task = data.get("task")
    if not isinstance(task, str) or not task:
        origins.fail("task", "missing: name what to train, one of: " + ", ".join(TASKS.names()))
    try:
        task_cls = TASKS.get(task)
    except KeyError as err:
        origins.fail("task", str(err))
    model = data.setdefault("model", {})
    if isinstance(model, dict) and model.get("arch") is None:
        model["arch"] = task_cls.default_arch
    recipe = _built(data, origins)
    _check(recipe, origins)
    for key, message in recipe.model.problems():
        origins.fail(f"model.{key}", message)
    for key, message in task_cls.problems(recipe):
        origins.fail(key, message)
    return recipe


def _built(data: dict[str, Any], origins: Origins) -> Recipe:
    """The recipe, its model section built from the dataclass of the architecture it names."""
    model = data.get("model", {})
    if not isinstance(model, Mapping):
        origins.fail("model", f"expected a mapping, got {kind(model)}")
    try:
        schema = MODELS.get(model.get("arch")).config
    except KeyError as err:
        origins.fail("model.arch", str(err.args[0]))
    recipe = build(Recipe, {k: v for k, v in data.items() if k != "model"}, origins, Recipe)
    return dataclasses.replace(recipe, model=build(schema, model, origins, Recipe, "model."))


_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_GRES = re.compile(r"^gpu(:[A-Za-z0-9_.-]+)?:\d+$")
_MEM = re.compile(r"^\d+[KMGT]?$")


def _check(r: Recipe, origins: Origins) -> None:
    """Checks that span several keys of the task-independent sections; each names the key."""
    fail = origins.fail
    if not _NAME.match(r.name) or r.name in (".", ".."):
        fail("name", f"{r.name!r} is not usable as a directory name: use letters, digits, _ . -")
    spec = MODELS.get(r.model.arch)  # type: ignore[arg-type]
    if r.task not in spec.tasks:
        fail("model.arch", f"{r.model.arch!r} does not do task {r.task!r} (it does: "
                           f"{', '.join(spec.tasks)})")  # fmt: skip
    for i, entry in enumerate(r.freeze):
        if entry in spec.freeze_modes:
            continue
        try:
            re.compile(entry)
        except re.error as err:
            modes = ", ".join(spec.freeze_modes) or "none"
            fail(f"freeze[{i}]", f"{entry!r} is neither a mode of {r.model.arch} ({modes}) "
                                 f"nor a valid regex: {err}")  # fmt: skip
    if r.freeze and not r.init.from_:
        fail("init.from", f"freeze {r.freeze} needs trained weights: set init.from to their run")
    if r.data.normalise is not None:
        try:
            parse(r.data.normalise)
        except ValueError as err:
            fail("data.normalise", str(err))
    if r.data.limit is not None and r.data.per_class is not None:
        fail("data.per_class", "set data.limit or data.per_class, not both (null: all samples)")
    decay = r.optim.layer_decay
    if decay is not None and decay != 1.0 and not spec.layer_decay:
        layered = ", ".join(n for n in MODELS.names() if MODELS.get(n).layer_decay)
        fail("optim.layer_decay", f"{decay}: model.arch {r.model.arch} has no transformer "
             f"layers to number (a ViT's: {layered}); use null")  # fmt: skip
    if not r.train.max_steps and not r.train.epochs:
        fail("train.epochs", "0 with no train.max_steps: nothing to train")
    betas = r.optim.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        fail("optim.betas", f"{betas} is not two numbers in [0, 1)")
    for i, rule in enumerate(r.optim.groups):
        try:
            re.compile(rule.match)
        except re.error as err:
            fail(f"optim.groups[{i}].match", f"{rule.match!r} is not a valid regex: {err}")
        if not rule.match:
            fail(f"optim.groups[{i}].match", "empty pattern matches every parameter")
    ds = r.deepspeed
    if ds is not None:
        if ds.offload_optimizer != "none" and ds.zero_stage < 1:
            fail("deepspeed.offload_optimizer", "needs deepspeed.zero_stage >= 1")
        if ds.offload_param != "none" and ds.zero_stage != 3:
            fail("deepspeed.offload_param", "needs deepspeed.zero_stage 3")
        if ds.zero_stage == 0 and r.train.precision == "bf16":
            fail("deepspeed.zero_stage", "0 with train.precision bf16 would export a bf16 copy of "
                 "the weights: use zero_stage 1 or more, precision 'no', or deepspeed: null "
                 "(DDP, whose bf16 autocasts fp32 weights)")  # fmt: skip
    if not _TIME.match(r.cluster.time):
        fail("cluster.time", f"{r.cluster.time!r} is not MM, HH:MM:SS or D-HH:MM:SS")
    if r.cluster.gres is not None and not _GRES.match(r.cluster.gres):
        fail("cluster.gres", f"{r.cluster.gres!r} is not gpu:N or gpu:TYPE:N")
    if r.cluster.mem is not None and not _MEM.match(r.cluster.mem):
        fail("cluster.mem", f"{r.cluster.mem!r} is not a Slurm memory size such as 64G or 512000M")

"""Recipe schema (a dataclass per component), loading with `extends:` and overrides, checks."""

from __future__ import annotations

import dataclasses
import difflib
import operator
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# This module is the schema's single source of truth and imports nothing else from the package,
# so every tool (launch, train, evaluate, report) reads recipes the same way.


class RecipeError(Exception):
    """A user error in a recipe or override: one line naming the file, the key and the problem."""


def _f(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A scalar schema field; `rules` hold its checks (gt, ge, lt, choices) and its YAML key."""
    return field(default=default, metadata=rules)


@dataclass
class DataConfig:
    # Folder written by `python -m toolkit.shard`, holding manifest.json and the tar shards.
    shards: str = "data/lensing-shards"
    # Super-resolution factor: HR side = LR side * scale.
    scale: int = _f(2, choices=(2, 3, 4))
    # Samples per process per optimiser micro-step (the global batch is this x world size).
    batch_size: int = _f(64, gt=0)
    # Validation batch per process; null: same as batch_size.
    val_batch_size: int | None = _f(None, gt=0)
    # DataLoader worker processes per rank (0: load in the training process).
    num_workers: int = _f(4, ge=0)
    # Samples held in the shuffle buffer of each worker (0: no sample shuffling).
    shuffle_buffer: int = _f(1000, ge=0)
    # How LR inputs are made from HR-only shards (paired shards carry their own LR).
    degrade: str = _f("bicubic", choices=("bicubic",))
    # Random flips and 90-degree rotations; the workload used none.
    augment: bool = False


@dataclass
class ModelConfig:
    # Image channels: 1 for the lensing data, 3 for RGB photographs.
    in_chans: int = _f(1, gt=0)
    # Side of the square HR image the MAE works on; a multiple of patch_size.
    img_size: int = _f(150, gt=0)
    # Side of a square ViT patch, in pixels.
    patch_size: int = _f(10, gt=0)
    # Encoder token width (the workload's embedding width).
    embed_dim: int = _f(256, gt=0)
    # Encoder transformer blocks.
    depth: int = _f(8, gt=0)
    # Encoder attention heads; must divide embed_dim.
    num_heads: int = _f(8, gt=0)
    # Decoder token width (the MAE's light decoder).
    decoder_embed_dim: int = _f(128, gt=0)
    # Decoder transformer blocks.
    decoder_depth: int = _f(4, gt=0)
    # Decoder attention heads; must divide decoder_embed_dim.
    decoder_num_heads: int = _f(4, gt=0)
    # Hidden width of each MLP as a multiple of the token width.
    mlp_ratio: float = _f(4.0, gt=0)
    # Fraction of patches hidden from the encoder during pretraining.
    mask_ratio: float = _f(0.75, ge=0, lt=1)
    # Pretraining target: each patch normalised by its own mean and variance.
    norm_pix_loss: bool = False
    # Channels of the convolution/deconvolution layers added for super-resolution.
    sr_channels: int = _f(64, gt=0)


@dataclass
class InitConfig:
    # Run directory or checkpoint of an earlier stage to start from; null: random init.
    from_: str | None = _f(None, key="from")
    # What to take from it: the model weights only (the optimiser starts fresh).
    load: str = _f("weights", choices=("weights",))


@dataclass
class GroupRule:
    # Regular expression searched in each trainable parameter's name; the first matching rule wins.
    match: str = _f()
    # Learning rate for the group; null: optim.lr.
    lr: float | None = _f(None, gt=0)
    # Weight decay for the group; null: optim.weight_decay (norms, biases, position embeddings: 0).
    weight_decay: float | None = _f(None, ge=0)


@dataclass
class SchedulerConfig:
    # cosine_warm_restarts (the workload's), cosine (with linear warmup) or constant.
    name: str = _f("cosine_warm_restarts", choices=("cosine_warm_restarts", "cosine", "constant"))
    # Epochs until the first restart (cosine_warm_restarts), stepped per optimiser step.
    T_0: int = _f(10, gt=0)
    # Factor by which each restart period grows (cosine_warm_restarts).
    T_mult: int = _f(1, ge=1)
    # Floor of the learning rate.
    eta_min: float = _f(0.0, ge=0)
    # Optimiser steps of linear warmup from 0 (cosine).
    warmup_steps: int = _f(0, ge=0)


@dataclass
class OptimConfig:
    # Optimiser; AdamW as in the workload.
    name: str = _f("adamw", choices=("adamw",))
    # Base learning rate: parameters that no group rule matches.
    lr: float = _f(5.0e-4, gt=0)
    # Base decoupled weight decay.
    weight_decay: float = _f(1.0e-4, ge=0)
    # Adam betas (beta1, beta2), each in [0, 1).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # Adam epsilon.
    eps: float = _f(1.0e-8, gt=0)
    # Ordered param-group rules; a rule that matches no trainable parameter is an error.
    groups: list[GroupRule] = field(default_factory=list)
    # Learning-rate schedule; each group follows it from its own base lr.
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class TrainConfig:
    # Passes over the training split.
    epochs: int = _f(1, ge=0)
    # Stop after this many optimiser steps; null: run all epochs.
    max_steps: int | None = _f(None, gt=0)
    # Finetune pixel loss (l1 or mse); null: the stage's own (pretrain: MAE masked-patch MSE,
    # finetune: l1).
    loss: str | None = _f(None, choices=("l1", "mse"))
    # Mixed precision: bf16 or no.
    precision: str = _f("bf16", choices=("bf16", "no"))
    # Micro-batches accumulated per optimiser step.
    grad_accum: int = _f(1, gt=0)
    # Maximum global gradient norm; null: no clipping.
    grad_clip: float | None = _f(1.0, gt=0)
    # Seed for model init, masking and data order (each rank derives its own stream).
    seed: int = _f(0, ge=0)
    # Evaluate every N optimiser steps; 0: at the end of each epoch.
    eval_every: int = _f(0, ge=0)
    # Checkpoint every N optimiser steps; 0: only at epoch ends and at the end.
    checkpoint_every: int = _f(500, ge=0)
    # Complete checkpoints kept on disk (older ones are deleted).
    keep_last: int = _f(3, gt=0)
    # Log training scalars every N optimiser steps.
    log_every: int = _f(10, gt=0)


@dataclass
class DeepSpeedConfig:
    # ZeRO stage: 0 (DeepSpeed without sharding), 1 (optimiser state), 2 (+gradients), 3 (+params).
    zero_stage: int = _f(2, choices=(0, 1, 2, 3))
    # Keep optimiser state in CPU memory (ZeRO >= 1).
    offload_optimizer: str = _f("none", choices=("none", "cpu"))
    # Keep parameters in CPU memory (ZeRO 3).
    offload_param: str = _f("none", choices=("none", "cpu"))


@dataclass
class ClusterConfig:
    # Slurm nodes for the job.
    nodes: int = _f(1, gt=0)
    # GPUs per node, one task each; 0: CPU nodes, one task per node.
    gpus_per_node: int = _f(8, ge=0)
    # Slurm partition; null: the site's default.
    partition: str | None = "gpu"
    # Wall-clock limit, Slurm syntax: MM, HH:MM:SS or D-HH:MM:SS.
    time: str = "24:00:00"
    # Slurm account to charge; null: the user's default.
    account: str | None = None
    # Slurm quality of service; null: the default.
    qos: str | None = None
    # Slurm node feature constraint; null: none.
    constraint: str | None = None
    # CPU cores per task (data loading workers live here).
    cpus_per_task: int = _f(8, gt=0)
    # Requeue the job after preemption or a time-limit warning, resuming from the checkpoint.
    requeue: bool = True


@dataclass
class RunConfig:
    # Run directory; null: runs/<name>.
    dir: str | None = None


@dataclass
class Recipe:
    # Run name, used for the default run directory runs/<name>.
    name: str = "run"
    # pretrain (MAE) or finetune (SR-MAE).
    stage: str = _f("pretrain", choices=("pretrain", "finetune"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    # Finetune mode: [] trains everything, [encoder] freezes the encoder, [mae] the whole MAE.
    freeze: list[str] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # DeepSpeed settings; null: plain DDP.
    deepspeed: DeepSpeedConfig | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.name


FREEZE_MODES = ("encoder", "mae")


# --- loading -------------------------------------------------------------------------------------


class _Origins:
    """Remembers which file (or override) set each dotted key, so errors can name it."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.by_key: dict[str, str] = {}

    def record(self, data: Any, origin: str, prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            return
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            self.by_key[dotted] = origin
            self.record(value, origin, dotted + ".")

    def of(self, dotted: str) -> str:
        key = dotted
        while key:
            if key in self.by_key:
                return self.by_key[key]
            key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
        return self.default


def load(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe file, resolving `extends:` and applying dotted `key=value` overrides."""
    path = Path(path)
    origins = _Origins(str(path))
    data = _read_with_extends(path, origins, chain=())
    for item in overrides:
        _apply_override(data, item, origins, path)
    return _validated(data, origins)


def from_dict(data: Mapping[str, Any], origin: str = "<recipe>") -> Recipe:
    """Build and validate a recipe from an already-parsed mapping (e.g. a checkpoint's copy)."""
    origins = _Origins(origin)
    origins.record(data, origin)
    return _validated(dict(data), origins)


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, with the YAML key names."""
    return _to_plain(recipe)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML text; `load` of that text gives an equal recipe."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe keys, got {_kind(data)}")
    return data


def _read_with_extends(path: Path, origins: _Origins, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError(f"{path}: extends: cycle: {cycle}")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        origins.record(data, str(path))
        return data
    # One parent, or a list merged in order (later ones win), then this file over all of them.
    names = parents if isinstance(parents, list) else [parents]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise RecipeError(
            f"{path}: extends: expected a path to another recipe or a list of them, got {parents!r}"
        )
    base: dict[str, Any] = {}
    for name in names:
        parent_path = path.parent / name
        if not parent_path.is_file():
            raise RecipeError(f"{path}: extends: {parent_path} not found")
        base = _merge(base, _read_with_extends(parent_path, origins, (*chain, resolved)))
    origins.record(data, str(path))
    return _merge(base, data)


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Key by key, the child wins; mappings merge recursively, anything else is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _apply_override(data: dict[str, Any], item: str, origins: _Origins, path: Path) -> None:
    key, sep, raw = item.partition("=")
    where = f"{path}: override {item!r}"
    if not sep or not _OVERRIDE_KEY.match(key):
        raise RecipeError(f"{where}: expected key=value with a dotted key, e.g. optim.lr=3e-4")
    if _is_text_field(key) and raw.strip() not in ("", "null", "~"):
        value: Any = raw  # YAML would turn 24:00:00 into 86400: text fields take the text as is
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # not YAML: keep the text; the schema says whether it is acceptable
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise RecipeError(f"{where}: {prefix} is {_kind(child)}, not a section")
        node = child
    node[parts[-1]] = value
    origins.by_key[key] = f"{path} (override {item})"
    origins.record(value, f"{path} (override {item})", key + ".")


def _is_text_field(dotted: str) -> bool:
    cls: Any = Recipe
    tp: Any = None
    for part in dotted.split("."):
        fields = {_yaml_key(f): f for f in dataclasses.fields(cls)} if cls else {}
        if part not in fields:
            return False
        tp = typing.get_type_hints(cls)[fields[part].name]
        cls = _dataclass_of(tp)
    return tp is str or tp == (str | None)


# --- validation ----------------------------------------------------------------------------------


def _validated(data: dict[str, Any], origins: _Origins) -> Recipe:
    recipe = _build(Recipe, data, "", origins)
    _check(recipe, origins)
    return recipe


def _yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _schema_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key the schema knows, for "did you mean" across sections."""
    paths = []
    for f in dataclasses.fields(cls):
        dotted = prefix + _yaml_key(f)
        paths.append(dotted)
        inner = _dataclass_of(typing.get_type_hints(cls)[f.name])
        if inner is not None and inner is not GroupRule:
            paths.extend(_schema_paths(inner, dotted + "."))
    return paths


def _dataclass_of(tp: Any) -> type | None:
    for arg in (tp, *typing.get_args(tp)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _suggest(dotted: str, known: list[str], prefix: str) -> str:
    leaf = dotted[len(prefix) :]
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    # A key put in the wrong section (e.g. `lr` at the top): look for the leaf anywhere.
    everywhere = [p for p in _schema_paths(Recipe) if p.rsplit(".", 1)[-1] == leaf]
    if everywhere:
        return f"; did you mean '{everywhere[0]}'?"
    return f"; expected one of: {', '.join(known)}"


def _build(cls: type, data: Any, prefix: str, origins: _Origins) -> Any:
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "recipe"
        raise RecipeError(f"{origins.of(where)}: {where}: expected a mapping, got {_kind(data)}")
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            hint = _suggest(dotted, list(fields), prefix)
            raise RecipeError(f"{origins.of(dotted)}: {dotted}: unknown key{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, f in fields.items():
        dotted = f"{prefix}{key}"
        if key in data:
            values[f.name] = _convert(hints[f.name], data[key], dotted, origins)
            _check_rules(f, values[f.name], dotted, origins)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{origins.of(dotted)}: {dotted}: missing required key")
    return cls(**values)


def _convert(tp: Any, value: Any, dotted: str, origins: _Origins) -> Any:
    def fail(expected: str) -> typing.NoReturn:
        got = f"{_kind(value)} {value!r}" if not isinstance(value, (dict, list)) else _kind(value)
        raise RecipeError(f"{origins.of(dotted)}: {dotted}: expected {expected}, got {got}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, dotted, origins)
    if dataclasses.is_dataclass(tp):
        if value is None:
            fail("a mapping")
        return _build(tp, value, dotted + ".", origins)
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{dotted}[{i}]", origins) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        # PyYAML reads `5e-4` (no dot) as a string; accept any text float() understands.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string (quote it in YAML)")
        return value
    raise TypeError(f"schema type {tp!r} of {dotted} is not supported")  # a bug in the schema


_BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<")}


def _check_rules(f: dataclasses.Field, value: Any, dotted: str, origins: _Origins) -> None:
    if value is None:
        return
    rules = f.metadata
    limits = [
        (op, f"{sym} {rules[name]}", rules[name])
        for name, (op, sym) in _BOUNDS.items()
        if name in rules
    ]
    if any(not op(value, bound) for op, _, bound in limits):
        wanted = " and ".join(text for _, text, _ in limits)
        raise RecipeError(
            f"{origins.of(dotted)}: {dotted}: {value!r} is out of range: expected {wanted}"
        )
    if "choices" in rules and value not in rules["choices"]:
        choices = ", ".join(str(c) for c in rules["choices"])
        raise RecipeError(f"{origins.of(dotted)}: {dotted}: {value!r} is not one of: {choices}")


_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check(r: Recipe, origins: _Origins) -> None:
    """Checks that span several keys; each names the key to change."""

    def fail(dotted: str, message: str) -> typing.NoReturn:
        raise RecipeError(f"{origins.of(dotted)}: {dotted}: {message}")

    if not _NAME.match(r.name) or r.name in (".", ".."):
        fail("name", f"{r.name!r} is not usable as a directory name: use letters, digits, _ . -")
    m = r.model
    if m.img_size % m.patch_size:
        fail("model.img_size", f"{m.img_size} is not divisible by model.patch_size {m.patch_size}")
    if m.embed_dim % m.num_heads:
        fail("model.num_heads", f"{m.num_heads} does not divide model.embed_dim {m.embed_dim}")
    if m.decoder_embed_dim % m.decoder_num_heads:
        fail(
            "model.decoder_num_heads",
            f"{m.decoder_num_heads} does not divide model.decoder_embed_dim {m.decoder_embed_dim}",
        )
    if r.stage == "finetune" and m.img_size % r.data.scale:
        fail("data.scale", f"{r.data.scale} does not divide model.img_size {m.img_size}")
    for i, mode in enumerate(r.freeze):
        if mode not in FREEZE_MODES:
            fail(f"freeze[{i}]", f"{mode!r} is not one of: {', '.join(FREEZE_MODES)}")
    if len(r.freeze) > 1:
        fail("freeze", "give one mode: [encoder] or [mae] ([mae] already includes the encoder)")
    if r.freeze and r.stage != "finetune":
        fail("freeze", "frozen modes are for stage: finetune")
    if r.freeze and not r.init.from_:
        fail("init.from", f"freeze {r.freeze} needs a pretrained model: set init.from to its run")
    if r.stage == "pretrain" and r.train.loss not in (None, "mse"):
        fail("train.loss", "pretrain trains the MAE objective (MSE on masked patches): use null")
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
    if not _TIME.match(r.cluster.time):
        fail("cluster.time", f"{r.cluster.time!r} is not MM, HH:MM:SS or D-HH:MM:SS")


# --- plain data ----------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {_yaml_key(f): _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    names.update({int: "an integer", float: "a number", type(None): "null"})
    return names.get(type(value), type(value).__name__)

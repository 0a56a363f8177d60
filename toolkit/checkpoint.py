"""Checkpoints: atomic save, find the newest complete one, load, retention, stage init, export.

A checkpoint is `checkpoints/step-NNNNNNNN/`: the accelerate state (model, optimiser, scheduler,
every rank's RNG), `train_state.json` and the resolved `recipe.yaml`. It is written under a
temporary name and renamed only after every rank's files are on disk and a `COMPLETE` file lists
them with their sizes; `checkpoints/latest` is updated last. Resuming verifies that list, so a
truncated or half-deleted checkpoint is reported and the previous complete one is used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from toolkit.engine.state import TrainState
from toolkit.errors import UserError

if TYPE_CHECKING:  # the engine imports accelerate: only its type is needed here
    from toolkit.engine.accel import Engine

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE = "train_state.json"
WEIGHTS = "model.safetensors"
FROZEN = "frozen.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    engine: Engine, run_dir: Path, state: TrainState, recipe_yaml: str, keep_last: int
) -> Path:
    """Write one complete checkpoint of the current step (collective: every rank calls it)."""
    root = checkpoint_dir(run_dir)
    final = root / step_name(state.step)
    tmp = root / f".tmp-{step_name(state.step)}"
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    engine.barrier()
    engine.save_state(tmp)
    engine.barrier()  # every rank's files are written before the checkpoint is declared complete
    if engine.is_main:
        if engine.frozen:  # exact fp32 frozen weights, which bf16 / ZeRO-1 would not keep
            save_file(engine.frozen, str(tmp / FROZEN))
        (tmp / STATE).write_text(state.to_json())
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        _write_atomic(tmp / COMPLETE, json.dumps({"step": state.step, "files": files}, indent=1))
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name + "\n")
        prune(root, keep_last)
    engine.barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temporary ones."""
    complete = [d for d in _step_dirs(root) if (d / COMPLETE).is_file()]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in [*root.glob(".tmp-step-*"), *root.glob(".universal-step-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def _step_dirs(root: Path) -> list[Path]:
    """step-* folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and _STEP_DIR.match(d.name))


def damage(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be trusted, or None when every file it lists is there, whole."""
    marker = ckpt / COMPLETE
    if not marker.is_file():
        return "incomplete (no COMPLETE file)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable {COMPLETE} ({err})"
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete, undamaged checkpoints, newest first; damaged ones are reported once here."""
    out = []
    for ckpt in reversed(_step_dirs(checkpoint_dir(run_dir))):
        problem = damage(ckpt)
        if problem is None:
            out.append(ckpt)
        else:
            logger.warning("checkpoint %s is damaged: %s; skipping it", ckpt, problem)
    return out


def resume(engine: Engine, run_dir: Path) -> TrainState | None:
    """Load the newest complete checkpoint of the run, if any; fall back to older ones when one
    fails to load. Returns its TrainState, or None for a fresh start."""
    for ckpt in complete_checkpoints(run_dir):
        try:
            engine.load_state(ckpt)
            state = TrainState.read(ckpt / STATE)
            if (ckpt / FROZEN).is_file():
                engine.frozen = load_file(str(ckpt / FROZEN))
        except Exception as err:  # any failure means: try the previous checkpoint
            logger.warning("checkpoint %s failed to load (%s); trying the previous one", ckpt, err)
            continue
        logger.info("resumed from %s (step %d, epoch %d)", ckpt, state.step, state.epoch)
        return state
    return None


def world_of(ckpt: Path) -> int:
    """How many processes wrote a checkpoint."""
    return TrainState.read(ckpt / STATE).world_size


def universal_dir(ckpt: Path) -> Path:
    """Where a checkpoint's universal conversion is written (beside it, so every node sees it;
    removed once loaded, and by `prune` if a run dies first)."""
    return ckpt.parent / f".universal-{ckpt.name}"


def consolidated(engine: Engine, ckpt: Path) -> dict[str, torch.Tensor]:
    """A ZeRO checkpoint's fp32 weights, frozen ones included (ZeRO-1 leaves them out)."""
    return _with_frozen(engine.consolidated(ckpt), ckpt)


def frozen_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The exact fp32 frozen parameters a DeepSpeed checkpoint keeps aside (none: empty)."""
    return _with_frozen({}, ckpt)


def _with_frozen(weights: dict[str, torch.Tensor], ckpt: Path) -> dict[str, torch.Tensor]:
    if (ckpt / FROZEN).is_file():
        weights.update(load_file(str(ckpt / FROZEN)))
    return weights


def resume_resharded(
    engine: Engine, model: Any, ckpt: Path, scheduler: Any, universal: bool
) -> TrainState:
    """Resume a ZeRO checkpoint on another number of processes. With `universal` (the
    checkpoint converted by `Engine.to_universal`), weights and optimiser state are loaded
    here, each rank taking its new share; otherwise the weights were loaded before set-up and
    the optimiser state starts afresh, which the log says. The scheduler and the train state
    are restored in both cases."""
    state = TrainState.read(ckpt / STATE)
    if universal:
        loaded = engine.load_universal(model, universal_dir(ckpt))  # agreed by every rank
        if engine.is_main:  # every rank has read its share (or failed): the conversion can go
            shutil.rmtree(universal_dir(ckpt), ignore_errors=True)
        if not loaded:
            raise UserError(
                f"{ckpt}: DeepSpeed could not load its universal conversion on "
                f"{engine.world_size} processes (see the log above); relaunch on "
                f"{state.world_size} processes, the number that wrote it, to resume"
            )
    sched = torch.load(ckpt / "scheduler.bin", weights_only=True)
    scheduler.load_state_dict(sched)
    if (ckpt / FROZEN).is_file():
        engine.frozen = load_file(str(ckpt / FROZEN))
    if universal:
        logger.info(
            "resumed from %s, written by %d processes, on %d through a universal checkpoint: "
            "model weights, optimiser state (Adam moments), scheduler, step and data position "
            "restored",
            ckpt, state.world_size, engine.world_size,
        )  # fmt: skip
    else:
        logger.warning(
            "resumed from %s, written by %d processes, on %d: model weights, scheduler, step and "
            "data position restored; the optimiser state (Adam moments) was RESET, because ZeRO "
            "shards it by process and the universal conversion failed (see above)",
            ckpt, state.world_size, engine.world_size,
        )  # fmt: skip
    return state


def export(state_dict: dict[str, torch.Tensor], run_dir: Path, step: int) -> Path:
    """The consolidated fp32 weights as `model.safetensors`: no pickle needed to load them."""
    path = run_dir / WEIGHTS
    tmp = path.with_name(f".{WEIGHTS}.tmp-{os.getpid()}")
    save_file(state_dict, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)
    return path


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """Model weights (fp32) from a .safetensors file, a run directory (its exported weights, or
    else its newest complete checkpoint) or a checkpoint directory (ZeRO shards gathered)."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such run directory, checkpoint or weights file")
    if path.is_file():
        return _load_safetensors(path)
    if (path / WEIGHTS).is_file():
        return _load_safetensors(path / WEIGHTS)
    ckpt = path if (path / STATE).is_file() else next(iter(complete_checkpoints(path)), None)
    if ckpt is not None and (ckpt / WEIGHTS).is_file():  # DDP: accelerate's model file
        return _with_frozen(_load_safetensors(ckpt / WEIGHTS), ckpt)
    if ckpt is not None:
        from toolkit.engine.accel import is_zero_checkpoint, zero_weights

        if is_zero_checkpoint(ckpt):
            try:
                return _with_frozen(zero_weights(ckpt), ckpt)
            except Exception as err:  # DeepSpeed's errors: damaged shards, ZeRO stage 0, ...
                raise UserError(f"{ckpt}: cannot gather its DeepSpeed weights ({err})") from None
    raise UserError(
        f"{path}: no weights found (expected {WEIGHTS} of a finished run, or a complete "
        "checkpoint under checkpoints/)"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None

"""Checkpoints, owned in one place: save, find, resume (on the same or another number of
processes), frozen weights, stage initialisation and the fp32 export.

A checkpoint is `checkpoints/step-NNNNNNNN/` holding named parts: the model, optimiser and
scheduler with every rank's RNG (accelerate's state, DeepSpeed shards under `pytorch_model/`),
the data cursor and the loop state (`train_state.json`), the exact fp32 frozen weights where
DeepSpeed would not keep them (`frozen.safetensors`) and the resolved `recipe.yaml`. It is
written under a temporary name and renamed only after every rank's files are on disk and a
`COMPLETE` file lists them with their sizes; `checkpoints/latest` is updated last. Resuming
verifies that list, so a truncated or half-deleted checkpoint is reported and the previous
complete one is used. The accelerate/DeepSpeed calls themselves are `Engine`'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from toolkit.core.atomic import write_atomic
from toolkit.core.errors import UserError
from toolkit.engine.state import TrainState
from toolkit.models import load_weights

if TYPE_CHECKING:  # accelerate is imported only where a run trains or gathers ZeRO shards
    from toolkit.engine.accel import Engine

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE = "train_state.json"
WEIGHTS = "model.safetensors"
FROZEN = "frozen.safetensors"
RECIPE = "recipe.yaml"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Parts:
    """What a checkpoint saves and restores, by name. `data` is the loader, whose cursor
    (`state_dict()`: epoch and batch) travels in the train state."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    data: Any


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from, and how."""

    path: Path
    world_size: int  # processes that wrote it
    reshard: bool  # ZeRO-sharded state written by another number of processes
    universal: bool  # ... converted to DeepSpeed's universal layout (else the optimiser resets)


class Checkpointer:
    def __init__(self, engine: Engine, run_dir: Path, keep_last: int, recipe_yaml: str) -> None:
        self.engine = engine
        self.run_dir = run_dir
        self.root = checkpoint_dir(run_dir)
        self.keep_last = keep_last
        self.recipe_yaml = recipe_yaml
        # Exact fp32 values of the frozen parameters under DeepSpeed, which holds them in bf16
        # and leaves them out of ZeRO-1 consolidation; written into every checkpoint and export.
        self.frozen: dict[str, torch.Tensor] = {}

    # --- before set-up ---------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, newest first, as the main process finds them (collective: one
        process checks every file of every checkpoint, not each of them)."""
        found = complete_checkpoints(self.run_dir) if self.engine.is_main else None
        return self.engine.broadcast(found)

    def find(self) -> Resume | None:
        """The newest complete checkpoint, if any. A ZeRO checkpoint of another number of
        processes is converted to the universal layout here (collective), which loads on any."""
        ckpts = self.checkpoints()
        if not ckpts:
            return None
        written = TrainState.read(ckpts[0] / STATE).world_size
        reshard = self.engine.shards_optimizer and written != self.engine.world_size
        universal = reshard and self.engine.to_universal(ckpts[0], universal_dir(ckpts[0]))
        return Resume(ckpts[0], written, reshard, universal)

    def prepare_model(self, model: nn.Module, resume: Resume | None, init: str | None) -> None:
        """Load what set-up cannot: on a reshard, the frozen weights the universal layout leaves
        out, or (its conversion failed) the consolidated weights; on a fresh start, `init`'s
        weights (stage chaining). Then keep the frozen values aside under DeepSpeed."""
        if resume is not None and resume.universal:
            model.load_state_dict(_frozen_file(resume.path), strict=False)
        elif resume is not None and resume.reshard:
            model.load_state_dict(consolidated(resume.path))
        elif resume is None and init:
            init_from(model, init)
        if self.engine.deepspeed is not None:
            self.frozen = {
                name: p.detach().float().cpu().clone()
                for name, p in model.named_parameters()
                if not p.requires_grad
            }

    # --- after set-up ----------------------------------------------------------------------------
    def restore(self, resume: Resume | None, parts: Parts) -> TrainState:
        """Every part as the checkpoint left it, or a fresh state; a run on another number of
        processes goes on by samples seen (step, schedule and data position rescaled)."""
        world = self.engine.world_size
        if resume is None:
            state = TrainState(world_size=world)
        elif resume.reshard:
            state = self._resume_resharded(resume, parts)
        else:
            state = self._resume(parts)
        if state.world_size != world:
            rescale(state, world, parts.scheduler, parts.data.batches_per_epoch,
                    announce=self.engine.is_main)  # fmt: skip
        parts.data.load_state_dict(state.data)
        return state

    def _resume(self, parts: Parts) -> TrainState:
        """The newest checkpoint that loads on every rank; older ones when one fails on any."""
        for ckpt in self.checkpoints():
            try:
                self.engine.load_state(ckpt)
                state = TrainState.read(ckpt / STATE)
                self._read_frozen(ckpt)
                failed = 0.0
            except Exception as err:  # any failure means: try the previous checkpoint
                logger.warning("checkpoint %s failed to load (%s)", ckpt, err)
                failed = 1.0
            if self.engine.all_sum([failed])[0]:  # every rank goes back together
                logger.warning("checkpoint %s did not load everywhere; trying the previous one",
                               ckpt)  # fmt: skip
                continue
            logger.info("resumed from %s (step %d, epoch %d)", ckpt, state.step, state.epoch)
            return state
        raise UserError(
            f"{self.root}: no checkpoint could be loaded; move the folder away to start over"
        )

    def _resume_resharded(self, resume: Resume, parts: Parts) -> TrainState:
        """A ZeRO checkpoint on another number of processes: with the universal conversion,
        weights and optimiser state load here, each rank taking its new share; without, the
        weights were loaded before set-up and the optimiser state starts afresh."""
        engine, ckpt = self.engine, resume.path
        if resume.universal:
            loaded = engine.load_universal(parts.model, universal_dir(ckpt))  # agreed by all ranks
            if engine.is_main:  # every rank has read its share (or failed): the conversion can go
                shutil.rmtree(universal_dir(ckpt), ignore_errors=True)
            if not loaded:
                raise UserError(
                    f"{ckpt}: DeepSpeed could not load its universal conversion on "
                    f"{engine.world_size} processes (see the log above); relaunch on "
                    f"{resume.world_size} processes, the number that wrote it, to resume"
                )
        parts.scheduler.load_state_dict(torch.load(ckpt / "scheduler.bin", weights_only=True))
        self._read_frozen(ckpt)
        where = (ckpt, resume.world_size, engine.world_size)
        if resume.universal:
            logger.info("resumed from %s, written by %d processes, on %d through a universal "
                        "checkpoint: model weights, optimiser state (Adam moments), scheduler, "
                        "step and data position restored", *where)  # fmt: skip
        else:
            logger.warning("resumed from %s, written by %d processes, on %d: model weights, "
                           "scheduler, step and data position restored; the optimiser state (Adam "
                           "moments) was RESET, because ZeRO shards it by process and the "
                           "universal conversion failed (see above)", *where)  # fmt: skip
        return TrainState.read(ckpt / STATE)

    def _read_frozen(self, ckpt: Path) -> None:
        if (ckpt / FROZEN).is_file():
            self.frozen = load_file(str(ckpt / FROZEN))

    # --- saving ----------------------------------------------------------------------------------
    def path(self, step: int) -> Path:
        return self.root / step_name(step)

    def save(self, state: TrainState) -> Path:
        """Write one complete checkpoint of the current step (collective: every rank calls it)."""
        engine, root = self.engine, self.root
        final, tmp = self.path(state.step), root / f".tmp-{step_name(state.step)}"
        if engine.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        engine.barrier()
        engine.save_state(tmp)
        # Every rank gives the sizes of the files it wrote alone, by name, as its own view of
        # them is current even on a file system whose other clients may still see them stale;
        # no rank lists or stats another's (N ranks doing so make N x N metadata calls on the
        # shared file system at every checkpoint). The main process adds the rest, its own.
        written = engine.gather(sizes(tmp, engine.rank_files(tmp)))
        if engine.is_main:
            assert written is not None
            files = {name: size for part in written for name, size in part.items()}
            files |= sizes_of_others(tmp, known=files)
            if self.frozen:
                save_file(self.frozen, str(tmp / FROZEN))
            (tmp / STATE).write_text(state.to_json())
            (tmp / RECIPE).write_text(self.recipe_yaml)
            for name in (STATE, RECIPE, *([FROZEN] if self.frozen else [])):
                files[name] = (tmp / name).stat().st_size
            listing = {"step": state.step, "files": dict(sorted(files.items()))}
            write_atomic(tmp / COMPLETE, json.dumps(listing, indent=1), durable=True)
            if final.exists():  # the same step saved again after a resume: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(root / "latest", final.name + "\n", durable=True)
            prune(root, self.keep_last, newest=final)
        engine.barrier()
        return final

    def export(self, model: nn.Module, step: int) -> Path | None:
        """The consolidated fp32 weights of the checkpoint of `step` as `model.safetensors` (no
        pickle needed to load them); collective, written by the main process."""
        weights = self.engine.full_state_dict(model, self.path(step))
        if not self.engine.is_main:
            return None
        weights.update(self.frozen)
        path = self.run_dir / WEIGHTS
        tmp = path.with_name(f".{WEIGHTS}.tmp-{os.getpid()}")
        save_file(weights, str(tmp), metadata={"step": str(step)})
        os.replace(tmp, path)
        return path


def rescale(
    state: TrainState, world: int, scheduler: Any, batches_per_epoch: int, announce: bool = True
) -> None:
    """Carry progress over to another number of processes by samples seen: every process takes
    the same batch per step, so `step` steps of `old` processes consumed the samples of
    `step * old / world` steps of `world`, rounded down to whole steps (at most one step's
    samples are seen again). The schedule and the data position follow (the same epoch, the
    same fraction of it; the exact sample order of the rest of that epoch differs)."""
    old = state.world_size
    step = state.step * old // world
    batch = min(state.data["batch"] * old // world, batches_per_epoch)
    if announce:  # one warning for the job, from its main process
        logger.warning(
            "resuming on %d process(es) a checkpoint written by %d: its position is mapped by "
            "samples consumed, %d steps x %d process(es) = %d steps x %d, rounded down to whole "
            "steps (%d samples seen); the learning-rate schedule goes on from step %d, the data "
            "from epoch %d batch %d (was %d; the rest of this epoch's sample order differs)",
            world, old, state.step, old, step, world, state.samples, step, state.data["epoch"],
            batch, state.data["batch"],
        )  # fmt: skip
    state.step, state.world_size = step, world
    state.data = {"epoch": state.data["epoch"], "batch": batch}
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
    inner.last_epoch = step - 1
    inner.step()  # sets every group's lr for `step`


def init_from(model: nn.Module, source: str) -> None:
    """Start a new stage from an earlier stage's weights, by parameter name (the optimiser starts
    fresh); parts the source lacks stay as initialised and are logged."""
    try:
        report = load_weights(model, read_weights(source))
    except ValueError as err:
        raise UserError(f"init.from {source}: {err}") from None
    logger.info("init.from %s: %s", source, report.summary())


# --- the files -----------------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def universal_dir(ckpt: Path) -> Path:
    """Where a checkpoint's universal conversion is written (beside it, so every node sees it;
    removed once loaded, and by `prune` if a run dies first)."""
    return ckpt.parent / f".universal-{ckpt.name}"


def sizes(root: Path, paths: list[Path]) -> dict[str, int]:
    """{path relative to `root`: size} of those of `paths` that exist (one stat each)."""
    out = {}
    for path in paths:
        try:
            out[str(path.relative_to(root))] = path.stat().st_size
        except FileNotFoundError:  # not written by this layout: the main process finds the rest
            continue
    return out


def sizes_of_others(root: Path, known: dict[str, int]) -> dict[str, int]:
    """{relative path: size} of the files under `root` not `known`: the folder is listed (names
    only) and only the files not known are stat-ed."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel not in known:
                out[rel] = os.stat(os.path.join(folder, name)).st_size
    return out


def prune(root: Path, keep_last: int, newest: Path | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temporary ones.
    `newest`, just written, is the newest even where checkpoints of later steps exist: those
    were written by another number of processes before a restart mapped the run back to an
    earlier step, and would otherwise be resumed from again, undoing what was trained since."""
    complete = [d for d in _step_dirs(root) if (d / COMPLETE).is_file()]
    if newest is not None and newest in complete:
        for later in complete[complete.index(newest) + 1 :]:
            logger.info("removing %s: superseded by %s, written after a restart on another "
                        "number of processes", later, newest.name)  # fmt: skip
            shutil.rmtree(later, ignore_errors=True)
        complete = complete[: complete.index(newest) + 1]
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
        try:  # one stat a file: the main process checks every file of every checkpoint
            found = (ckpt / name).stat()
        except OSError:
            return f"{name} is missing"
        if not stat.S_ISREG(found.st_mode):
            return f"{name} is missing"
        if found.st_size != size:
            return f"{name} has {found.st_size} bytes, expected {size}"
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete, undamaged checkpoints, newest first; damaged ones are reported here. Newest is
    the one `latest` names (the last written), then by step: after a restart on more processes
    the run goes on from an earlier step, and a checkpoint the old processes wrote at a later
    one must not be taken for newer (should the run die before `prune` removes it)."""
    out = []
    for ckpt in reversed(_step_dirs(checkpoint_dir(run_dir))):
        problem = damage(ckpt)
        if problem is None:
            out.append(ckpt)
        else:
            logger.warning("checkpoint %s is damaged: %s; skipping it", ckpt, problem)
    try:
        last = checkpoint_dir(run_dir) / (checkpoint_dir(run_dir) / "latest").read_text().strip()
    except OSError:
        return out
    return sorted(out, key=lambda c: c != last)  # stable: the rest stay newest first


def _frozen_file(ckpt: Path) -> dict[str, torch.Tensor]:
    """The exact fp32 frozen parameters a DeepSpeed checkpoint keeps aside (none: empty)."""
    return load_file(str(ckpt / FROZEN)) if (ckpt / FROZEN).is_file() else {}


def consolidated(ckpt: Path) -> dict[str, torch.Tensor]:
    """A ZeRO checkpoint's fp32 weights gathered from its shards, frozen ones included."""
    from toolkit.engine.accel import zero_weights

    return {**zero_weights(ckpt), **_frozen_file(ckpt)}


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """Model weights (fp32) from a .safetensors file, a run directory (its exported weights, or
    else its newest complete checkpoint) or a checkpoint directory (ZeRO shards gathered)."""
    from toolkit.engine.accel import is_zero_checkpoint

    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such run directory, checkpoint or weights file")
    if path.is_file():
        return _load_safetensors(path)
    if (path / WEIGHTS).is_file():
        return _load_safetensors(path / WEIGHTS)
    ckpt = path if (path / STATE).is_file() else next(iter(complete_checkpoints(path)), None)
    if ckpt is not None and (ckpt / WEIGHTS).is_file():  # DDP: accelerate's model file
        return {**_load_safetensors(ckpt / WEIGHTS), **_frozen_file(ckpt)}
    if ckpt is not None and is_zero_checkpoint(ckpt):
        try:
            return consolidated(ckpt)
        except Exception as err:  # DeepSpeed's errors: damaged shards, ZeRO stage 0, ...
            raise UserError(f"{ckpt}: cannot gather its DeepSpeed weights ({err})") from None
    raise UserError(
        f"{path}: no weights found (expected {WEIGHTS} of a finished run, or a complete "
        "checkpoint under checkpoints/)"
    )


def exported_step(run_dir: Path) -> int | None:
    """The step whose weights a run's `model.safetensors` holds (None: no export, or one that
    cannot be read). Exports that predate the recorded step count as the last checkpoint's."""
    from safetensors import safe_open

    path = run_dir / WEIGHTS
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            step = (f.metadata() or {}).get("step")
    except Exception:  # safetensors raises its own error types for a damaged file
        return None
    if step is None:
        ckpts = complete_checkpoints(run_dir)
        return TrainState.read(ckpts[0] / STATE).step if ckpts else None
    return int(step)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None

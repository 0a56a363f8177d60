"""train(recipe): the training loop, read top to bottom: build, resume, then eval / checkpoint /
step / log until the last step."""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit import checkpoint, recipe
from toolkit.data.loader import Loader, build_loader, read_manifest
from toolkit.engine.accel import Engine
from toolkit.engine.state import TrainState
from toolkit.engine.validate import Validation, eval_summary, validate_run, write_eval
from toolkit.errors import UserError
from toolkit.logging import RunLogger, image_grid
from toolkit.models import apply_freeze, build_model, load_mae_weights, param_counts
from toolkit.optim import build_groups, build_loss, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops; the last good checkpoint stays."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_by_signal: bool
    eval: dict[str, Any] | None


def train(r: recipe.Recipe) -> TrainResult:
    """Train one recipe in this process (one rank of a job)."""
    engine = Engine(r.train, r.deepspeed, micro_batch=r.data.batch_size)
    try:
        return _train(engine, r)
    except BaseException:
        # A failed run (a user error at resume, a non-finite loss, Ctrl-C) leaves the process
        # group without a barrier the other ranks may never reach, and resets accelerate's and
        # DeepSpeed's process-wide state, so a later run in this process starts clean.
        engine.abandon()
        raise


def _train(engine: Engine, r: recipe.Recipe) -> TrainResult:
    run_dir, cfg = r.run_dir, r.train
    finetune = r.stage == "finetune"
    engine.seed(cfg.seed, per_rank=False)  # the same initial model on every rank

    # --- build ---------------------------------------------------------------------------------
    model = build_model(r.model, r.stage, r.data.scale)
    if finetune:
        apply_freeze(model, r.freeze)
    ckpts = checkpoint.complete_checkpoints(run_dir)
    resuming = bool(ckpts)
    # A job restarted on another number of processes: ZeRO shards the optimiser state by
    # process, so the checkpoint is converted to DeepSpeed's universal layout, which loads on
    # any number. The frozen parameters, which that layout leaves out, are loaded before
    # set-up; should the conversion fail, the consolidated weights are, and the optimiser
    # starts afresh.
    reshard = (
        resuming and engine.shards_optimizer and checkpoint.world_of(ckpts[0]) != engine.world_size
    )
    universal = reshard and engine.to_universal(ckpts[0], checkpoint.universal_dir(ckpts[0]))
    if universal:
        model.load_state_dict(checkpoint.frozen_weights(ckpts[0]), strict=False)
    elif reshard:
        model.load_state_dict(checkpoint.consolidated(engine, ckpts[0]))
    elif r.init.from_ and not resuming:
        init_from(model, r.init.from_, finetune)
    groups = build_groups(model, r.optim)
    optimizer = build_optimizer(groups, r.optim)
    data = build_loader(
        r.data,
        "train",
        crop=r.model.img_size,
        seed=cfg.seed,
        rank=engine.rank,
        world_size=engine.world_size,
        need_lr=finetune,
    )
    val = None
    if read_manifest(r.data.shards).count("val"):
        val = build_loader(r.data, "val", crop=r.model.img_size, seed=cfg.seed, rank=engine.rank,
                           world_size=engine.world_size, need_lr=finetune)  # fmt: skip
    else:
        logger.warning("%s has no validation samples: the run is not evaluated", r.data.shards)
    plan = StepPlan(data.batches_per_epoch, cfg)
    scheduler = build_scheduler(
        optimizer, r.optim.scheduler, steps_per_epoch=plan.per_epoch, total_steps=plan.total
    )
    expected = [(g.rule, g.lr, g.weight_decay, g.numel) for g in groups]  # ZeRO-3 empties params
    model, optimizer, scheduler = engine.prepare(model, optimizer, scheduler, universal)
    engine.check_groups(optimizer, expected)
    loss_fn = build_loss(cfg.loss or "l1")
    recipe_yaml = recipe.dump(r)
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe_yaml)
    engine.seed(cfg.seed, per_rank=True)

    # --- resume --------------------------------------------------------------------------------
    resume_start = time.perf_counter()
    if reshard:
        state = checkpoint.resume_resharded(engine, model, ckpts[0], scheduler, universal)
    else:
        state = checkpoint.resume(engine, run_dir) if resuming else None
    rescaled = state is not None and state.world_size != engine.world_size
    if rescaled:
        rescale(state, engine.world_size, scheduler, data.batches_per_epoch)
    resume_seconds = time.perf_counter() - resume_start
    if resuming and state is None:
        raise UserError(
            f"{checkpoint.checkpoint_dir(run_dir)}: no checkpoint could be loaded; "
            "move the folder away to start the run over"
        )
    state = state or TrainState(world_size=engine.world_size)
    resumed_at = state.step if resuming else None
    saved_step = None if rescaled else resumed_at  # a new layout gets a checkpoint of its own
    data.load_state_dict(state.data)
    batches = _endless(data)
    log = RunLogger(
        run_dir,
        enabled=engine.is_main,
        total_steps=plan.total,
        start_step=state.step,
        log_every=cfg.log_every,
    )
    if resuming:
        log.log({"resume/seconds": resume_seconds}, state.step)
    total, trainable = param_counts(engine.unwrap(model))
    logger.info(
        "%s: %s, %d of %d parameters trainable, %d steps (%d per epoch), world %d",
        r.name,
        r.stage,
        trainable,
        total,
        plan.total,
        plan.per_epoch,
        engine.world_size,
    )
    stop = _StopFlag()
    last: Validation | None = None
    stop_requested = False

    # --- the loop ------------------------------------------------------------------------------
    try:
        while True:
            # A resumed run skips the eval of its first step: it ran before that checkpoint.
            if val is not None and state.step not in (0, resumed_at) and plan.eval_due(state.step):
                last = evaluate(engine, model, val, r, state, log, plan.epochs_done(state.step))
            if state.step > 0 and plan.checkpoint_due(state.step) and state.step != saved_step:
                saved_step = save(engine, run_dir, state, recipe_yaml, cfg.keep_last, log)
            if state.step >= plan.total or stop_requested:
                break
            t0 = time.perf_counter()
            loss_sum, count, grad_norm, wait = train_step(
                engine, model, optimizer, batches, state, r, loss_fn
            )
            scheduler.step()
            # One small all-reduce per step: the mean loss, and whether any rank was asked to
            # stop or saw a non-finite loss, so every rank decides the same at the same step.
            loss_sum, count, stop_votes = engine.all_sum([loss_sum, count, float(stop.requested)])
            state.step += 1
            state.samples += int(count)
            state.data = data.state_dict()
            state.epoch = state.data["epoch"]
            epochs = plan.epochs_done(state.step)
            loss = loss_sum / count
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss is {loss} at step {state.step}; stopping. The last good checkpoint "
                    f"stays in {checkpoint.checkpoint_dir(run_dir)}"
                )
            stop_requested = stop_votes > 0
            if state.step % cfg.log_every == 0 or state.step == plan.total:
                elapsed = time.perf_counter() - t0
                scalars = step_scalars(
                    loss, grad_norm, optimizer, count / elapsed, wait / elapsed, epochs
                )
                log.log(scalars, state.step)
    except NonFiniteLoss:
        log.close()
        raise
    finally:
        stop.restore()
        batches.close()  # ends the DataLoader workers of the current epoch

    # --- the end -------------------------------------------------------------------------------
    if stop_requested:
        logger.info("stopped by a signal at step %d; relaunch to resume", state.step)
    elif val is not None and (last is None or not plan.eval_due(state.step)):
        last = evaluate(engine, model, val, r, state, log, plan.epochs_done(state.step))
    if state.step != saved_step:
        save(engine, run_dir, state, recipe_yaml, cfg.keep_last, log)
    summary = None
    if not stop_requested:  # a preempted job has seconds left: export when it really ends
        ckpt = checkpoint.checkpoint_dir(run_dir) / checkpoint.step_name(state.step)
        weights = engine.full_state_dict(model, ckpt)
        if engine.is_main:
            checkpoint.export(weights, run_dir, state.step)
            if last is not None:
                summary = write_eval(run_dir / "eval.json", eval_summary(last, "val", r.stage))
    log.close()
    engine.close(model, optimizer, scheduler)
    return TrainResult(run_dir, state.step, stop_requested, summary)


# --- the named calls of the loop ----------------------------------------------------------------


def train_step(
    engine: Engine,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict[str, Any]],
    state: TrainState,
    r: recipe.Recipe,
    loss_fn: Any,
) -> tuple[float, float, float, float]:
    """One optimiser step over `grad_accum` micro-batches: (loss x samples, samples, grad norm,
    seconds spent waiting for data)."""
    loss_sum, count, wait, grad_norm = 0.0, 0, 0.0, float("nan")
    for micro in range(r.train.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        with engine.accumulate(model):
            loss = forward_loss(engine, model, batch, r, state.step, micro, loss_fn)
            engine.backward(loss)
            if engine.sync_gradients:
                grad_norm = engine.clip_grad_norm(model, r.train.grad_clip)
            optimizer.step()  # accelerate makes these no-ops until the gradients are synced
            optimizer.zero_grad(set_to_none=True)
        n = batch["hr"].shape[0]
        loss_sum += loss.detach().float().item() * n
        count += n
    return loss_sum, count, grad_norm, wait


def forward_loss(
    engine: Engine,
    model: nn.Module,
    batch: dict[str, Any],
    r: recipe.Recipe,
    step: int,
    micro: int,
    loss_fn: Any,
) -> torch.Tensor:
    hr = batch["hr"].to(engine.device, non_blocking=True)
    dtype = engine.input_dtype
    if r.stage == "pretrain":
        # Masking noise from its own generator, seeded by (seed, step, micro-batch, rank): the
        # same masks after a resume, and no dependence on what else drew random numbers.
        patches = (r.model.img_size // r.model.patch_size) ** 2
        g = torch.Generator().manual_seed(_mix(r.train.seed, step, micro, engine.rank))
        noise = torch.rand(hr.shape[0], patches, generator=g).to(engine.device)
        return model(hr.to(dtype), noise=noise).loss
    sr = model(batch["lr"].to(engine.device, dtype, non_blocking=True))
    return loss_fn(sr.float(), hr)


def evaluate(
    engine: Engine,
    model: nn.Module,
    val: Loader,
    r: recipe.Recipe,
    state: TrainState,
    log: RunLogger,
    epochs: float,
) -> Validation:
    """Validate on every rank's share, gather per-sample metrics, log them on rank 0."""
    module = engine.unwrap(model)
    module.eval()
    result = validate_run(
        module, iter(val), r, device=engine.device, dtype=engine.input_dtype,
        autocast=engine.autocast,
    )  # fmt: skip
    module.train()
    result = result.gathered()
    scalars = {f"val/{k}": v for k, v in result.model.summary().items()}
    if result.bicubic is not None:
        scalars.update({f"val/{k}_bicubic": v for k, v in result.bicubic.summary().items()})
    score = scalars.get("val/psnr", -scalars["val/loss"])
    if state.best is None or score > state.best:
        state.best, state.best_step = score, state.step
    log.log({**scalars, "epoch": epochs}, state.step)
    if result.grid_rows:
        log.images("val/samples", image_grid(result.grid_rows), state.step)
    return result


def save(
    engine: Engine, run_dir: Path, state: TrainState, recipe_yaml: str, keep: int, log: RunLogger
) -> int:
    start = time.perf_counter()
    path = checkpoint.save(engine, run_dir, state, recipe_yaml, keep)
    seconds = time.perf_counter() - start
    if engine.is_main:
        logger.info("checkpoint %s written in %.2f s", path, seconds)
    log.log({"checkpoint/seconds": seconds}, state.step)
    return state.step


def step_scalars(
    loss: float,
    grad_norm: float,
    optimizer: torch.optim.Optimizer,
    images_per_s: float,
    data_wait: float,
    epochs: float,
) -> dict[str, float]:
    scalars = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/images_per_s": images_per_s,
        "train/data_wait": data_wait,
        "epoch": epochs,
    }
    for group in optimizer.param_groups:
        scalars[f"train/lr/{group['name']}"] = group["lr"]
    return scalars


def rescale(state: TrainState, world: int, scheduler: Any, batches_per_epoch: int) -> None:
    """Carry progress over to another number of processes by samples seen: the step counter,
    the schedule and the data position (the same epoch, the same fraction of it; the exact
    sample order of the rest of that epoch differs)."""
    old = state.world_size
    step = state.step * old // world
    batch = min(state.data["batch"] * old // world, batches_per_epoch)
    logger.warning(
        "the run continues on %d processes instead of %d: step %d -> %d, epoch %d batch %d -> %d",
        world, old, state.step, step, state.data["epoch"], state.data["batch"], batch,
    )  # fmt: skip
    state.step, state.world_size = step, world
    state.data = {"epoch": state.data["epoch"], "batch": batch}
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
    inner.last_epoch = step - 1
    inner.step()  # sets every group's lr for `step`


def init_from(model: nn.Module, source: str, finetune: bool) -> None:
    """Start a new stage from an earlier stage's weights (the optimiser starts fresh)."""
    state = checkpoint.read_weights(source)
    if finetune:
        try:
            report = load_mae_weights(model, state)
        except ValueError as err:
            raise UserError(f"init.from {source}: {err}") from None
        logger.info("init.from %s: %s", source, report.summary())
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"init.from {source}: not an MAE of this shape (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


# --- small helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """Step counts of the run and which steps evaluate and checkpoint: pure functions of the step,
    so a resumed run does exactly what the uninterrupted one did."""

    batches_per_epoch: int
    cfg: recipe.TrainConfig

    @property
    def per_epoch(self) -> int:
        return max(1, self.batches_per_epoch // self.cfg.grad_accum)

    @property
    def total(self) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        return max(1, self.cfg.epochs * self.batches_per_epoch // self.cfg.grad_accum)

    def epochs_done(self, step: int) -> float:
        """Epochs of data consumed after `step` steps (fractional: for loss curves)."""
        return step * self.cfg.grad_accum / self.batches_per_epoch

    def epoch_end(self, step: int) -> bool:
        """True when the batches of this step finished an epoch (steps may straddle epochs)."""
        k, b = self.cfg.grad_accum, self.batches_per_epoch
        return step * k // b > (step - 1) * k // b

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return step % every == 0 if every else self.epoch_end(step)

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return step % every == 0 if every else self.epoch_end(step)


def _endless(loader: Loader) -> Generator[dict[str, Any], None, None]:
    """Batches across epoch boundaries; the loader's cursor follows each batch handed out."""
    while True:
        yield from loader


def _mix(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _StopFlag:
    """SIGTERM / SIGUSR1 / SIGUSR2 set a flag; the loop checkpoints at the next step boundary
    (saving inside a signal handler could interrupt a half-done step)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning(
            "received %s: will checkpoint and stop after this step", signal.Signals(signum).name
        )
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""train(recipe): the training loop, read top to bottom: build, restore, then eval / checkpoint /
step / log until the last step, then finish. What is trained and how it is scored is the task's
(`toolkit.tasks`); what is saved and restored is the Checkpointer's."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import signal
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.core.atomic import write_atomic
from toolkit.core.logging import RunLogger, image_grid
from toolkit.core.metrics import metric
from toolkit.data import subset
from toolkit.data.format import TRAINED_ON, Manifest, trained_on, write_json
from toolkit.data.loader import Loader, build_loader
from toolkit.data.normalise import resolve
from toolkit.engine.accel import Engine
from toolkit.engine.checkpointer import Checkpointer, Parts, Resume
from toolkit.engine.model import build_model
from toolkit.engine.optim import build_groups, build_optimizer, build_scheduler
from toolkit.engine.state import TrainState
from toolkit.engine.steps import StepPlan
from toolkit.engine.sums import NonFiniteLoss, StepSums, Window
from toolkit.engine.validate import Validation, summary, validate, write_eval
from toolkit.models import param_counts
from toolkit.models.vit import drop_path_stream
from toolkit.runs import preflight, recipe, sweep
from toolkit.runs.directory import Finished
from toolkit.runs.hold import acquire
from toolkit.tasks import Placement, Task, task_of

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_by_signal: bool
    eval: dict[str, Any] | None


@dataclass
class Run:
    """Everything `build` makes for one run, prepared for this process."""

    r: recipe.Recipe
    task: Task
    engine: Engine
    parts: Parts
    val: Loader | None
    plan: StepPlan
    ckpt: Checkpointer
    resume: Resume | None
    trained: dict[str, Any]  # what the run records of its shards (data.json)
    subset: dict[str, Any] | None  # the training subset's record with its keys (subset.json)
    log: RunLogger | None = None

    def close_loaders(self) -> None:
        """End the data workers, which live across epochs and evaluations until here."""
        self.parts.data.close()
        if self.val is not None:
            self.val.close()


def train(r: recipe.Recipe) -> TrainResult:
    """Train one recipe in this process (one rank of a job)."""
    engine = Engine(r.train, r.deepspeed, micro_batch=r.data.batch_size)
    run, hold = None, None
    try:
        # A run that reached its end is left as it is, whatever the number of processes (and
        # whether its shards are still there); then the inputs are checked, by one process for
        # the job, and every rank stops with the same line if one does not fit.
        done, manifest = engine.on_main(lambda: admitted(r, engine.world_size))
        if done is not None:
            if engine.is_main:
                logger.warning("%s", done.line())
            engine.close()
            return TrainResult(r.run_dir, done.step, False, None)
        hold = engine.on_main(lambda: acquire(r.run_dir, f"training {r.name}"), share=False)
        run = build(engine, r, manifest)
        state = restore(run)
        return finish(run, loop(run, state))
    except BaseException:
        # A failed run (a user error at resume, a non-finite loss, Ctrl-C) leaves the process
        # group without a barrier the other ranks may never reach, and resets accelerate's and
        # DeepSpeed's process-wide state, so a later run in this process starts clean.
        engine.abandon()
        raise
    finally:
        if run is not None:
            run.close_loaders()
        if hold is not None:
            hold.release()


def admitted(r: recipe.Recipe, world_size: int) -> tuple[Finished | None, Manifest | None]:
    """On the main process, for the job: the finished run to leave as it is, or else the
    manifest, read once (with one check of its shards) for the relaunch check, the preflight
    and the loaders, with the training subset the recipe cuts, if any, chosen here too (every
    rank reads that one; a refusal while choosing it stops every rank with the same line)."""
    done, manifest = preflight.admit(r, world_size)
    return done, (subset.restrict(manifest, r.data) if manifest is not None else None)


def build(engine: Engine, r: recipe.Recipe, manifest: Manifest) -> Run:
    """Model, optimiser, schedule and loaders, prepared for this process from `manifest` (the
    job's, as `admitted` gives it); the checkpoint to resume from, if any, and what of it must
    be loaded before set-up."""
    engine.seed(r.train.seed, per_rank=False)  # the same initial model on every rank
    # The normalisation in force, written into the run's recipe.yaml (evaluate and predict
    # map values as the training did, whatever shards they are given).
    norm = resolve(r.data.normalise, manifest)
    r = dataclasses.replace(r, data=dataclasses.replace(r.data, normalise=str(norm)))
    task = task_of(r)
    task.use_shards(manifest)
    model = build_model(r, task)
    recipe_yaml = recipe.dump(r)
    ckpt = Checkpointer(engine, r.run_dir, r.train.keep_last, recipe_yaml)
    resume = ckpt.find()
    ckpt.prepare_model(model, resume, r.init.from_)
    if r.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if r.train.compile:
        model.compile()  # in place: the parameter names, and so the checkpoints, stay the same
    groups = build_groups(model, r.optim)
    optimizer = build_optimizer(groups, r.optim, fused=engine.fused_optimizer)
    data = split_loader(r, task, "train", engine, manifest)
    val = split_loader(r, task, "val", engine, manifest) if manifest.count("val") else None
    if val is None:
        logger.warning("%s has no validation samples: the run is not evaluated", r.data.shards)
    plan = StepPlan(data.batches_per_epoch, r.train)
    scheduler = build_scheduler(
        optimizer, r.optim.scheduler, steps_per_epoch=plan.per_epoch, total_steps=plan.total
    )
    expected = [(g.name, g.lr, g.weight_decay, g.numel) for g in groups]  # ZeRO-3 empties params
    universal = resume is not None and resume.universal
    model, optimizer, scheduler = engine.prepare(model, optimizer, scheduler, universal)
    engine.check_groups(optimizer, expected)
    engine.seed(r.train.seed, per_rank=True)
    parts = Parts(model, optimizer, scheduler, data)
    trained = trained_on(manifest, str(norm))
    return Run(r, task, engine, parts, val, plan, ckpt, resume, trained, manifest.subset)


def split_loader(
    r: recipe.Recipe, task: Task, split: str, engine: Engine, manifest: Manifest
) -> Loader:
    return build_loader(r.data, split, crop=r.model.img_size, seed=r.train.seed,
                        rank=engine.rank, world_size=engine.world_size, fields=task.fields,
                        pin_memory=engine.device.type == "cuda", manifest=manifest)  # fmt: skip


def restore(run: Run) -> TrainState:
    """The checkpoint's state of every part (or a fresh one), and the run's logger."""
    start = time.perf_counter()
    state = run.ckpt.restore(run.resume, run.parts)
    if run.engine.is_main:  # only now: a relaunch that cannot resume leaves the run's files be
        write_atomic(run.r.run_dir / "recipe.yaml", run.ckpt.recipe_yaml)
        write_json(run.r.run_dir / TRAINED_ON, run.trained)
        if run.subset is not None:  # which samples it trained on, key by key
            write_json(run.r.run_dir / subset.SUBSET, run.subset)
        else:  # relaunched without one: a list left by an earlier launch would misstate it
            (run.r.run_dir / subset.SUBSET).unlink(missing_ok=True)
    run.log = RunLogger(run.r.run_dir, enabled=run.engine.is_main, total_steps=run.plan.total,
                        start_step=state.step, log_every=run.r.train.log_every)  # fmt: skip
    if run.resume is not None:
        run.log.log({"resume/seconds": time.perf_counter() - start}, state.step)
    total, trainable = param_counts(run.engine.unwrap(run.parts.model))
    logger.info(
        "%s: task %s, model %s, %d of %d parameters trainable, %d steps (%d per epoch), world %d",
        run.r.name, run.r.task, run.r.model.arch, trainable, total, run.plan.total,
        run.plan.per_epoch, run.engine.world_size,
    )  # fmt: skip
    return state


@dataclass
class Outcome:
    """Where the loop left off."""

    state: TrainState
    last: Validation | None  # the latest validation (on the main process)
    validated: int | None  # the step it ran at, the same on every rank
    stopped: bool  # by a signal, before the last step
    saved: int | None  # the step of the latest checkpoint this run wrote or resumed from


def loop(run: Run, state: TrainState) -> Outcome:
    """Steps until the last one, or until a stop signal."""
    engine, plan, log, cfg = run.engine, run.plan, run.log, run.r.train
    assert log is not None
    resumed_at = state.step if run.resume is not None else None
    # A restart on another number of processes writes a checkpoint of its own layout.
    saved = resumed_at if run.resume is not None and state.world_size == run.resume.world_size \
        else None  # fmt: skip
    batches = _endless(run.parts.data)
    stop = _StopFlag()
    sums = StepSums(engine, run.ckpt.root)
    window = Window()
    last: Validation | None = None
    validated: int | None = None
    try:
        while True:
            # A resumed run skips the eval of its first step: it ran before that checkpoint.
            evaluate = run.val is not None and state.step not in (0, resumed_at) \
                and plan.eval_due(state.step)  # fmt: skip
            checkpoint = state.step > 0 and plan.checkpoint_due(state.step) and state.step != saved
            if evaluate or checkpoint:
                sums.read_all()  # a non-finite loss stops here, before it is saved or scored
            if evaluate:
                last, validated = run_validation(run, state), state.step
            if checkpoint:
                saved = save(run, state)
            if state.step >= plan.total or sums.stopped:
                break
            loss_sum, count, grad_norm, wait = train_step(run, batches, state)
            run.parts.scheduler.step()
            state.step += 1
            # Every rank takes as many samples per step (the epoch plan pads ranks to equal
            # batches), so the count needs no reduction.
            state.samples += count * engine.world_size
            state.data = run.parts.data.state_dict()
            state.epoch = state.data["epoch"]
            window.add(count * engine.world_size, wait)
            sums.start(state.step, loss_sum, count * engine.world_size, stop.requested)
            sums.read_all(keep=1)  # the step before's: done by now, so reading waits for nothing
            if state.step % cfg.log_every == 0 or state.step == plan.total:
                loss = sums.read_all()
                norm = engine.grad_norm(run.parts.model, grad_norm)
                images_per_s, wait_share = window.rates()
                scalars = step_scalars(loss, norm, run.parts.optimizer, images_per_s, wait_share,
                                       plan.epochs_done(state.step))  # fmt: skip
                log.log(scalars, state.step)
        sums.read_all()
    except NonFiniteLoss:
        log.close()
        raise
    finally:
        stop.restore()
        batches.close()
    return Outcome(state, last, validated, sums.stopped, saved)


def finish(run: Run, end: Outcome) -> TrainResult:
    """The final evaluation, the last checkpoint, the exported weights and `eval.json`; a run
    stopped by a signal has seconds left, so it only checkpoints (its relaunch finishes)."""
    r, engine, state, last = run.r, run.engine, end.state, end.last
    if end.stopped:
        logger.info("stopped by a signal at step %d; relaunch to resume", state.step)
    elif run.val is not None and end.validated != state.step:
        last = run_validation(run, state)
    if state.step != end.saved:
        save(run, state)
    doc = None
    if not end.stopped:
        run.ckpt.export(run.parts.model, state.step)
        if engine.is_main and last is not None:
            split = subset.eval_split(r.data, "val")
            doc = write_eval(r.run_dir / "eval.json", summary(run.task, last, split), last)
            _hparams(run, doc, state.step)
    assert run.log is not None
    run.log.close()
    engine.close(run.parts.model, run.parts.optimizer, run.parts.scheduler)
    return TrainResult(r.run_dir, state.step, end.stopped, doc)


def _hparams(run: Run, doc: dict[str, Any], step: int) -> None:
    """A sweep variant's swept values (as its resolved recipe has them: numbers as numbers) and
    final metrics on TensorBoard's HParams dashboard; nothing for a run outside a sweep."""
    swept = sweep.swept_of(run.r.run_dir)
    if not swept:
        return
    plain = recipe.to_dict(run.r)
    values = {k: sweep.value_at(plain, k) for k in swept}
    assert run.log is not None
    run.log.hparams(values, doc.get("model") or {}, step)


# --- the named calls of the loop ----------------------------------------------------------------


def train_step(
    run: Run, batches: Iterator[dict[str, Any]], state: TrainState
) -> tuple[torch.Tensor, int, torch.Tensor | None, float]:
    """One optimiser step over `grad_accum` micro-batches, queued on the device and not waited
    for: (loss x samples on the device, samples of this rank, the gradient norm on the device,
    seconds spent waiting for data)."""
    engine, model, optimizer = run.engine, run.parts.model, run.parts.optimizer
    at = Placement(engine.device, engine.train_autocast)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    count, wait, grad_norm = 0, 0.0, None
    for micro in range(run.r.train.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        # The task's randomness (MAE masks) and the model's (stochastic depth) from their own
        # stream, seeded by (seed, step, micro-batch, rank): the same after a resume, whatever
        # else drew random numbers.
        rng = torch.Generator().manual_seed(_mix(run.r.train.seed, state.step, micro, engine.rank))
        with engine.accumulate(model):
            with drop_path_stream(rng):
                loss = run.task.train_loss(model, batch, at, rng)
            engine.backward(loss)
            if engine.sync_gradients:
                grad_norm = engine.clip_grad_norm(model, run.r.train.grad_clip)
            optimizer.step()  # accelerate makes these no-ops until the gradients are synced
            optimizer.zero_grad(set_to_none=True)
        n = len(batch["key"])
        loss_sum = loss_sum + loss.detach().double() * n
        count += n
    return loss_sum, count, grad_norm, wait


def run_validation(run: Run, state: TrainState) -> Validation | None:
    """Validate on every rank's share, gather the per-sample metrics on the main process and
    log them there (None on the other ranks)."""
    engine, task = run.engine, run.task
    assert run.val is not None and run.log is not None
    module = engine.unwrap(run.parts.model)
    module.eval()
    at = Placement(engine.device, engine.autocast)
    result = validate(task, module, iter(run.val), at).gathered()
    module.train()
    if result is None:
        return None
    scalars = {f"val/{k}": v for k, v in task.scores(result.model).items() if v is not None}
    if result.reference is not None:
        scalars.update({f"val/{k}_{task.reference}": v
                        for k, v in result.reference.summary().items()})  # fmt: skip
    value = scalars[f"val/{task.score}"]
    score = value if metric(task.score).higher_is_better else -value
    if state.best is None or score > state.best:
        state.best, state.best_step = score, state.step
    run.log.log({**scalars, "epoch": run.plan.epochs_done(state.step)}, state.step)
    if result.tiles:
        run.log.images("val/samples", image_grid(result.tiles), state.step)
    return result


def save(run: Run, state: TrainState) -> int:
    start = time.perf_counter()
    path = run.ckpt.save(state)
    seconds = time.perf_counter() - start
    if run.engine.is_main:
        logger.info("checkpoint %s written in %.2f s", path, seconds)
    assert run.log is not None
    run.log.log({"checkpoint/seconds": seconds}, state.step)
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
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the allocator's own count (a host-side read): the peak of tensors since the start
        scalars["train/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return scalars


# --- small helpers ------------------------------------------------------------------------------


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

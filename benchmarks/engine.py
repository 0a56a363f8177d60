"""Engine benchmark: the toolkit's training step (loop, data worker, logging and all) against a
bare PyTorch loop over the same model, batch size and optimiser in the same process, in
alternating rounds with the spread of the per-round ratio; checkpoint save and resume times.

    python -m benchmarks.engine [--rounds 7] [--steps 30] [--recipe recipes/demo/finetune.yaml]
                                [--workers N] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import report
from toolkit.data.loader import build_loader
from toolkit.data.sharding import shard
from toolkit.engine.model import build_model
from toolkit.engine.optim import build_groups, build_optimizer
from toolkit.runs import recipe
from toolkit.runs.loop import train
from toolkit.tasks import Placement, task_of


def make_data(root: Path, count: int, size: int, scale: int) -> Path:
    rng = np.random.default_rng(0)
    for side in ("hr", "lr"):
        (root / "src" / side).mkdir(parents=True)
    for i in range(count):
        hr = rng.random((size, size), dtype=np.float32)
        lr = hr.reshape(size // scale, scale, size // scale, scale).mean(axis=(1, 3))
        np.save(root / "src" / "hr" / f"{i:05d}.npy", hr)
        np.save(root / "src" / "lr" / f"{i:05d}.npy", lr.astype(np.float32))
    shard(root / "src", root / "shards", val_fraction=0.05, shard_size=200)
    return root / "shards"


def seconds_per_step(run_dir: Path, skip: int) -> float:
    """Mean seconds per step after step `skip`, from the run's own log lines (every
    `train.log_every` steps): the loop's real cost, logging included, start-up left out."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = sorted((x["step"], x["time"]) for x in lines if "train/loss" in x)
    (s0, t0), (s1, t1) = next(p for p in logged if p[0] >= skip), logged[-1]
    return (t1 - t0) / (s1 - s0)


def logged_seconds(run_dir: Path) -> dict[str, float]:
    """The checkpoint and resume seconds the run logged."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        k: v for x in lines for k, v in x.items() if k in ("checkpoint/seconds", "resume/seconds")
    }


class Bare:
    """The floor: the same model, optimiser, the task's own training loss and the clipping, on
    one batch held in memory, in a plain loop."""

    def __init__(self, r: recipe.Recipe) -> None:
        torch.manual_seed(r.train.seed)
        self.task = task_of(r)
        self.model = build_model(r, self.task)
        self.optimizer = build_optimizer(build_groups(self.model, r.optim), r.optim)
        loader = build_loader(
            r.data, "train", crop=r.model.img_size, seed=0, fields=self.task.fields
        )
        self.batch = next(iter(loader))
        loader.close()
        self.rng = torch.Generator().manual_seed(0)
        self.clip = r.train.grad_clip or float("inf")

    def step(self) -> None:
        loss = self.task.train_loss(self.model, self.batch, Placement(), self.rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()

    def seconds_per_step(self, steps: int, skip: int) -> float:
        """Mean seconds per step over steps skip+1..steps, like `seconds_per_step` of a run."""
        for _ in range(skip):
            self.step()
        start = time.perf_counter()
        for _ in range(steps - skip):
            self.step()
        return (time.perf_counter() - start) / (steps - skip)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds of both loops")
    p.add_argument("--steps", type=int, default=30, help="steps per loop per round")
    p.add_argument("--log-every", type=int, default=5, help="the toolkit loop's train.log_every")
    p.add_argument("--recipe", default="recipes/demo/finetune.yaml")
    p.add_argument("--workers", type=int, help="data.num_workers (default: the recipe's)")
    p.add_argument("--batch", type=int, help="data.batch_size (default: the recipe's)")
    p.add_argument("--tiny", action="store_true", help="2 rounds of 6 steps at batch 4: it works")
    p.add_argument("--out", default="benchmarks/results/engine.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.rounds, args.steps, args.log_every, args.batch = 2, 6, 2, args.batch or 4
    # The first logged window holds the loop's warm-up (first batches, allocator growth): both
    # loops are timed from the end of it.
    skip = args.log_every
    with tempfile.TemporaryDirectory() as tmp:
        base = recipe.load(args.recipe)
        batch = args.batch or base.data.batch_size
        shards = make_data(Path(tmp), batch * (args.steps + 8), base.model.img_size,
                           base.data.scale)  # fmt: skip
        overrides = [
            f"data.shards={shards}", "init.from=null", "freeze=[]", f"data.batch_size={batch}",
            f"train.log_every={args.log_every}", "train.checkpoint_every=0",
            f"train.eval_every={10 * args.steps}", f"train.max_steps={args.steps}",
            *([f"data.num_workers={args.workers}"] if args.workers is not None else []),
        ]  # fmt: skip
        r = recipe.load(args.recipe, [*overrides, f"run.dir={Path(tmp) / 'run'}"])
        bare = Bare(r)
        runs = iter(range(args.rounds * 2 + 2))

        def ours() -> float:
            run_dir = Path(tmp) / f"run-{next(runs)}"
            train(recipe.load(args.recipe, [*overrides, f"run.dir={run_dir}"]))
            return seconds_per_step(run_dir, skip)

        # Alternate the two, each round in the other order, so that a busy neighbour or a slow
        # spell slows both alike; the per-round ratio cancels what they share.
        ours(), bare.seconds_per_step(args.steps, skip)  # warm-up: allocator, thread pools
        t_ours, t_bare = [], []
        for i in range(args.rounds):
            first, second = (ours, None) if i % 2 == 0 else (None, ours)
            if first:
                t_ours.append(first())
            t_bare.append(bare.seconds_per_step(args.steps, skip))
            if second:
                t_ours.append(second())
        # Save and resume: the last run resumed 2 steps further from its final checkpoint.
        run_dir = Path(tmp) / "run-resume"
        train(recipe.load(args.recipe, [*overrides, f"run.dir={run_dir}"]))
        train(recipe.load(args.recipe, [*overrides, f"run.dir={run_dir}",
                                        f"train.max_steps={args.steps + 2}"]))  # fmt: skip
        extra = logged_seconds(run_dir)
    ratios = sorted(o / b for o, b in zip(t_ours, t_bare, strict=True))
    rows = [
        {"what": "training step, toolkit loop / bare PyTorch", "seconds": statistics.median(t_ours),
         "baseline_s": statistics.median(t_bare), "ratio": statistics.median(ratios),
         "ratio_min": ratios[0], "ratio_max": ratios[-1], "rounds": len(ratios), "goal": 1.03},
        {"what": "checkpoint save", "seconds": extra.get("checkpoint/seconds", float("nan"))},
        {"what": "resume (load newest)", "seconds": extra.get("resume/seconds", float("nan"))},
    ]  # fmt: skip
    report(
        f"engine benchmark: {args.recipe}, batch {batch}, {r.data.num_workers} loader worker(s), "
        f"{args.rounds} alternating rounds of {args.steps} steps (timed after step {skip}); "
        "ratio = toolkit / bare seconds per step, median [min, max] of the rounds; goal <= 1.03",
        rows,
        args.out,
        recipe=args.recipe,
        steps=args.steps,
        rounds=args.rounds,
        batch=batch,
        workers=r.data.num_workers,
        threads=torch.get_num_threads(),
        per_round={"toolkit": t_ours, "bare": t_bare},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

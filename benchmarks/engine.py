"""Engine benchmark: the toolkit's training step (loop, data, logging and all) against a bare
PyTorch loop over the same model, batch and optimiser in the same process; checkpoint save and
resume times.

    python -m benchmarks.engine [--steps 30] [--recipe recipes/demo/finetune.yaml]
"""

from __future__ import annotations

import argparse
import itertools
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


def step_times(run_dir: Path) -> tuple[list[float], dict[str, float]]:
    """Seconds between consecutive logged steps (a step with a checkpoint or an eval in it is
    left out), and the checkpoint/resume seconds the run logged."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    busy = {x["step"] for x in lines if any(k.startswith(("val/", "checkpoint/")) for k in x)}
    train = sorted((x["step"], x["time"]) for x in lines if "train/loss" in x)
    # Seconds per step over each window between two log lines (the recipe's log_every), so the
    # cost of logging is spread as in a real run; windows that saved or evaluated are left out.
    times = [
        (t1 - t0) / (s1 - s0)
        for (s0, t0), (s1, t1) in itertools.pairwise(train)
        if not any(s in busy for s in range(s0, s1))
    ]
    extra = {
        k: v for x in lines for k, v in x.items() if k in ("checkpoint/seconds", "resume/seconds")
    }
    return times, extra


def bare_loop(r: recipe.Recipe, steps: int) -> list[float]:
    """The floor: the same model, optimiser and loss on one batch held in memory; nothing else."""
    torch.manual_seed(r.train.seed)
    model = build_model(r)
    optimizer = build_optimizer(build_groups(model, r.optim), r.optim)
    loss_fn = torch.nn.functional.l1_loss
    batch = next(iter(build_loader(r.data, "train", crop=r.model.img_size, seed=0)))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = loss_fn(model(batch["lr"]), batch["hr"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.train.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--recipe", default="recipes/demo/finetune.yaml")
    p.add_argument("--workers", type=int, help="data.num_workers (default: the recipe's)")
    p.add_argument("--out", default="benchmarks/results/engine.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = recipe.load(args.recipe)
        batch = base.data.batch_size
        shards = make_data(
            Path(tmp), batch * (args.steps + 8), base.model.img_size, base.data.scale
        )
        run_dir = Path(tmp) / "run"
        overrides = [
            f"data.shards={shards}", f"run.dir={run_dir}", "init.from=null", "freeze=[]",
            "train.log_every=5", f"train.checkpoint_every={args.steps // 2}",
            f"train.eval_every={10 * args.steps}", f"train.max_steps={args.steps}",
            *([f"data.num_workers={args.workers}"] if args.workers is not None else []),
        ]  # fmt: skip
        r = recipe.load(args.recipe, overrides)
        # Alternate the two so that a busy neighbour slows both alike; medians of each.
        bare = bare_loop(r, 3)  # warm-up
        train(r)
        bare = bare_loop(r, args.steps)
        ours, extra = step_times(run_dir)
        train(recipe.load(args.recipe, [*overrides, f"train.max_steps={args.steps + 2}"]))
        _, extra = step_times(run_dir)
    t_ours, t_bare = statistics.median(ours), statistics.median(bare)
    rows = [
        {
            "what": "training step, toolkit loop",
            "seconds": t_ours,
            "ratio_to_bare": t_ours / t_bare,
        },
        {"what": "training step, bare PyTorch", "seconds": t_bare, "ratio_to_bare": 1.0},
        {"what": "checkpoint save", "seconds": extra.get("checkpoint/seconds", float("nan"))},
        {"what": "resume (load newest)", "seconds": extra.get("resume/seconds", float("nan"))},
    ]
    report(
        f"engine benchmark: {args.recipe}, batch {batch}, {args.steps} steps, "
        f"{r.data.num_workers} loader worker(s), medians; goal: toolkit/bare <= 1.03",
        rows,
        args.out,
        recipe=args.recipe,
        steps=args.steps,
        threads=torch.get_num_threads(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

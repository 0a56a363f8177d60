"""Training throughput of the demo's models on this machine: img/s of each model's real training
loop with the toolkit's default speed settings, as the demo runs it, and with each setting that
could make it faster.

    python -m benchmarks.throughput [--data data/demo] [--models pretrain,finetune,...]
                                    [--steps 30] [--rounds 2] [--tiny]

Each (model, setting) is one `python -m toolkit.train` process on the demo's shards (`--data`:
the folder holding `shards`, `mae-shards` and `class-shards`, as `make demo` leaves it), from
scratch (the linear probe from the demo's MAE, runs/demo/pretrain), for `--steps` steps logged
every 5; its img/s is the median of the loop's own
`train/images_per_s` over the windows after the first (start-up, first batches and compiling
left out). Settings:

- `default`: the demo's recipe with the toolkit's defaults for the speed settings below (eager,
  the default memory layout, one data worker, torch's threads): the baseline of every ratio;
- `demo`: the demo's recipe as it is (its speed settings chosen from this table);

each of the others changes one thing from `default`:

- `compile`: `train.compile=true` (torch.compile, inductor's C++ kernels on a CPU);
- `channels-last`: `train.channels_last=true`, for the models with convolutions;
- `1 thread`: the training process on one thread (OMP_NUM_THREADS=1), leaving the other core to
  the data worker;
- `0 workers`: `data.num_workers=0`, the data read in the training process between steps;
- `compile + channels-last`: both, for the models with convolutions.

`wall_s` is the whole process (start-up and compiling included) for its `--steps`: what a
setting costs before its faster steps begin to pay.

Rounds run every (model, setting) once each, in order, so a slow spell hits all of a round;
the reported ratio to `default` is the median over rounds of the per-round ratio. A setting
that trains the same recipe as `demo` for a model (the demo chose it) is not run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import report

logger = logging.getLogger("benchmarks.throughput")
ROOT = Path(__file__).resolve().parents[1]
# model: (demo recipe, the shards folder it trains on, whether it has convolutions, whether it
# starts from scratch: the linear probe's frozen encoder must come from the demo's MAE run)
MODELS = {
    "pretrain": ("pretrain.yaml", "mae-shards", False, True),
    "finetune": ("finetune.yaml", "shards", True, True),
    "edsr": ("edsr.yaml", "shards", True, True),
    "rcan": ("rcan.yaml", "shards", True, True),
    "classify_cnn": ("classify_cnn.yaml", "class-shards", True, True),
    "classify_scratch": ("classify_scratch.yaml", "class-shards", False, True),
    "classify_probe": ("classify_probe.yaml", "class-shards", False, False),
}
# The speed settings as the toolkit has them by default (the `default` baseline).
DEFAULTS = ["train.compile=false", "train.channels_last=false", "data.num_workers=1"]
# setting: (recipe overrides, environment, only for models with convolutions)
SETTINGS: dict[str, tuple[list[str], dict[str, str], bool]] = {
    "default": (DEFAULTS, {}, False),
    "demo": ([], {}, False),
    "compile": ([*DEFAULTS, "train.compile=true"], {}, False),
    "channels-last": ([*DEFAULTS, "train.channels_last=true"], {}, True),
    "1 thread": (DEFAULTS, {"OMP_NUM_THREADS": "1"}, False),
    "0 workers": ([*DEFAULTS, "data.num_workers=0"], {}, False),
    "compile + channels-last": (
        [*DEFAULTS, "train.compile=true", "train.channels_last=true"],
        {},
        True,
    ),
}
LOG_EVERY = 5


def images_per_s(run_dir: Path) -> float:
    """The median img/s the loop logged, its first window (start-up, compiling) left out."""
    from toolkit.reporting.tables import images_per_s as logged_rate

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if sum("train/images_per_s" in x for x in lines) < 2:
        raise RuntimeError(f"{run_dir}: fewer than two logged windows")
    return float(logged_rate(lines) or 0.0)


def speed_settings(model: str, setting: str) -> tuple[Any, ...]:
    """What the speed settings of (model, setting) resolve to: two settings with the same train
    the same recipe the same way."""
    from toolkit.runs import recipe

    overrides, env, _ = SETTINGS[setting]
    r = recipe.load(ROOT / "recipes" / "demo" / MODELS[model][0], overrides)
    return r.train.compile, r.train.channels_last, r.data.num_workers, sorted(env.items())


def planned(models: list[str], settings: list[str]) -> list[tuple[str, str]]:
    """The (model, setting) pairs to run: a convolutions-only setting for the models with
    convolutions; `demo` where the demo changed a default; another setting unless the demo
    already trains with it."""
    pairs = []
    for m in models:
        demo, default = speed_settings(m, "demo"), speed_settings(m, "default")
        for s in settings:
            if SETTINGS[s][2] and not MODELS[m][2]:
                continue
            if s == "default" or (s == "demo" and demo != default) or speed_settings(m, s) != demo:
                pairs.append((m, s))
    return pairs


def run_one(model: str, setting: str, data: Path, steps: int, batch: int | None,
            work: Path) -> tuple[float, float]:  # fmt: skip
    """img/s of one (model, setting) training process, and the process's wall time."""
    recipe_file, shards, _, scratch = MODELS[model]
    overrides, env, _ = SETTINGS[setting]
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"{model}-"))
    cmd = [sys.executable, "-m", "toolkit.train", str(ROOT / "recipes" / "demo" / recipe_file),
           f"data.shards={data / shards}", f"run.dir={run_dir}",
           *(["init.from=null"] if scratch else []),
           f"train.max_steps={steps}", f"train.log_every={LOG_EVERY}",
           f"train.eval_every={10 * steps}", "train.checkpoint_every=0",
           *([f"data.batch_size={batch}"] if batch else []), *overrides]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{model} / {setting} failed:\n{done.stderr[-3000:]}")
    return images_per_s(run_dir), time.perf_counter() - start


def tiny_data(root: Path) -> Path:
    """A few simulated lensing systems and labelled images, sharded as the demo's folders."""
    from toolkit.data.sharding import shard
    from toolkit.data.sim.write import generate

    generate(root / "raw", 24, seed=0)
    shard(root / "raw", root / "shards", val_fraction=0.2, seed=0)
    generate(root / "class-raw", 24, seed=0, classes=True)
    shard(root / "class-raw", root / "class-shards", val_fraction=0.2, seed=0, labels=True)
    (root / "mae-shards").symlink_to(root / "shards")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, help="data.batch_size (default: the recipe's)")
    p.add_argument("--tiny", action="store_true",
                   help="2 models, 2 settings, 10 steps, batch 4, data simulated here")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results/throughput.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tiny:
        args.models, args.settings, args.steps, args.rounds = "edsr,classify_scratch", \
            "default,demo,channels-last", 10, 1  # fmt: skip
        args.batch = args.batch or 4
    models = [m for m in args.models.split(",") if m]
    settings = [s for s in args.settings.split(",") if s]
    unknown = [x for x in models if x not in MODELS] + [x for x in settings if x not in SETTINGS]
    if unknown or "default" not in settings:
        p.error(f"unknown model or setting {unknown}, or no 'default' setting to compare with")
    pairs = planned(models, settings)
    rates: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    walls: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        data = tiny_data(Path(tmp) / "data") if args.tiny else args.data
        for r in range(args.rounds):
            for model, setting in pairs:
                rate, wall = run_one(model, setting, data, args.steps, args.batch, Path(tmp))
                rates[model, setting].append(rate)
                walls[model, setting].append(wall)
                logger.info("round %d %s / %s: %.1f img/s, %.1f s", r + 1, model, setting, rate,
                            wall)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for model, setting in pairs:
        got, base = rates[model, setting], rates[model, "default"]
        ratios = sorted(g / b for g, b in zip(got, base, strict=True))
        rows.append({"model": model, "setting": setting, "images_per_s": statistics.median(got),
                     "ratio": statistics.median(ratios), "ratio_min": ratios[0],
                     "ratio_max": ratios[-1], "wall_s": statistics.median(walls[model, setting]),
                     "rounds": len(got)})  # fmt: skip
    report(
        f"training throughput: the demo's models, {args.steps} steps each, median img/s of the "
        f"loop's windows after the first; ratio = setting / default, median [min, max] of "
        f"{args.rounds} rounds",
        rows,
        args.out,
        steps=args.steps,
        rounds=args.rounds,
        batch=args.batch,
        cpus=os.cpu_count(),
        per_round={f"{m} / {s}": v for (m, s), v in rates.items()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo: lensing data -> shards -> an MAE pretrained on unlabelled images -> the three
finetune modes, the ablation from scratch and two CNN baselines (EDSR, RCAN); labelled lensing
data -> a CNN and the same ViT from scratch against the pretrained encoder (linear probe, full
finetune) -> the report, one table per task.

    python -m toolkit.demo [--count 2000] [--classes 2100] [--unlabelled 4000] [--workers 2]
                           [--max-steps N]
    python -m toolkit.demo --study [--per-class 25,100,400] [--pairs 100,400]
    python -m toolkit.demo --tune

`--study` is the label-efficiency study, a command of its own so that each stays under 30
minutes on a 2-core CPU: the CNN, the ViT from scratch and the full finetune at each
`data.per_class`, the SR-MAE pretrained and from scratch at each `data.limit`, all at equal
optimiser steps (recipes/demo/study/), and a report with their curves (runs/demo/study-report).
It makes the data and the MAE first when the demo has not.

`--tune` is where the classifiers' learning rates in recipes/demo/ come from: the CNN's and the
linear probe's (the ViTs train at the workload's rates) swept on a holdout of the labelled train
split (`data.holdout`), the val split the demo reports on not read (runs/demo/tune-report/).

Every step is skipped when its output is already there, so a second run only writes the report
(runs/demo/report: results table, loss curves, sample maps) again, and an interrupted one resumes
from its checkpoints.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from toolkit.core import cli
from toolkit.core.errors import UserError
from toolkit.runs import recipe

logger = logging.getLogger(__name__)

RECIPES = recipe.shipped() / "demo"
STAGES = ("pretrain.yaml", "finetune_frozen_mae.yaml", "finetune_frozen_encoder.yaml",
          "finetune.yaml", "finetune_scratch.yaml", "edsr.yaml", "rcan.yaml")  # fmt: skip
CLASSIFY = ("classify_cnn.yaml", "classify_scratch.yaml", "classify_probe.yaml",
            "classify_finetune.yaml")  # fmt: skip
# The study's sweeps: a `recipe` axis of these files (variants named by their stems) by a size.
STUDY_CLASSIFY = ("cnn.yaml", "scratch.yaml", "finetune.yaml")
STUDY_SR = ("srmae_pretrained.yaml", "srmae_scratch.yaml")
# Each pretrained run's paired difference against its control, the same model from scratch
# (besides each run against the best one): what the pretraining is worth, with its interval.
PAIRS = (("finetune", "finetune_scratch"), ("classify_finetune", "classify_scratch"))
STUDY_PAIRS = {"data.per_class": ("finetune", "scratch"),
               "data.limit": ("srmae_pretrained", "srmae_scratch")}  # fmt: skip
# `--tune`: learning rates of the recipes whose rates the demo chose, each evaluated on a
# quarter of the labelled train split; the rate with the highest micro-AUC there is the recipe's.
TUNE = {"classify_cnn.yaml": "1e-3,2e-3,4e-3", "classify_probe.yaml": "1e-3,3e-3,1e-2"}
TUNE_HOLDOUT = 0.25
VAL_FRACTION = 0.1  # the SR pairs and the MAE's images
# The labelled set's validation: 33% of 2,100 draws 665 images (199 to 242 a class; 0.3 drew
# 601, 178 vortices), so the accuracies' bootstrap intervals are narrow enough to tell the
# classifiers apart; it leaves 1,435 to train on, at least 458 a class (the study's largest
# per_class is 400).
CLASS_VAL_FRACTION = 0.33


def make_data(shards: Path, count: int, workers: int, seed: int, classes: bool = False) -> None:
    """Simulate and shard the demo's data (`classes`: the labelled set) unless it is there."""
    from toolkit.data.sharding import shard
    from toolkit.data.sim.write import generate

    if (shards / "manifest.json").is_file():
        logger.info("demo data: %s is there", shards)
        return
    raw = shards.parent / ("class-raw" if classes else "raw")
    if not raw.is_dir() or not any(raw.iterdir()):
        what = "labelled lensing images" if classes else "lensing systems"
        logger.info("demo data: simulating %d %s into %s", count, what, raw)
        generate(raw, count, seed=seed, workers=workers, classes=classes)
    shard(raw, shards, val_fraction=CLASS_VAL_FRACTION if classes else VAL_FRACTION,
          shard_size=250, workers=workers, seed=seed, labels=classes)  # fmt: skip


def _link(src: Path, dst: Path) -> None:
    """A hard link (no second copy of the images), or a copy where links are not allowed."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_mae_data(shards: Path, pairs_raw: Path, unlabelled: int, workers: int, seed: int) -> None:
    """The MAE's unlabelled images, sharded unless they are there: the HR image of every SR pair
    in the SR train split (never one of its validation split: the SR evaluation would score
    images the encoder was pretrained on), and `unlabelled` more from the labelled classes'
    generator with seed + 1 (so none is one of the labelled images; their class is dropped)."""
    from toolkit.data.sharding import shard, split_of
    from toolkit.data.sim.write import generate
    from toolkit.data.sources import list_source

    if (shards / "manifest.json").is_file():
        logger.info("demo data: %s is there", shards)
        return
    raw = shards.parent / "mae-raw"
    if not raw.is_dir():
        extra = shards.parent / "unlabelled-raw"
        if unlabelled and (not extra.is_dir() or not any(extra.iterdir())):
            logger.info("demo data: simulating %d unlabelled images into %s", unlabelled, extra)
            generate(extra, unlabelled, seed=seed + 1, workers=workers, classes=True)
        # Built aside and renamed: a folder there is a whole one.
        part = raw.with_name(raw.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        for item in list_source(pairs_raw).items:
            # The split the SR shards drew with the same seed and fraction (toolkit.shard).
            if split_of(item.key, seed, VAL_FRACTION) == "train":
                _link(item.hr, part / f"sr-{item.hr.name}")
        if unlabelled:
            for path in sorted(extra.glob("*/*.npy")):
                _link(path, part / f"unlabelled-{path.parent.name}-{path.name}")
        part.rename(raw)
    shard(raw, shards, val_fraction=VAL_FRACTION, shard_size=250, workers=workers, seed=seed)


def train_stage(r: recipe.Recipe) -> float:
    from toolkit.runs.entry import run

    if (r.run_dir / "eval.json").is_file():
        logger.info("%s: done before (%s)", r.name, r.run_dir / "eval.json")
        return 0.0
    start = time.perf_counter()
    if run(r) != 0:
        raise UserError(f"{r.name}: training failed; see the log above")
    return time.perf_counter() - start


def study_stage(files: Sequence[str], key: str, values: str, overrides: Sequence[str]) -> Path:
    """One of the study's sweeps: a `recipe` axis of `files` by `key`; its directory."""
    paths = [str(RECIPES / "study" / name) for name in files]
    base = recipe.load(paths[0], list(overrides)).run_dir
    sweep_stage(["--sweep", f"recipe={','.join(paths)}", "--sweep", f"{key}={values}",
                 *overrides], base)  # fmt: skip
    return base


def tune_stage(name: str, rates: str, overrides: Sequence[str], base: Path) -> Path:
    """The learning rates `rates` of the recipe `name`, each evaluated on the holdout."""
    sweep_stage([str(RECIPES / name), "--sweep", f"optim.lr={rates}",
                 f"data.holdout={TUNE_HOLDOUT}", f"run.dir={base}", *overrides], base)  # fmt: skip
    return base


def sweep_stage(argv: Sequence[str], base: Path) -> None:
    """A sweep (`launch ARGV`) trained in turn here (`--local`, which leaves finished variants
    as they are) into `base`."""
    from toolkit.cluster.launching import parse_args
    from toolkit.cluster.sweeps import run_sweep

    start = time.perf_counter()
    code = run_sweep(parse_args([*argv, "--local"]))
    if code != 0:
        raise UserError(f"{base}: a variant of the sweep failed; see the log above")
    logger.info("%s: %.0f s", base, time.perf_counter() - start)


def _report(run_dirs: Sequence[Path], out: Path, pairs: Sequence[tuple[str, str]] = ()) -> None:
    from toolkit.reporting.tables import markdown_all
    from toolkit.reporting.write import report

    doc = report(list(run_dirs), out, pairs=pairs)
    sys.stdout.write(f"\n{markdown_all(doc)}\n(the report is in {out})\n")


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m toolkit.demo", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000, help="lensing systems to simulate")
    p.add_argument("--classes", type=int, default=2100,
                   help="labelled images to simulate for the classification (0: none)")  # fmt: skip
    p.add_argument("--unlabelled", type=int, default=4000,
                   help="unlabelled images to simulate for the MAE, besides the SR train split's "
                        "HR images")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="processes for data generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="cap every stage at N steps (a quick check)")
    p.add_argument("--study", action="store_true",
                   help="the label-efficiency study instead of the demo's tables")  # fmt: skip
    p.add_argument("--per-class", default="25,100,400",
                   help="--study: labelled images a class (data.per_class values)")  # fmt: skip
    p.add_argument("--pairs", default="100,400", help="--study: SR pairs (data.limit values)")
    p.add_argument(
        "--tune",
        action="store_true",
        help="the classifiers' learning rates, chosen on a holdout of the train split",
    )
    args = p.parse_args(argv)
    if args.study and args.tune:
        p.error("--study and --tune are commands of their own: expected one of them")
    if (args.study or args.tune) and not args.classes:
        p.error("--study and --tune classify the labelled set: expected --classes above 0")
    overrides = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    stages = [recipe.load(RECIPES / name, overrides) for name in STAGES]
    pairs = Path(stages[1].data.shards)
    make_data(pairs, args.count, args.workers, args.seed)
    make_mae_data(Path(stages[0].data.shards), pairs.parent / "raw", args.unlabelled,
                  args.workers, args.seed)  # fmt: skip
    if args.classes:
        more = [recipe.load(RECIPES / name, overrides) for name in CLASSIFY]
        make_data(Path(more[0].data.shards), args.classes, args.workers, args.seed, classes=True)
        stages += more
    runs = stages[0].run_dir.parent
    if args.study:
        train_stage(stages[0])  # the MAE the pretrained modes start from
        dirs = [study_stage(STUDY_CLASSIFY, "data.per_class", args.per_class, overrides),
                study_stage(STUDY_SR, "data.limit", args.pairs, overrides)]  # fmt: skip
        sizes = {"data.per_class": args.per_class, "data.limit": args.pairs}
        pairs = [(f"recipe={a},{key}={v}", f"recipe={b},{key}={v}")
                 for key, (a, b) in STUDY_PAIRS.items() for v in sizes[key].split(",")]  # fmt: skip
        _report(dirs, runs / "study-report", pairs)
        return 0
    if args.tune:
        train_stage(stages[0])  # the MAE the probe reads
        # in the layout its published rates were chosen in: channels-last is a speed setting the
        # demo's CNN took up later (other kernels, other rounding), not a hyperparameter
        layout = [*overrides, "train.channels_last=false"]
        for name, rates in TUNE.items():  # a report each: their runs share names (optim.lr=...)
            base = tune_stage(name, rates, layout, runs / "tune" / Path(name).stem)
            _report([base], runs / "tune-report" / base.name)
        return 0
    seconds = {r.name: train_stage(r) for r in stages}
    logger.info(
        "training time: %s; %.0f s in all",
        ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()),
        sum(seconds.values()),
    )
    _report([r.run_dir for r in stages], runs / "report", PAIRS if args.classes else PAIRS[:1])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

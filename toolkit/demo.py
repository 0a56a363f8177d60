"""The demo: lensing data -> shards -> pretrain -> the three finetune modes, the ablation from
scratch and two CNN baselines (EDSR, RCAN); labelled lensing data -> the pretrained encoder as
a classifier (linear probe, full finetune) against a CNN from scratch -> the report, one table
per task.

    python -m toolkit.demo [--count 2000] [--classes 1500] [--workers 2] [--max-steps N]

Every step is skipped when its output is already there, so a second run only writes the report
(runs/demo/report: results table, loss curves, sample maps) again, and an interrupted one resumes
from its checkpoints.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from toolkit import cli, recipe
from toolkit.errors import UserError

logger = logging.getLogger(__name__)

RECIPES = recipe.shipped() / "demo"
STAGES = ("pretrain.yaml", "finetune_frozen_mae.yaml", "finetune_frozen_encoder.yaml",
          "finetune.yaml", "finetune_scratch.yaml", "edsr.yaml", "rcan.yaml")  # fmt: skip
CLASSIFY = ("classify_cnn.yaml", "classify_probe.yaml", "classify_finetune.yaml")


def make_data(shards: Path, count: int, workers: int, seed: int, classes: bool = False) -> None:
    """Simulate and shard the demo's data (`classes`: the labelled set) unless it is there."""
    from toolkit.data import lensing
    from toolkit.shard import shard

    if (shards / "manifest.json").is_file():
        logger.info("demo data: %s is there", shards)
        return
    raw = shards.parent / ("class-raw" if classes else "raw")
    if not raw.is_dir() or not any(raw.iterdir()):
        what = "labelled lensing images" if classes else "lensing systems"
        logger.info("demo data: simulating %d %s into %s", count, what, raw)
        lensing.generate(raw, count, seed=seed, workers=workers, classes=classes)
    shard(raw, shards, val_fraction=0.1, shard_size=250, workers=workers, seed=seed,
          labels=classes)  # fmt: skip


def train_stage(r: recipe.Recipe) -> float:
    from toolkit.train import run

    if (r.run_dir / "eval.json").is_file():
        logger.info("%s: done before (%s)", r.name, r.run_dir / "eval.json")
        return 0.0
    start = time.perf_counter()
    if run(r) != 0:
        raise UserError(f"{r.name}: training failed; see the log above")
    return time.perf_counter() - start


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m toolkit.demo", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000, help="lensing systems to simulate")
    p.add_argument("--classes", type=int, default=1500,
                   help="labelled images to simulate for the classification (0: none)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="processes for data generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="cap every stage at N steps (a quick check)")
    args = p.parse_args(argv)
    overrides = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    stages = [recipe.load(RECIPES / name, overrides) for name in STAGES]
    make_data(Path(stages[0].data.shards), args.count, args.workers, args.seed)
    if args.classes:
        more = [recipe.load(RECIPES / name, overrides) for name in CLASSIFY]
        make_data(Path(more[0].data.shards), args.classes, args.workers, args.seed, classes=True)
        stages += more
    seconds = {r.name: train_stage(r) for r in stages}
    logger.info(
        "training time: %s; %.0f s in all",
        ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()),
        sum(seconds.values()),
    )
    from toolkit.report import markdown_all, report

    out = stages[0].run_dir.parent / "report"
    doc = report([r.run_dir for r in stages], out)
    sys.stdout.write(f"\n{markdown_all(doc)}\n(the report is in {out})\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

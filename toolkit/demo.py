"""The demo: lensing data -> shards -> pretrain -> the three finetune modes -> the results table.

    python -m toolkit.demo [--count 2000] [--workers 2] [--max-steps N]

Every step is skipped when its output is already there, so a second run only prints the table
(and an interrupted one resumes from its checkpoints).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from toolkit import cli, recipe
from toolkit.errors import UserError

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "demo"
# (mode as the workload's table names it, recipe)
STAGES = (
    ("pretrain (MAE)", "pretrain.yaml"),
    ("frozen MAE", "finetune_frozen_mae.yaml"),
    ("frozen encoder", "finetune_frozen_encoder.yaml"),
    ("full finetune", "finetune.yaml"),
)


def make_data(shards: Path, count: int, workers: int, seed: int) -> None:
    from toolkit.data import lensing
    from toolkit.shard import shard

    if (shards / "manifest.json").is_file():
        logger.info("demo data: %s is there", shards)
        return
    raw = shards.parent / "raw"
    if not (raw / "hr").is_dir():
        logger.info("demo data: simulating %d lensing systems into %s", count, raw)
        lensing.generate(raw, count, seed=seed, workers=workers)
    shard(raw, shards, val_fraction=0.1, shard_size=250, workers=workers, seed=seed)


def train_stage(r: recipe.Recipe) -> float:
    from toolkit.train import run

    if (r.run_dir / "eval.json").is_file():
        logger.info("%s: done before (%s)", r.name, r.run_dir / "eval.json")
        return 0.0
    start = time.perf_counter()
    if run(r) != 0:
        raise UserError(f"{r.name}: training failed; see the log above")
    return time.perf_counter() - start


def table(rows: list[dict]) -> str:
    """The workload-style results table, in Markdown."""
    lines = [
        "| Mode | MSE | PSNR (dB) | SSIM | trainable params | epochs |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['mse']:.6f} | {row['psnr']:.2f} | {row['ssim']:.4f} "
            f"| {row['trainable']} | {row['epochs']} |"
        )
    return "\n".join(lines)


def results(stages: list[tuple[str, recipe.Recipe]]) -> list[dict]:
    from toolkit.launch import param_summary

    rows, bicubic = [], None
    for mode, r in stages:
        ev = json.loads((r.run_dir / "eval.json").read_text())
        if r.stage != "finetune":
            continue
        trainable = f"{param_summary(r)['trainable']:,}"
        rows.append({"mode": mode, **ev["model"], "trainable": trainable, "epochs": r.train.epochs})
        bicubic = ev["bicubic"]
    if bicubic is not None:
        rows.append({"mode": "bicubic", **bicubic, "trainable": "-", "epochs": "-"})
    return rows


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m toolkit.demo", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000, help="lensing systems to simulate")
    p.add_argument("--workers", type=int, default=2, help="processes for data generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="cap every stage at N steps (a quick check)")
    args = p.parse_args(argv)
    overrides = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    stages = [(mode, recipe.load(RECIPES / name, overrides)) for mode, name in STAGES]
    make_data(Path(stages[0][1].data.shards), args.count, args.workers, args.seed)
    seconds = {r.name: train_stage(r) for _, r in stages}
    logger.info(
        "training time: %s; %.0f s in all",
        ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()),
        sum(seconds.values()),
    )
    text = table(results(stages))
    out = stages[-1][1].run_dir.parent / "results.md"
    out.write_text(text + "\n")
    sys.stdout.write(f"\n{text}\n\n(validation split; also in {out})\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

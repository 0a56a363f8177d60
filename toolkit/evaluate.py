"""Evaluate a run or a checkpoint on a split: model and bicubic MSE / PSNR / SSIM, per image.

    python -m toolkit.evaluate RUN_DIR|CHECKPOINT|WEIGHTS [key=value ...] [--split val]
                               [--shards DIR] [--json] [--local --procs P]

The model is described by the run's `recipe.yaml` (a checkpoint's own copy for a checkpoint;
the one beside a .safetensors file); `key=value` overrides it as for training. Launched on
several processes (torchrun, srun, or `--local --procs P`), each evaluates its share and every
sample counts once. Writes `eval.json` into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from toolkit import checkpoint, cli, recipe
from toolkit.cluster import env
from toolkit.data.loader import Loader, build_loader, mismatches, read_manifest
from toolkit.errors import UserError

logger = logging.getLogger(__name__)

RECIPE = "recipe.yaml"


@dataclass
class Target:
    """What to evaluate: the recipe describing the model, and where its weights come from."""

    recipe: recipe.Recipe
    source: Path  # run directory, checkpoint directory or .safetensors file
    run_dir: Path  # the run the weights belong to: where the evaluation is written
    label: str  # "" for the run's own final weights, else what they are (e.g. step-00000500)


def locate(source: str | Path, overrides: Sequence[str] = ()) -> Target:
    """The recipe and run directory of a run directory, checkpoint directory or weights file."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such run directory, checkpoint or weights file")
    where = path.resolve()  # "." or "step-00000500" name no run otherwise
    label = ""
    if where.is_file():
        folder = where.parent
        if (folder / checkpoint.STATE).is_file():  # a checkpoint's model.safetensors (DDP)
            run_dir, described_by, label = folder.parent.parent, folder / RECIPE, folder.name
        else:
            run_dir, described_by = folder, folder / RECIPE
            label = "" if where.name == checkpoint.WEIGHTS else where.stem
    elif (where / checkpoint.STATE).is_file():  # checkpoints/step-N: it keeps its own recipe
        run_dir, described_by, label = where.parent.parent, where / RECIPE, where.name
    else:
        run_dir, described_by = where, where / RECIPE
    if not described_by.is_file():
        raise UserError(
            f"{path}: no {RECIPE} at {described_by} to say which model the weights are for"
        )
    return Target(recipe.load(described_by, overrides), path, run_dir, label)


def eval_path(target: Target, split: str, custom: bool) -> Path:
    """`eval.json` for the run's own weights on its own validation data, the result the report
    shows; any other evaluation gets a name of its own (eval-step-00000500.json,
    eval-train.json, eval-custom.json for other shards or overrides) and leaves that one be."""
    parts = [p for p in (target.label, "" if split == "val" else split, "custom" if custom else "")
             if p]  # fmt: skip
    return target.run_dir / ("eval.json" if not parts else f"eval-{'-'.join(parts)}.json")


def load_model(target: Target) -> nn.Module:
    """The recipe's model with the target's weights, every tensor accounted for."""
    from toolkit.models import build_model, load_mae_weights

    r = target.recipe
    model = build_model(r.model, r.stage, r.data.scale)
    weights = checkpoint.read_weights(target.source)
    try:
        report = load_mae_weights(model, weights)
    except ValueError as err:
        raise UserError(f"{target.source}: {err}") from None
    if report.fresh:
        raise UserError(
            f"{target.source}: the weights lack {report.fresh[0]} ({len(report.fresh)} tensors "
            f"in all) of the {r.stage} model its {RECIPE} describes; are they of an earlier stage?"
        )
    return model.eval()


def check_shards(r: recipe.Recipe, split: str) -> None:
    """Shards the model can read, with samples in `split`: a user error otherwise."""
    manifest = read_manifest(r.data.shards)
    problems = mismatches(manifest, r.model.in_chans, r.model.img_size)
    if problems:
        raise UserError(problems[0])
    if not manifest.count(split):
        raise UserError(f"{Path(r.data.shards) / 'manifest.json'}: split {split!r} has no samples")


def eval_loader(r: recipe.Recipe, split: str, rank: int = 0, world_size: int = 1) -> Loader:
    """This rank's share of `split`, each sample once, centre-cropped, in a fixed order."""
    return build_loader(r.data, split, crop=r.model.img_size, seed=r.train.seed, rank=rank,
                        world_size=world_size, need_lr=r.stage == "finetune",
                        evaluation=True)  # fmt: skip


def evaluate(target: Target, split: str = "val") -> dict[str, Any] | None:
    """Evaluate on this process's share of `split` and gather; the summary on rank 0 (None on
    the others). Collective when several processes run it. Weights are evaluated in fp32."""
    from toolkit.engine.accel import Engine
    from toolkit.engine.validate import eval_summary, validate_run

    r = target.recipe
    check_shards(r, split)
    model = load_model(target)
    engine = Engine(dataclasses.replace(r.train, precision="no", grad_accum=1), None, 1)
    try:
        model.to(engine.device)
        loader = eval_loader(r, split, engine.rank, engine.world_size)
        result = validate_run(model, iter(loader), r, device=engine.device).gathered()
        summary = eval_summary(result, split, r.stage) if engine.is_main else None
    except BaseException:
        engine.abandon()  # no barrier: the other ranks may be waiting in a gather instead
        raise
    engine.close(model)
    if summary is not None:
        summary["source"] = str(target.source)
    return summary


def text(summary: dict[str, Any], where: Path) -> str:
    """The summary for a terminal: means, then per-image statistics."""
    lines = [f"{where}: {summary['split']} split, {summary['count']} images"]
    rows = [("", "MSE", "PSNR (dB)", "SSIM", "loss")]
    for name in ("model", "bicubic"):
        m = summary.get(name)
        if m:
            rows.append((name, *(_fmt(k, m.get(k)) for k in ("mse", "psnr", "ssim", "loss"))))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for metric, st in summary["per_image"]["model"].items():
        worst = ", ".join(f"{k} {_fmt(metric, v)}" for k, v in st["worst"])
        lines.append(
            f"per image {metric}: mean {_fmt(metric, st['mean'])}, median "
            f"{_fmt(metric, st['median'])}; worst: {worst}"
        )
    return "\n".join(lines)


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return {"psnr": f"{value:.2f}", "ssim": f"{value:.4f}"}.get(metric, f"{value:.6f}")


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m toolkit.evaluate", description=__doc__.splitlines()[0],
                           allow_abbrev=False)  # fmt: skip
    p.add_argument("source", help="run directory, checkpoint directory or .safetensors file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--shards", help="evaluate on these shards instead of the recipe's")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--local", action="store_true", help="run here, on --procs processes")
    p.add_argument("--procs", type=int, default=1, help="processes for --local (default 1)")
    args = p.parse_intermixed_args(argv)
    if args.procs < 1 or (args.procs > 1 and not args.local):
        raise UserError("--procs P needs --local and P >= 1")
    overrides = [*args.overrides, *([f"data.shards={args.shards}"] if args.shards else [])]
    target = locate(args.source, overrides)
    if args.local and args.procs > 1 and "RANK" not in os.environ:  # not inside a group yet
        check_shards(target.recipe, args.split)  # before starting any process
        child = [args.source, *overrides, "--split", args.split, *(["--json"] if args.json else [])]
        return env.torchrun(args.procs, "toolkit.evaluate", child)
    env.setup()  # an srun task: ranks from its SLURM_* variables
    summary = evaluate(target, args.split)
    if summary is None:  # not rank 0
        return 0
    from toolkit.engine.validate import write_eval

    path = eval_path(target, args.split, custom=bool(overrides))
    write_eval(path, summary)
    out = json.dumps(summary, indent=2) if args.json else text(summary, target.source)
    sys.stdout.write(out + "\n")
    logger.info("wrote %s", path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

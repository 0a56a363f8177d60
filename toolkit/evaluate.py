"""Evaluate a run or a checkpoint on a split: the task's metrics for the model and its reference
(SR: MSE / PSNR / SSIM against bicubic), per image.

    python -m toolkit.evaluate RUN_DIR|CHECKPOINT|WEIGHTS [key=value ...] [--split val]
                               [--shards DIR] [--json] [--local --procs P]

The model is described by the run's `recipe.yaml` (a checkpoint's own copy for a checkpoint;
the one beside a .safetensors file); `key=value` overrides it as for training. Launched on
several processes (torchrun, srun, or `--local --procs P`), each evaluates its share and every
sample counts once. Writes `eval.json` into the run directory (other evaluations: beside it),
and every sample's values beside it (`eval.samples.npz`) for the report's intervals.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.cluster import env
from toolkit.core import cli
from toolkit.core.errors import UserError
from toolkit.core.metrics import metric
from toolkit.data.subset import eval_split
from toolkit.runs.directory import Target, check_shards, eval_loader, eval_path, load_model, locate
from toolkit.runs.hold import acquire, refuse_if_held

if TYPE_CHECKING:
    from toolkit.engine.validate import Validation

logger = logging.getLogger(__name__)


def evaluate(target: Target, split: str = "val") -> tuple[dict[str, Any], Validation] | None:
    """Evaluate on this process's share of `split` and gather; on rank 0 the summary and every
    sample's values (None on the others). Collective when several processes run it. Weights are
    evaluated in fp32."""
    from toolkit.engine.accel import Engine
    from toolkit.engine.validate import summary as eval_summary
    from toolkit.engine.validate import validate
    from toolkit.tasks import Placement

    r, task = target.recipe, target.task
    engine = Engine(dataclasses.replace(r.train, precision="no", grad_accum=1), None, 1)
    try:
        # One read of the manifest (and one check of its shards) for the job, by its main
        # process: every rank's loader, and the task's summary, take that one.
        manifest = engine.on_main(lambda: check_shards(target, split))
        task.use_shards(manifest)
        model = load_model(target).to(engine.device)
        loader = eval_loader(r, split, engine.rank, engine.world_size, manifest)
        result = validate(task, model, iter(loader), Placement(engine.device)).gathered()
        loader.close()
        named = eval_split(r.data, split)  # "holdout" for the val split of a run holding some out
        summary = eval_summary(task, result, named) if result is not None else None
    except BaseException:
        engine.abandon()  # no barrier: the other ranks may be waiting in a gather instead
        raise
    engine.close(model)
    if summary is None or result is None:
        return None
    summary["source"] = str(target.source)
    return summary, result


def text(summary: dict[str, Any], where: Path) -> str:
    """The summary for a terminal: means of the model and the reference, then per-image
    statistics of each metric."""
    lines = [f"{where}: {summary['split']} split, {summary['count']} images"]
    names = list(summary["model"])
    rows = [("", *(metric(n).title for n in names))]
    for part in ("model", summary.get("reference") or ""):
        values = summary.get(part) or {}
        if part and values:
            rows.append((part, *(metric(n).format(values.get(n)) for n in names)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for name, st in summary["per_image"]["model"].items():
        m = metric(name)
        worst = ", ".join(f"{k} {m.format(v)}" for k, v in st["worst"])
        lines.append(
            f"per image {name}: mean {m.format(st['mean'])}, median {m.format(st['median'])}; "
            f"worst: {worst}"
        )
    return "\n".join(lines)


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
        check_shards(target, args.split)  # before starting any process
        refuse_if_held(target.run_dir)
        child = [args.source, *overrides, "--split", args.split, *(["--json"] if args.json else [])]
        return env.torchrun(args.procs, "toolkit.evaluate", child)
    env.bind_to_launcher()  # a torchrun worker ends with its torchrun
    env.setup()  # an srun task: ranks from its SLURM_* variables
    # The evaluation is written into the run directory: not while another process writes it.
    hold = acquire(target.run_dir, "evaluate") if os.environ.get("RANK", "0") == "0" else None
    try:
        evaluated = evaluate(target, args.split)
        if evaluated is None:  # not rank 0
            return 0
        from toolkit.engine.validate import write_eval

        path = eval_path(target, args.split, custom=bool(overrides))
        summary = write_eval(path, *evaluated)
    finally:
        if hold is not None:
            hold.release()
    out = json.dumps(summary, indent=2) if args.json else text(summary, target.source)
    sys.stdout.write(out + "\n")
    logger.info("wrote %s", path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

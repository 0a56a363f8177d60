"""What `launch` does, as a library: its options, then a recipe resolved and checked and dry-run,
run locally (one process, or torchrun) or submitted to Slurm as stages chained afterok; sweeps
go to `toolkit.cluster.sweeps`, which builds on this module."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit.core import cli
from toolkit.core.errors import UserError
from toolkit.runs import preflight, recipe
from toolkit.runs.directory import param_summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """Where the processes of a job run."""

    nodes: int
    gpus_per_node: int
    world_size: int
    mode: str  # "local" or "slurm"


RECIPE_SUFFIXES = (".yaml", ".yml")
SLURM_FLAGS = ("nodes", "gpus_per_node", "gres", "mem", "partition", "time", "account", "qos",
               "constraint", "wckey")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> Any:
    p = cli.ArgumentParser(
        prog="python -m toolkit.launch",
        description="Launch a training stage described by a YAML recipe (several recipes: a chain "
        "of Slurm jobs, each starting after the one before succeeded).",
        epilog="Overrides use dotted keys and apply to every recipe: optim.lr=3e-4 "
        "train.epochs=2 freeze=[encoder] deepspeed=null",
    )
    p.add_argument("items", nargs="*", metavar="RECIPE|key=value",
                   help="recipe YAML files (.yaml/.yml) and recipe overrides")  # fmt: skip
    p.add_argument("--nodes", type=int, help="Slurm nodes (default: cluster.nodes)")
    p.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node, one process each; 0: CPU nodes"
    )
    p.add_argument("--partition", help="Slurm partition (default: cluster.partition)")
    p.add_argument("--time", help="Slurm time limit, e.g. 24:00:00 (default: cluster.time)")
    p.add_argument("--account", help="Slurm account (default: cluster.account)")
    p.add_argument("--qos", help="Slurm quality of service (default: cluster.qos)")
    p.add_argument("--constraint", help="Slurm node features (default: cluster.constraint)")
    p.add_argument("--gres", help="GPUs as generic resources instead of --gpus-per-node, e.g. "
                   "gpu:a100:8 (default: cluster.gres)")  # fmt: skip
    p.add_argument("--mem", help="memory per node, e.g. 64G (default: cluster.mem)")
    p.add_argument("--wckey", help="Slurm wckey, where the site asks for one (default: none)")
    p.add_argument("--after", metavar="JOBID", help="start after this Slurm job succeeded")
    p.add_argument("--wait", action="store_true", help="wait for the Slurm job(s) to end")
    p.add_argument("--local", action="store_true", help="run on this machine instead of Slurm")
    p.add_argument("--procs", type=int, help="with --local: processes on this machine (default 1)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...|FILE.yaml",
                   help="train a variant per combination of the swept values (repeatable: the "
                   "product), each in its own run directory; on Slurm one job array")  # fmt: skip
    p.add_argument("--array-limit", type=int, metavar="K",
                   help="with --sweep on Slurm: at most K variants run at once")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="resolve, check and print; start nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: JSON (a list for a chain)")
    args = p.parse_intermixed_args(argv)
    args.recipes, args.overrides = [], []
    for item in args.items:
        if re.fullmatch(r"[A-Za-z_][\w.\[\]-]*=.*", item, flags=re.DOTALL):
            args.overrides.append(item)
        elif item.endswith(RECIPE_SUFFIXES):
            args.recipes.append(item)
        else:
            p.error(f"expected key=value or a recipe file (.yaml/.yml), got {item!r}")
    if not args.recipes and not args.sweep:  # a sweep may vary the recipe itself (launch_sweep)
        p.error("no recipe given: expected a file ending in .yaml or .yml")
    args.recipe = args.recipes[0] if args.recipes else None
    if args.procs is not None and not args.local:
        p.error("--procs goes with --local")
    slurm_only = [f"--{k.replace('_', '-')}" for k in (*SLURM_FLAGS, "after", "wait")
                  if getattr(args, k) not in (None, False)]  # fmt: skip
    if args.local and slurm_only:
        p.error(f"{' and '.join(slurm_only)}: for Slurm launches, not --local")
    if args.local and len(args.recipes) > 1:
        p.error("--local runs one recipe; several recipes are a chain of Slurm jobs")
    if args.json and not args.dry_run:
        p.error("--json goes with --dry-run")
    if args.sweep and len(args.recipes) > 1:
        p.error("--sweep varies one recipe; a chain of several is not swept")
    if args.array_limit is not None and (not args.sweep or args.local):
        p.error("--array-limit goes with --sweep on Slurm")
    if args.wait and args.dry_run:
        p.error("--wait goes with a real launch, not --dry-run")
    if args.after is not None and not re.fullmatch(r"\d+(_\d+)?([:,]\d+(_\d+)?)*", args.after):
        p.error(f"--after: expected a Slurm job id (or ids separated by ','), got {args.after!r}")
    for flag, value, least in (
        ("--nodes", args.nodes, 1),
        ("--gpus-per-node", args.gpus_per_node, 0),
        ("--procs", args.procs, 1),
        ("--array-limit", args.array_limit, 1),
    ):
        if value is not None and value < least:
            p.error(f"{flag}: expected an integer >= {least}, got {value}")
    return args


def world_of(r: recipe.Recipe, args: Any) -> World:
    if args.local:
        procs = args.procs or 1
        return World(nodes=1, gpus_per_node=procs, world_size=procs, mode="local")
    from toolkit.cluster import slurm

    spec = slurm.job_spec(r, {k: getattr(args, k) for k in SLURM_FLAGS})
    # CPU nodes (0 GPUs) still run one process each.
    return World(nodes=spec.nodes, gpus_per_node=spec.gpus_per_node,
                 world_size=spec.nodes * spec.tasks_per_node, mode="slurm")  # fmt: skip


def group_table(params: dict[str, Any]) -> list[str]:
    """The optimiser groups, one row each; a layer column where optim.layer_decay splits them."""
    layered = any(g.get("layer") is not None for g in params["groups"])
    rows = [("rule", *(("layer",) if layered else ()), "lr", "weight decay", "params")]
    rows += [(g["rule"], *((str(g["layer"]),) if layered else ()), f"{g['lr']:.2e}",
              f"{g['weight_decay']:g}", f"{g['params']:,}")
             for g in params["groups"]]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def dry_run_doc(
    r: recipe.Recipe, world: World, warnings: list[str], sbatch: str | None
) -> dict[str, Any]:
    return {
        "recipe": recipe.to_dict(r),
        "params": param_summary(r),
        "world": {k: v for k, v in asdict(world).items() if k != "mode"},
        "sbatch": sbatch,
        "warnings": warnings,
    }


def dry_run_text(
    path: str,
    r: recipe.Recipe,
    world: World,
    warnings: list[str],
    as_json: bool,
    sbatch: str | None = None,
) -> str:
    if as_json:
        return json.dumps(dry_run_doc(r, world, warnings, sbatch), indent=2) + "\n"
    params = param_summary(r)
    where = "this machine" if world.mode == "local" else "Slurm"
    lines = [
        f"recipe: {path} -> {r.run_dir}",
        f"task: {r.task}   model: {r.model.arch}   freeze: {r.freeze or 'none'}   "
        f"init.from: {r.init.from_ or 'none'}",
        f"world: {world.nodes} node(s) x {world.gpus_per_node} GPU(s) per node = "
        f"{world.world_size} process(es) on {where}",
        f"params: {params['total']:,} total, {params['trainable']:,} trainable",
        "",
        *group_table(params),
        "",
        "# resolved recipe",
        recipe.dump(r).rstrip(),
    ]
    if sbatch is not None:
        lines += ["", "# sbatch script (submitted through submitit)", sbatch.rstrip()]
    if warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def run_local(args: Any, r: recipe.Recipe) -> int:
    """P=1: train in this process (the debug run). P>1: torchrun starts P processes here."""
    from toolkit.engine import devices

    done, _ = preflight.admit(r, args.procs or 1)  # before any process starts
    if done is not None:
        logger.warning("%s", done.line())
        return 0
    devices.check_local(args.procs or 1)
    if (args.procs or 1) == 1:
        from toolkit.runs.entry import run

        return run(r)
    from toolkit.cluster import env

    return env.torchrun(args.procs, "toolkit.train", [args.recipe, *args.overrides])


@dataclass(frozen=True)
class Stage:
    """One recipe of a Slurm launch, with the job it asks for."""

    path: str
    recipe: recipe.Recipe
    world: World
    spec: Any  # toolkit.cluster.slurm.JobSpec
    chained: bool  # its init.from is the run directory of an earlier stage of the chain


def slurm_stages(args: Any) -> list[Stage]:
    from toolkit.cluster import slurm

    flags = {k: getattr(args, k) for k in SLURM_FLAGS}
    stages: list[Stage] = []
    for path in args.recipes:
        r = recipe.load(path, args.overrides)
        for earlier in stages:
            if earlier.recipe.run_dir.absolute() == r.run_dir.absolute():
                raise UserError(
                    f"{path}: run.dir {r.run_dir} is also the run directory of {earlier.path}; "
                    "each stage of a chain needs its own"
                )
        source = Path(r.init.from_).absolute() if r.init.from_ else None
        chained = source is not None and any(
            source == s.recipe.run_dir.absolute() or s.recipe.run_dir.absolute() in source.parents
            for s in stages
        )
        stages.append(Stage(path, r, world_of(r, args), slurm.job_spec(r, flags), chained))
    return stages


def stage_sbatch(stage: Stage, after: str | None) -> str:
    from toolkit.cluster import slurm

    params = slurm.parameters(stage.spec, f"afterok:{after}" if after else None)
    return slurm.sbatch_script(slurm.job_folder(stage.recipe), params)


def after_of(args: Any) -> str | None:
    """`--after` as Slurm's dependency list wants it (ids joined by ':')."""
    return args.after.replace(",", ":") if args.after else None


def run_slurm(args: Any) -> int:
    """Submit each recipe as a Slurm job, each after the one before (afterok)."""
    from toolkit.cluster import slurm

    stages = slurm_stages(args)
    after = after_of(args)
    if args.dry_run:
        docs, texts = [], []
        for i, stage in enumerate(stages):
            script = stage_sbatch(stage, after if i == 0 else f"<job id of stage {i}>")
            warnings = preflight.problems(stage.recipe, chained=stage.chained)
            warnings += preflight.relaunch_notes(stage.recipe, stage.world.world_size)
            if args.json:
                docs.append(dry_run_doc(stage.recipe, stage.world, warnings, script))
                continue
            head = f"# stage {i + 1} of {len(stages)}\n" if len(stages) > 1 else ""
            texts.append(head + dry_run_text(stage.path, stage.recipe, stage.world, warnings,
                                             as_json=False, sbatch=script))  # fmt: skip
        if args.json:  # a chain: one object per stage
            sys.stdout.write(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2) + "\n")
        else:
            sys.stdout.write("\n".join(texts))
        return 0
    slurm.require_slurm()
    to_submit = []
    for stage in stages:
        done, _ = preflight.admit(stage.recipe, stage.world.world_size, chained=stage.chained)
        if done is not None:  # a finished stage of a chain is not trained again
            logger.warning("%s", done.line())
            continue
        to_submit.append(stage)
    submitted = []
    for stage in to_submit:
        job = slurm.submit(stage.spec, slurm.job_folder(stage.recipe),
                           [stage.path, *args.overrides], after)  # fmt: skip
        sys.stdout.write(submitted_text(stage, job.job_id, after))
        sys.stdout.flush()
        submitted.append((stage, job))
        after = job.job_id
    if len(stages) > 1:
        parent = os.path.commonpath([str(s.recipe.run_dir.absolute()) for s in stages])
        sys.stdout.write(f"watch the chain: tensorboard --logdir {shlex.quote(parent)}\n")
    return wait_for(submitted) if args.wait else 0


def submitted_text(stage: Stage, job_id: str, after: str | None) -> str:
    r, w = stage.recipe, stage.world
    logs = r.run_dir / "slurm"
    when = f", after job {after.replace(':', ', ')} succeeds" if after else ""
    return (
        f"job {job_id}: {r.name}, {w.nodes} node(s) x {max(w.gpus_per_node, 1)} process(es) = "
        f"{w.world_size}{when}\n"
        f"  run dir: {r.run_dir}\n"
        f"  logs:    {logs / f'{job_id}_0_log.err'} (task 0; {job_id}_<task>_log.out/.err for "
        "every task)\n"
        f"  watch:   tensorboard --logdir {shlex.quote(str(r.run_dir / 'tb'))}\n"
    )


def wait_for(submitted: list[tuple[Stage, Any]]) -> int:
    """--wait: block until every job of the chain has ended; 1 on the first that failed."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    for i, (stage, job) in enumerate(submitted):
        try:
            job.job.results()
        except (FailedJobError, UncompletedJobError) as err:
            log = stage.recipe.run_dir / "slurm" / f"{job.job_id}_0_log.err"
            # submitit's message holds the job's whole traceback: its exception line says why.
            lines = str(err).strip().splitlines() or [type(err).__name__]
            why = [x for x in lines if re.match(r"[\w.]+(Error|Exception): ", x)] or lines[:1]
            sys.stderr.write(
                f"error: job {job.job_id} ({stage.recipe.name}) failed: {why[-1]} (see {log})\n"
            )
            later = [j.job_id for _, j in submitted[i + 1 :]]
            if later:
                sys.stderr.write(f"later stages will not start: job(s) {', '.join(later)}\n")
            return 1
        sys.stdout.write(f"job {job.job_id}: {stage.recipe.name} finished\n")
    return 0


def launch(args: Any) -> int:
    """One recipe (or a chain of stages) launched as `parse_args` read it: dry-run, local or
    Slurm; a sweep (`--sweep`) is `toolkit.cluster.sweeps.run_sweep`'s. A user error raises
    UserError."""
    if not args.local:
        return run_slurm(args)
    r = recipe.load(args.recipe, args.overrides)
    world = world_of(r, args)
    if args.dry_run:
        notes = preflight.problems(r) + preflight.relaunch_notes(r, world.world_size)
        sys.stdout.write(dry_run_text(args.recipe, r, world, notes, args.json))
        return 0
    return run_local(args, r)

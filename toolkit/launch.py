"""The launch command: resolve and check a recipe, then dry-run it, run it locally, or submit it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from toolkit import cli, preflight, recipe
from toolkit.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """Where the processes of a job run."""

    nodes: int
    gpus_per_node: int
    world_size: int
    mode: str  # "local" or "slurm"


def parse_args(argv: Sequence[str] | None) -> Any:
    p = cli.ArgumentParser(
        prog="python -m toolkit.launch",
        description="Launch a training stage described by a YAML recipe.",
        epilog="Overrides use dotted keys: optim.lr=3e-4 train.epochs=2 freeze=[encoder] "
        "deepspeed=null",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--nodes", type=int, help="Slurm nodes (default: cluster.nodes)")
    p.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node, one process each; 0: CPU nodes"
    )
    p.add_argument("--local", action="store_true", help="run on this machine instead of Slurm")
    p.add_argument("--procs", type=int, help="with --local: processes on this machine (default 1)")
    p.add_argument("--dry-run", action="store_true", help="resolve, check and print; start nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    args = p.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"expected key=value after the recipe, got {bad[0]!r}")
    if args.procs is not None and not args.local:
        p.error("--procs goes with --local")
    if args.local and (args.nodes is not None or args.gpus_per_node is not None):
        p.error("--nodes and --gpus-per-node are for Slurm launches, not --local")
    if args.json and not args.dry_run:
        p.error("--json goes with --dry-run")
    for flag, value, least in (
        ("--nodes", args.nodes, 1),
        ("--gpus-per-node", args.gpus_per_node, 0),
        ("--procs", args.procs, 1),
    ):
        if value is not None and value < least:
            p.error(f"{flag}: expected an integer >= {least}, got {value}")
    return args


def world_of(r: recipe.Recipe, args: Any) -> World:
    if args.local:
        procs = args.procs or 1
        return World(nodes=1, gpus_per_node=procs, world_size=procs, mode="local")
    nodes = args.nodes if args.nodes is not None else r.cluster.nodes
    gpus = args.gpus_per_node if args.gpus_per_node is not None else r.cluster.gpus_per_node
    # CPU nodes (0 GPUs) still run one process each.
    return World(nodes=nodes, gpus_per_node=gpus, world_size=nodes * max(gpus, 1), mode="slurm")


def param_summary(r: recipe.Recipe) -> dict[str, Any]:
    """Parameter counts and optimiser groups of the recipe's model, built on the meta device
    (shapes only: instant and allocation-free even for large models)."""
    import torch

    from toolkit.models import apply_freeze, build_model, param_counts
    from toolkit.optim import build_groups

    with torch.device("meta"):
        model = build_model(r.model, r.stage, r.data.scale)
    if r.stage == "finetune":
        apply_freeze(model, r.freeze)
    total, trainable = param_counts(model)
    groups = [
        {"rule": g.rule, "lr": g.lr, "weight_decay": g.weight_decay, "params": g.numel}
        for g in build_groups(model, r.optim)
    ]
    return {"total": total, "trainable": trainable, "groups": groups}


def group_table(params: dict[str, Any]) -> list[str]:
    rows = [("rule", "lr", "weight decay", "params")]
    rows += [(g["rule"], f"{g['lr']:.2e}", f"{g['weight_decay']:g}", f"{g['params']:,}")
             for g in params["groups"]]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def dry_run(path: str, r: recipe.Recipe, world: World, warnings: list[str], as_json: bool) -> None:
    params = param_summary(r)
    if as_json:
        out = {
            "recipe": recipe.to_dict(r),
            "params": params,
            "world": {k: v for k, v in asdict(world).items() if k != "mode"},
            "sbatch": None,
            "warnings": warnings,
        }
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    where = "this machine" if world.mode == "local" else "Slurm"
    lines = [
        f"recipe: {path} -> {r.run_dir}",
        f"stage: {r.stage}   freeze: {r.freeze or 'none'}   init.from: {r.init.from_ or 'none'}",
        f"world: {world.nodes} node(s) x {world.gpus_per_node} GPU(s) per node = "
        f"{world.world_size} process(es) on {where}",
        f"params: {params['total']:,} total, {params['trainable']:,} trainable",
        "",
        *group_table(params),
        "",
        "# resolved recipe",
        recipe.dump(r).rstrip(),
    ]
    if warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in warnings]
    sys.stdout.write("\n".join(lines) + "\n")


def run_local(args: Any, r: recipe.Recipe) -> int:
    """P=1: train in this process (the debug run). P>1: torchrun starts P processes here."""
    if (args.procs or 1) == 1:
        from toolkit.train import run

        return run(r)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.procs}", "-m", "toolkit.train", args.recipe, *args.overrides,
    ]  # fmt: skip
    logger.info("starting %d processes: %s", args.procs, " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    r = recipe.load(args.recipe, args.overrides)
    world = world_of(r, args)
    if args.dry_run:
        dry_run(args.recipe, r, world, preflight.problems(r), args.json)
        return 0
    preflight.require(r)
    if args.local:
        return run_local(args, r)
    raise UserError("Slurm submission is not available in this version yet; use --local")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

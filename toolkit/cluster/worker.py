"""One process of a training job, as `python -m toolkit.train`, srun, torchrun and a submitit
task run it: rank and world from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), which an srun task derives from its SLURM_* variables first (`env.setup`)."""

from __future__ import annotations

from collections.abc import Sequence

from toolkit.cluster import env
from toolkit.core import cli
from toolkit.runs import recipe
from toolkit.runs.entry import STOPPED, run

__all__ = ["STOPPED", "main"]


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m toolkit.train",
                           description="One process of a training job.")  # fmt: skip
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = p.parse_intermixed_args(argv)
    env.bind_to_launcher()  # a torchrun worker ends with its torchrun
    env.setup()  # an srun task: RANK, WORLD_SIZE, MASTER_ADDR, ... from its SLURM_* variables
    return run(recipe.load(args.recipe, args.overrides))


def main(argv: Sequence[str] | None = None) -> int:
    """Train the recipe `argv` names in this process; the exit status (STOPPED: requeue)."""
    return cli.run(_main, argv)

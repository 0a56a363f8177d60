"""One process of a training job: `python -m toolkit.train RECIPE [key=value ...]`.

srun, torchrun and `launch --local` run this in every process; rank and world come from the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which an srun task derives
from its SLURM_* variables first (toolkit/cluster/env.py). Exit status 3: a signal stopped the run
after a checkpoint (the Slurm scripts requeue the job on it); relaunching resumes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from toolkit import cli, recipe
from toolkit.cluster import env

logger = logging.getLogger(__name__)

STOPPED = 3  # exit status: stopped by a signal after a checkpoint; not finished


def run(r: recipe.Recipe) -> int:
    """Train one recipe in this process; 1 when the loss became non-finite, STOPPED when a
    signal stopped it after a checkpoint."""
    from toolkit.engine.loop import NonFiniteLoss, train  # torch/accelerate: only when training

    try:
        result = train(r)
    except NonFiniteLoss as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    if result.stopped_by_signal:
        return STOPPED
    if result.eval and result.eval.get("model"):
        logger.info("%s: %s", r.name, result.eval["model"])
    return 0


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m toolkit.train", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = p.parse_intermixed_args(argv)
    env.bind_to_launcher()  # a torchrun worker ends with its torchrun
    env.setup()  # an srun task: RANK, WORLD_SIZE, MASTER_ADDR, ... from its SLURM_* variables
    return run(recipe.load(args.recipe, args.overrides))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

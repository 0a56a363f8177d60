"""Train one recipe in this process and say how it ended, as an exit status: the entry that
`python -m toolkit.train`, `launch --local`, a Slurm task and the demo share."""

from __future__ import annotations

import logging
import sys

from toolkit.core.schema import Recipe

logger = logging.getLogger(__name__)

STOPPED = 3  # exit status: stopped by a signal after a checkpoint; not finished


def run(r: Recipe) -> int:
    """Train one recipe in this process; 1 when the loss became non-finite, STOPPED when a
    signal stopped it after a checkpoint."""
    from toolkit.runs.loop import NonFiniteLoss, train  # torch/accelerate: only when training

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

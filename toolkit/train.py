"""One process of a training job: `python -m toolkit.train RECIPE [key=value ...]`.

srun, torchrun and `launch --local` run this in every process; rank and world come from the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which an srun task derives
from its SLURM_* variables first (toolkit/cluster/env.py). Exit status 3: a signal stopped the run
after a checkpoint (the Slurm scripts requeue the job on it); relaunching resumes. The process
itself is `toolkit.cluster.worker`'s, which submitit tasks run too.
"""

from __future__ import annotations

import sys

from toolkit.cluster.worker import STOPPED, main

__all__ = ["STOPPED", "main"]

if __name__ == "__main__":
    sys.exit(main())

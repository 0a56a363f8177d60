"""`toolkit.predict` as a Slurm job on the real two-node cluster: srun's tasks on n1 and n2
split the files, each written once, the same bytes as one process writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.jobs import sbatch, wait_done
from tests.helpers import EDSR_RECIPE, TINY_EDSR, make_run
from toolkit import predict

pytestmark = pytest.mark.cluster


def test_srun_tasks_on_two_nodes_split_the_files(slurm_cluster, tmp_path: Path) -> None:
    run = make_run(tmp_path / "edsr", *TINY_EDSR, base=EDSR_RECIPE)
    rng = np.random.default_rng(0)
    for i in range(12):
        (tmp_path / "in" / f"{i % 3}").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "in" / f"{i % 3}" / f"{i:02d}.npy",
                rng.uniform(size=(24 + i, 30)).astype(np.float32))  # fmt: skip
    (tmp_path / "job.sh").write_text(
        "#!/bin/bash\n#SBATCH -N2 --ntasks-per-node=1 -t 5 -o job.out\n"
        "export SRMAE_LOG_LEVEL=DEBUG\n"
        f"srun {slurm_cluster.python} -m toolkit.predict {run} {tmp_path / 'in'} "
        f"--out {tmp_path / 'out'}\n"
    )
    job = sbatch(slurm_cluster, tmp_path, "job.sh")
    state, _ = wait_done(job, timeout=180)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", log
    wrote = re.findall(r"rank (\d) wrote (\S+)", log)
    assert {rank for rank, _ in wrote} == {"0", "1"}  # both tasks wrote
    assert sorted(p for _, p in wrote) == sorted(str(p) for p in (tmp_path / "out").rglob("*.npy"))
    assert len(wrote) == 12 and "on 2 process(es)" in log
    assert predict.main([str(run), str(tmp_path / "in"), "--out", str(tmp_path / "one")]) == 0
    for path in (tmp_path / "one").rglob("*.npy"):
        assert (
            path.read_bytes()
            == (tmp_path / "out" / path.relative_to(tmp_path / "one")).read_bytes()
        )

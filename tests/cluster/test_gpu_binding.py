"""GPUs declared as GRES on the test cluster (no hardware: slurmd schedules what gres.conf names):
each task of a 2-node job is shown the CUDA_VISIBLE_DEVICES and LOCAL_RANK it must train with,
whether GPUs are bound per task or per node, and the CPUs srun gave it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cluster.jobs import sbatch, wait_done

pytestmark = pytest.mark.cluster

# srun as slurm/*.sh runs it: --cpus-per-task passed on explicitly (Slurm 22.05-23.02 srun does
# not take it from the job), each task printing what toolkit.cluster.env derives for it.
SCRIPT = """#!/bin/bash
srun --cpus-per-task="$SLURM_CPUS_PER_TASK" --label "{python}" -m toolkit.cluster.env
"""


def tasks(out: Path) -> dict[int, dict[str, str]]:
    """srun --label's output -> each task's printed KEY=value lines."""
    found: dict[int, dict[str, str]] = {}
    for line in out.read_text().splitlines():
        m = re.fullmatch(r"\s*(\d+): (\w+)=(.*)", line)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = m.group(3)
    return found


def run(cluster, tmp_path: Path, *size: str) -> dict[int, dict[str, str]]:
    (tmp_path / "job.sh").write_text(SCRIPT.format(python=cluster.python))
    job = sbatch(cluster, tmp_path, "--nodes=2", "--output=out-%j.txt", *size, "job.sh")
    out = tmp_path / f"out-{job}.txt"
    assert wait_done(job, timeout=60) == ("COMPLETED", "0:0"), out.read_text()
    return tasks(out)


def test_gpus_bound_per_task_each_task_uses_its_one_gpu(slurm_cluster, tmp_path) -> None:
    found = run(slurm_cluster, tmp_path, "--ntasks-per-node=2", "--gpus-per-task=1",
                "--cpus-per-task=1")  # fmt: skip
    assert sorted(found) == [0, 1, 2, 3]
    by_node: dict[str, set[str]] = {}
    for rank, t in found.items():
        assert t["RANK"] == str(rank) and t["WORLD_SIZE"] == "4"
        # one GPU visible, so it is device 0 for the task, whatever its SLURM_LOCALID
        assert len(t["CUDA_VISIBLE_DEVICES"].split(",")) == 1 and t["LOCAL_RANK"] == "0"
        assert t["CPUS"] == "1"
        by_node.setdefault(t["GROUP_RANK"], set()).add(t["CUDA_VISIBLE_DEVICES"])
    assert by_node == {"0": {"0", "1"}, "1": {"0", "1"}}  # each task of a node its own GPU


def test_gpus_bound_per_node_each_task_takes_its_local_rank(slurm_cluster, tmp_path) -> None:
    found = run(slurm_cluster, tmp_path, "--ntasks-per-node=2", "--gpus-per-node=2",
                "--cpus-per-task=1")  # fmt: skip
    for t in found.values():
        assert t["CUDA_VISIBLE_DEVICES"] == "0,1"  # every task sees both
    assert sorted(t["LOCAL_RANK"] for t in found.values()) == ["0", "0", "1", "1"]


def test_every_cpu_of_a_task_reaches_it(slurm_cluster, tmp_path) -> None:
    found = run(slurm_cluster, tmp_path, "--ntasks-per-node=1", "--gpus-per-node=2",
                "--cpus-per-task=2")  # fmt: skip
    assert [t["CPUS"] for t in found.values()] == ["2", "2"]
    assert [t["LOCAL_RANK"] for t in found.values()] == ["0", "0"]

"""Submitting and watching jobs on the test cluster: the helpers every cluster test shares."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import cli_env, run_command

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}  # fmt: skip


def job_env(cluster) -> dict[str, str]:
    """What sbatch hands on to the jobs (it exports the submitter's environment)."""
    return cli_env(
        SRMAE_PYTHON=cluster.python,  # the sbatch scripts' interpreter
        # One thread per process: both nodes share 2 cores, and the reference runs match it.
        OMP_NUM_THREADS="1",
        # The node namespaces reach no DNS server: without this, each reverse lookup of a peer's
        # address by torch.distributed waits out glibc's 5 s x 2 default before giving up.
        RES_OPTIONS="timeout:1 attempts:1",
    )


def launch(cluster, cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [cluster.python, "-m", "toolkit.launch", *args]
    return run_command(*cmd, cwd=cwd, env=job_env(cluster), timeout=timeout)


def launched(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = re.findall(r"^job (\d+): .* process\(es\)", proc.stdout, flags=re.M)
    assert jobs, proc.stdout
    return jobs


def sbatch(cluster, cwd: Path, *args: str) -> str:
    proc = run_command("sbatch", "--parsable", *args, cwd=cwd, env=job_env(cluster), timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def sacct(job: str, fields: str) -> list[list[str]]:
    """One row per run of the job allocation (-D: a requeued job's earlier runs too)."""
    proc = run_command("sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", fields, timeout=30)
    proc.check_returncode()
    return [line.split("|") for line in proc.stdout.strip().splitlines() if line]


def wait_done(job: str, timeout: float = 120) -> tuple[str, str]:
    """(State, ExitCode) once accounting has the job's current run in a terminal state."""
    end = time.monotonic() + timeout
    state = exit_code = ""
    while time.monotonic() < end:
        rows = sacct(job, "State,ExitCode")
        if rows:
            state, exit_code = rows[-1][0].split()[0], rows[-1][1]
            if state in TERMINAL:
                return state, exit_code
        time.sleep(0.5)
    pytest.fail(f"job {job}: still {state or 'unknown'} after {timeout} s")

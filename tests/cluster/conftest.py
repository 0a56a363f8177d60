"""The local two-node Slurm cluster (tests/cluster/cluster.sh) as a session fixture.

Runs where we are root with apt (installs the Debian packages once if needed); elsewhere every
test in tests/cluster is skipped. SRMAE_CLUSTER_TESTS=0 turns them off.

Sessions on one machine share the cluster: each holds a shared lock on USERS_LOCK while it runs,
and the last one out stops the cluster if a test session started it. A cluster that was already
up with no session using it (`cluster.sh up` by hand) is used and left running.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import run_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRIPT = HERE / "cluster.sh"
USERS_LOCK = Path("/tmp/srmae-slurm-users.lock")


@dataclass(frozen=True)
class SlurmCluster:
    conf: str  # SLURM_CONF
    state: Path  # cluster.sh's state dir (logs under log/)
    mode: str  # "netns": one network namespace per node; "local": both slurmd on loopback
    nodes: tuple[str, ...]  # ("n1", "n2")
    python: str  # interpreter for job scripts


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


def _why_not() -> str | None:
    if os.environ.get("SRMAE_CLUSTER_TESTS", "1") == "0":
        return "cluster tests disabled (SRMAE_CLUSTER_TESTS=0)"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "no local Slurm cluster: needs root and apt"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "no local Slurm cluster: needs iproute2 and util-linux (ip, unshare, nsenter)"
    return None


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # stdin/stdout/stderr never shared with the daemons: cluster.sh detaches them to log files.
    return run_command("bash", str(SCRIPT), *args, timeout=timeout)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        pytest.fail(f"cluster.sh {what} failed (exit {proc.returncode}):\n{tail}", pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    if shutil.which("slurmctld") is None:
        _check(_run("install", timeout=600), "install")
    users = USERS_LOCK.open("a")
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    fcntl.flock(users, fcntl.LOCK_SH)  # held until the end of the session
    was_up = _run("status", timeout=60).returncode == 0
    up = _run("up", timeout=300)
    _check(up, "up")
    conf = next(
        (
            line.split("=", 1)[1].strip()
            for line in up.stdout.splitlines()
            if line.startswith("export SLURM_CONF=")
        ),
        None,
    )
    if not conf:
        pytest.fail(f"cluster.sh up printed no 'export SLURM_CONF=' line:\n{up.stdout}")
    state = Path(conf).parents[1]
    started_by_tests = state / "started-by-tests"
    if not was_up:
        started_by_tests.touch()
    elif alone:  # up by hand, or left over from a session that died: not ours to stop
        started_by_tests.unlink(missing_ok=True)
    mode = (state / "mode").read_text().strip()
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield SlurmCluster(conf=conf, state=state, mode=mode, nodes=("n1", "n2"), python=python)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            last = True
        except BlockingIOError:
            last = False  # another session still uses the cluster; it stops it
        if last and started_by_tests.exists():
            down = _run("down", timeout=120)
            if down.returncode != 0:
                print(f"cluster.sh down failed:\n{down.stdout}{down.stderr}", file=sys.stderr)
        users.close()

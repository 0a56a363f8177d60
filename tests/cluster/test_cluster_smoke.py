"""The local Slurm cluster does what the toolkit's Slurm path relies on (real Slurm, no mocks).

Two nodes that see each other over TCP by name (torch.distributed rendezvous), accounting
(submitit reads job states with sacct), signals delivered to running tasks (submitit's USR2
requeue/checkpoint path) and job dependencies (chained stages).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import run_command

pytestmark = pytest.mark.cluster

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def run(*cmd: str, cwd: Path | None = None, timeout: float = 30) -> str:
    proc = run_command(*cmd, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> exit {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def sbatch(cwd: Path, script: str, *options: str) -> str:
    path = cwd / f"job-{time.monotonic_ns()}.sh"
    path.write_text(script)
    out = run("sbatch", "--parsable", *options, str(path), cwd=cwd)
    return out.strip().split(";")[0]


def sacct_state(job: str) -> tuple[str, str]:
    """(State, ExitCode) of the job allocation as accounting has it ("" while unknown)."""
    out = run("sacct", "-X", "-n", "-P", "-j", job, "-o", "State,ExitCode")
    line = out.strip().splitlines()[-1] if out.strip() else "|"
    state, exit_code = line.split("|")
    return state.split()[0] if state else "", exit_code


def wait_accounted(job: str, timeout: float = 25) -> tuple[str, str]:
    """Wait until sacct reports a terminal state for the job (what submitit waits on)."""
    end = time.monotonic() + timeout
    state = exit_code = ""
    while time.monotonic() < end:
        state, exit_code = sacct_state(job)
        if state in TERMINAL:
            return state, exit_code
        time.sleep(0.5)
    pytest.fail(f"job {job}: sacct still says {state or 'nothing'!r} after {timeout}s")


def wait_file(path: Path, timeout: float = 20) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.2)
    logs = "\n".join(f"{p.name}: {p.read_text()}" for p in path.parent.glob("*.out"))
    pytest.fail(f"{path.name} not written after {timeout}s\n{logs}")


def test_srun_spans_both_nodes(slurm_cluster, tmp_path):
    out = run("srun", "-N2", "-n2", "hostname", cwd=tmp_path)
    assert sorted(out.split()) == ["n1", "n2"]


EXCHANGE = r"""
import os, socket, sys, time
rank = int(os.environ["SLURM_PROCID"])
master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
me = socket.gethostname()
own_ip = socket.gethostbyname(me)  # what gloo binds to
if rank == 0:
    srv = socket.create_server(("0.0.0.0", port))
    srv.settimeout(20)
    conn, (peer_ip, _) = srv.accept()
    msg = conn.recv(100).decode()
    conn.sendall(f"ack from {me}".encode())
else:
    end = time.time() + 20
    while True:
        try:
            conn = socket.create_connection((master, port), timeout=2)
            break
        except OSError:
            if time.time() > end:
                raise
            time.sleep(0.2)
    peer_ip = conn.getpeername()[0]
    conn.sendall(f"hello from {me}".encode())
    msg = conn.recv(100).decode()
conn.close()
with open(f"rank{rank}.txt", "w") as f:
    f.write(f"{me} {own_ip} {peer_ip} {msg}")
"""


def test_tasks_on_two_nodes_talk_tcp_by_name(slurm_cluster, tmp_path):
    (tmp_path / "exchange.py").write_text(EXCHANGE)
    job = sbatch(
        tmp_path,
        f"""#!/bin/bash
#SBATCH -N2 --ntasks-per-node=1 -t 2 -o job.out
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
srun {slurm_cluster.python} exchange.py
""",
    )
    state, exit_code = wait_accounted(job)
    assert (state, exit_code) == ("COMPLETED", "0:0"), (tmp_path / "job.out").read_text()
    host0, ip0, peer0, msg0 = (tmp_path / "rank0.txt").read_text().split(" ", 3)
    host1, ip1, peer1, msg1 = (tmp_path / "rank1.txt").read_text().split(" ", 3)
    assert (host0, host1) == ("n1", "n2")
    assert msg0 == "hello from n2"
    assert msg1 == "ack from n1"
    if slurm_cluster.mode == "netns":
        # Real separate network stacks: each node has its own address and sees the other's.
        assert (ip0, ip1) == ("10.77.0.11", "10.77.0.12")
        assert (peer0, peer1) == (ip1, ip0)


def test_sacct_reports_finished_jobs(slurm_cluster, tmp_path):
    ok = sbatch(tmp_path, "#!/bin/bash\ntrue\n", "-o", "ok.out")
    bad = sbatch(tmp_path, "#!/bin/bash\nexit 3\n", "-o", "bad.out")
    assert wait_accounted(ok) == ("COMPLETED", "0:0")
    assert wait_accounted(bad) == ("FAILED", "3:0")


TRAP = r"""
import pathlib, signal, sys, time
def on_usr2(signum, frame):
    pathlib.Path("got-usr2").write_text("USR2")
    sys.exit(0)
signal.signal(signal.SIGUSR2, on_usr2)
pathlib.Path("ready").write_text("ready")
time.sleep(25)
"""


def test_scancel_signal_reaches_running_task(slurm_cluster, tmp_path):
    (tmp_path / "trap.py").write_text(TRAP)
    job = sbatch(
        tmp_path,
        f"#!/bin/bash\n#SBATCH -N1 -n1 -t 2 -o job.out\nsrun {slurm_cluster.python} trap.py\n",
    )
    wait_file(tmp_path / "ready")
    run("scancel", "--signal=USR2", job)
    assert wait_file(tmp_path / "got-usr2", timeout=10) == "USR2"
    assert wait_accounted(job) == ("COMPLETED", "0:0")


def test_dependency_waits_for_predecessor(slurm_cluster, tmp_path):
    first = sbatch(tmp_path, "#!/bin/bash\nsleep 4\ndate +%s.%N > first.done\n", "-o", "a.out")
    second = sbatch(
        tmp_path,
        "#!/bin/bash\ndate +%s.%N > second.start\n",
        "-o",
        "b.out",
        f"--dependency=afterok:{first}",
    )
    reason = run("squeue", "-h", "-j", second, "-o", "%T %r").split()
    assert reason == ["PENDING", "Dependency"]
    assert wait_accounted(first) == ("COMPLETED", "0:0")
    assert wait_accounted(second) == ("COMPLETED", "0:0")
    assert float((tmp_path / "second.start").read_text()) >= float(
        (tmp_path / "first.done").read_text()
    )

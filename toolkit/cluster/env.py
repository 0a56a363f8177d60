"""Slurm / torchrun environment -> the rank, world and rendezvous of one training process."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from toolkit.engine import devices

logger = logging.getLogger(__name__)

# MASTER_PORT = PORT_BASE + job id % PORT_SPAN: every task of a job computes the same port with
# no communication, jobs sharing a first node rarely collide, and the range stays below Linux's
# ephemeral ports (32768+), which outgoing connections may already hold.
PORT_BASE = 20000
PORT_SPAN = 10000

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


@dataclass(frozen=True)
class Ranks:
    """Where one process sits in a job, and where the group meets (rank 0's host)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int

    def as_env(self) -> dict[str, str]:
        """The variables torchrun would have set (what torch.distributed and accelerate read)."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


class NodeListError(ValueError):
    """A Slurm node list this module cannot expand (scontrol may still can)."""


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compressed host list -> host names, in order: `n[1-2]` -> n1 n2,
    `gpu[01-03,07]` -> gpu01 gpu02 gpu03 gpu07, `a1,b[2-3]` -> a1 b2 b3, `r[1-2]-n[1-2]` ->
    r1-n1 r1-n2 r2-n1 r2-n2. A range keeps the zero padding of its first number."""
    hosts: list[str] = []
    for group in _split_top_level(text.strip()):
        names = [""]
        for m in re.finditer(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", group):
            suffixes = [""] if m.group(2) is None else _expand_ranges(m.group(2), text)
            names = [n + m.group(1) + s for n in names for s in suffixes]
        hosts += names
    if not hosts:
        raise NodeListError(f"empty node list {text!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on the commas that separate host groups, not those inside brackets."""
    groups, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
            if depth > 1:
                raise NodeListError(f"nested brackets in node list {text!r}")
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise NodeListError(f"unbalanced ']' in node list {text!r}")
        elif c == "," and depth == 0:
            groups.append(text[start:i])
            start = i + 1
    if depth:
        raise NodeListError(f"unbalanced '[' in node list {text!r}")
    groups.append(text[start:])
    if any(not g for g in groups):
        raise NodeListError(f"empty host name in node list {text!r}")
    return groups


def _expand_ranges(ranges: str, text: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise NodeListError(f"bad range {part!r} in node list {text!r}")
        low, high = m.group(1), m.group(2) or m.group(1)
        if int(high) < int(low):
            raise NodeListError(f"descending range {part!r} in node list {text!r}")
        out += [f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1)]
    return out


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE -> tasks on each node: `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"bad tasks-per-node list {text!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def master_port(job_id: str | int) -> int:
    return PORT_BASE + int(str(job_id).split("_")[0]) % PORT_SPAN


def from_torchrun(env: Mapping[str, str]) -> Ranks | None:
    """torchrun's variables (or any launcher setting them), when RANK and WORLD_SIZE are set."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    return Ranks(
        rank=int(env["RANK"]),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        node_rank=int(env.get("GROUP_RANK", "0")),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", "29500")),
    )


def is_slurm_task(env: Mapping[str, str]) -> bool:
    """A task that srun started. The batch script itself also has SLURM_PROCID=0 and the job's
    SLURM_NTASKS, but no step id: treating it as rank 0 of N would wait forever for the others."""
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def from_slurm(env: Mapping[str, str], hosts: list[str] | None = None) -> Ranks | None:
    """The ranks of an srun task from SLURM_* (None outside one). `hosts`: the step's expanded
    node list, when the caller had to ask scontrol for it."""
    if not is_slurm_task(env):
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    hosts = hosts if hosts is not None else expand_nodelist(nodelist)
    node = int(env.get("SLURM_NODEID", "0"))
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    counts = expand_tasks_per_node(per_node) if per_node else [world]
    # Block and cyclic distributions both put task 0 on the first node of the step.
    return Ranks(
        rank=int(env["SLURM_PROCID"]),
        world_size=world,
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        local_world_size=counts[node] if node < len(counts) else counts[-1],
        node_rank=node,
        master_addr=hosts[0],
        master_port=master_port(env["SLURM_JOB_ID"]),
    )


def ranks(env: Mapping[str, str]) -> Ranks | None:
    """torchrun's variables win (torchrun inside a Slurm job has set them); then srun's."""
    return from_torchrun(env) or from_slurm(env)


def scontrol_hostnames(nodelist: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True, timeout=30).stdout  # fmt: skip
    return out.split()


def setup(environ: MutableMapping[str, str] | None = None) -> Ranks | None:
    """Give an srun task the torchrun variables derived from SLURM_*; returns them (None when
    this is not an srun task or torchrun's variables are already there, left untouched)."""
    environ = os.environ if environ is None else environ
    if from_torchrun(environ) is not None or not is_slurm_task(environ):
        return None
    try:
        found = from_slurm(environ)
    except NodeListError as err:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
        logger.warning("%s; asking scontrol", err)
        found = from_slurm(environ, scontrol_hostnames(nodelist))
    assert found is not None
    environ.update(found.as_env())
    gpus = devices.visible(environ)
    if gpus:  # GPUs bound per task show in their count: LOCAL_RANK is the index of its own
        index = devices.device_index(found.local_rank, found.local_world_size, len(gpus))
        environ["LOCAL_RANK"] = str(index)
    logger.info(
        "Slurm task: rank %d of %d on %s (node %d, local rank %d of %d, GPU %s of %s, %d CPUs); "
        "master %s:%d",
        found.rank, found.world_size, environ.get("SLURMD_NODENAME", "?"), found.node_rank,
        found.local_rank, found.local_world_size, environ["LOCAL_RANK"] if gpus else "-",
        environ.get("CUDA_VISIBLE_DEVICES", "all"), cpu_count(), found.master_addr,
        found.master_port,
    )  # fmt: skip
    return found


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity: what Slurm bound it to, if it did)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torchrun(procs: int, module: str, args: list[str]) -> int:
    """Run `python -m module args` as `procs` processes on this machine (torchrun, standalone
    rendezvous); the exit status of the group. Should this process die, even by SIGKILL,
    torchrun gets SIGTERM and stops its workers (each of which also dies with torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={procs}", "-m", module, *args]  # fmt: skip
    logger.info("starting %d processes: %s", procs, " ".join(cmd))
    parent = os.getpid()
    return subprocess.run(
        cmd, check=False, preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent)
    ).returncode


def die_with_parent(sig: int, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing). `parent`, where known: the pid the parent had, for
    the case where it died before this call."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)  # orphaned already: adopted by init or a subreaper


def bind_to_launcher() -> None:
    """A torchrun worker ends when its torchrun ends, however it ended: torchrun starts its
    workers in sessions of their own, so a kill of the launcher's process group misses them,
    and left running they hold and write the run directory, blocked in a collective."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(signal.SIGKILL)


def main() -> int:
    """`srun python -m toolkit.cluster.env`: print the variables each task would train with,
    the GPUs it sees and the CPUs it may use."""
    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    setup()
    found = ranks(os.environ)
    if found is None:
        return 1
    shown = {**found.as_env(), "LOCAL_RANK": os.environ.get("LOCAL_RANK", str(found.local_rank)),
             "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
             "CPUS": str(cpu_count())}  # fmt: skip
    sys.stdout.write("".join(f"{key}={value}\n" for key, value in shown.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

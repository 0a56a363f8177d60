"""Which device a process trains on: LOCAL_RANK mapped to the GPUs it can see, and a refusal
when it was given GPUs but CUDA does not work (never a silent CPU run).

Sites bind GPUs to tasks in two ways. Per node: every task sees all of the node's GPUs and takes
the one at its local rank. Per task (`--gpus-per-task=1`, `--gpu-bind`, site defaults): every
task sees one GPU, which is device 0 for it, while SLURM_LOCALID still counts 0..7. torch,
accelerate and DeepSpeed all pick `cuda:LOCAL_RANK`, so LOCAL_RANK is rewritten to the index of
the process's own GPU among those it sees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from toolkit.core.errors import UserError

# What CUDA_VISIBLE_DEVICES holds when a job was given no GPU (Slurm writes NoDevFiles).
_NONE = ("", "NoDevFiles", "-1")
# Slurm's variables of a GPU allocation: lists of GPU indices, most specific first.
_SLURM_GPU_LISTS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def visible(env: Mapping[str, str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list (None: unset, every GPU is visible)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    value = value.strip()
    return [] if value in _NONE else [d for d in value.split(",") if d]


def given_gpus(env: Mapping[str, str]) -> str | None:
    """Why this process should have GPUs (`KEY=value` of the evidence), or None."""
    for key in _SLURM_GPU_LISTS:
        value = env.get(key, "").strip()
        if value and value not in _NONE:
            return f"{key}={value}"
    count = env.get("SLURM_GPUS_ON_NODE", "0").strip()
    if count.isdigit() and int(count) > 0:
        return f"SLURM_GPUS_ON_NODE={count}"
    if visible(env):
        return f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}"
    return None


def device_index(local_rank: int, local_world: int, count: int) -> int:
    """The GPU (among the `count` this process sees) of local rank `local_rank` of the
    `local_world` processes on its node."""
    if count >= local_world and local_rank < count:
        return local_rank  # the node's GPUs are visible to every task: one each
    if count == 1:
        return 0  # one GPU bound to this task
    raise UserError(
        f"local rank {local_rank} of {local_world} processes on this node sees {count} GPU(s): "
        "give each process one GPU (--gpus-per-task=1) or every process all of the node's GPUs, "
        "and run one process per GPU"
    )


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
    try:
        torch.cuda.init()
    except Exception as err:  # torch raises RuntimeError or AssertionError with the driver's words
        return f"CUDA does not initialise: {' '.join(str(err).split())}"
    if not torch.cuda.device_count():
        return "CUDA reports no device"
    return None


def bind(env: MutableMapping[str, str] | None = None) -> str:
    """Choose this process's device: "cuda" (LOCAL_RANK rewritten to its GPU's index, which is
    made the current device) or "cpu" where no GPU was given and none works. A process that was
    given GPUs without a working CUDA stops with one line naming the cause."""
    env = os.environ if env is None else env
    evidence = given_gpus(env)
    gpus = visible(env)
    if gpus == [] and evidence is None:
        return "cpu"  # CUDA_VISIBLE_DEVICES="" asks for the CPU
    problem = cuda_problem()
    if problem is not None:
        if evidence is not None:
            raise UserError(f"this process was given GPUs ({evidence}) but {problem}")
        return "cpu"
    import torch

    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    index = device_index(local_rank, local_world, torch.cuda.device_count())
    env["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)
    return "cuda"


def check_local(procs: int) -> None:
    """`launch --local --procs P` on a machine with GPUs: at most one process per GPU."""
    if cuda_problem() is not None:
        return  # CPU processes (gloo); a GPU machine with a broken CUDA stops in bind
    import torch

    count = torch.cuda.device_count()
    if procs > count:
        raise UserError(
            f"--procs {procs}: this machine has {count} GPU(s) and a process needs one; use "
            f"--procs {count} or fewer"
        )

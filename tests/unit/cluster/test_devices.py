"""Device placement: which GPU a process takes under per-task and per-node binding, the refusal
when GPUs were given but CUDA does not work, and one process per GPU for --local."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import DEBUG_RECIPE, make_pairs, one_error_line, tiny
from tests.unit.cluster.test_env import TASK1
from toolkit.cluster import env
from toolkit.core.errors import UserError
from toolkit.engine import devices

# Task 1 of a 2-node job with 2 tasks and 2 GPUs per node, as srun starts it.
GPU_TASK = {**TASK1, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_TASKS_PER_NODE":
            "2(x2)", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3",
            "SLURM_LOCALID": "1", "SLURM_JOB_GPUS": "0,1"}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", []), ("NoDevFiles", []), ("-1", []), ("0,1", ["0", "1"]), ("3", ["3"])],
)
def test_visible_devices(value: str | None, expected: list[str] | None) -> None:
    assert devices.visible({} if value is None else {"CUDA_VISIBLE_DEVICES": value}) == expected


def test_evidence_of_a_gpu_allocation() -> None:
    assert devices.given_gpus({}) is None
    assert devices.given_gpus({"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": ""}) is None
    assert devices.given_gpus({"SLURM_JOB_GPUS": "0,1"}) == "SLURM_JOB_GPUS=0,1"
    assert devices.given_gpus({"CUDA_VISIBLE_DEVICES": "2"}) == "CUDA_VISIBLE_DEVICES=2"


@pytest.mark.parametrize(
    ("local_rank", "local_world", "count", "index"),
    [(3, 8, 8, 3), (3, 8, 1, 0), (1, 2, 4, 1), (0, 1, 1, 0)],
)
def test_device_index_per_node_and_per_task(local_rank, local_world, count, index) -> None:
    assert devices.device_index(local_rank, local_world, count) == index


def test_a_count_that_fits_neither_binding_is_one_line() -> None:
    with pytest.raises(UserError, match=r"local rank 3 of 4 processes on this node sees 2 GPU"):
        devices.device_index(3, 4, 2)


def test_slurm_task_local_rank_follows_the_gpus_it_sees() -> None:
    per_task = {**GPU_TASK, "CUDA_VISIBLE_DEVICES": "1"}
    env.setup(per_task)
    assert (per_task["LOCAL_RANK"], per_task["RANK"]) == ("0", "3")  # its one GPU
    per_node = {**GPU_TASK, "CUDA_VISIBLE_DEVICES": "0,1"}
    env.setup(per_node)
    assert per_node["LOCAL_RANK"] == "1"
    with pytest.raises(UserError, match="sees 3 GPU"):
        env.setup({**GPU_TASK, "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_TASKS_PER_NODE":
                   "4(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2"})  # fmt: skip


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_given_gpus_on_a_cpu_only_torch_stop_with_the_cause() -> None:
    with pytest.raises(UserError) as err:
        devices.bind({"SLURM_JOB_GPUS": "0"})
    assert "was given GPUs (SLURM_JOB_GPUS=0)" in str(err.value)
    assert "is a CPU-only build" in str(err.value)
    assert devices.bind({}) == "cpu"  # no GPU given: the CPU, as asked
    devices.check_local(4)  # CPU processes: as many as wanted


class FakeCuda:
    """A machine with `count` working GPUs, as far as the placement code asks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.current: list[int] = []
        monkeypatch.setattr(devices, "cuda_problem", lambda: None)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.current.append)


def test_bind_rewrites_local_rank_to_the_gpu_it_sees(monkeypatch) -> None:
    cuda = FakeCuda(monkeypatch, count=1)
    e = {"LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "CUDA_VISIBLE_DEVICES": "5"}
    assert devices.bind(e) == "cuda"
    assert e["LOCAL_RANK"] == "0" and cuda.current == [0]
    assert devices.bind(e) == "cuda" and e["LOCAL_RANK"] == "0"  # a second engine: the same


def test_local_runs_get_one_process_per_gpu(monkeypatch) -> None:
    FakeCuda(monkeypatch, count=2)
    devices.check_local(2)
    with pytest.raises(UserError, match=r"--procs 3: this machine has 2 GPU\(s\)"):
        devices.check_local(3)


# What `torch.cuda.init()` raises on a CUDA build of torch when the node's driver is missing
# (c10/cuda/CUDAFunctions.cpp, device_count_impl: cudaErrorInsufficientDriver, no driver version).
NO_DRIVER = (
    "Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and "
    "installed a driver from http://www.nvidia.com/Download/index.aspx"
)


class BrokenDriver:
    """A CUDA build of torch on a node whose driver does not load: the boundary `cuda_problem`
    checks (`torch.version.cuda`, `torch.cuda.init()`), and nothing of the code under test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inits = 0
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(torch.cuda, "init", self.init)

    def init(self) -> None:
        self.inits += 1
        raise RuntimeError(NO_DRIVER)


def test_given_gpus_with_a_broken_driver_stop_with_the_drivers_words(monkeypatch) -> None:
    """A Slurm GPU allocation whose CUDA does not initialise is refused, in one line naming the
    evidence of the allocation and the driver's own words, never trained on the CPU."""
    cuda = BrokenDriver(monkeypatch)
    with pytest.raises(UserError) as err:
        devices.bind({"SLURM_JOB_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0"})
    message = str(err.value)
    assert "\n" not in message and cuda.inits == 1
    assert message == (
        f"this process was given GPUs (SLURM_JOB_GPUS=0) but CUDA does not initialise: {NO_DRIVER}"
    )


def test_a_broken_cuda_without_gpu_variables_falls_back_to_the_cpu(monkeypatch) -> None:
    """Without any sign of a GPU allocation the same broken CUDA is not an error: the process
    runs on the CPU (after asking CUDA, which is how it knows); CUDA_VISIBLE_DEVICES="" asks for
    the CPU without asking CUDA at all."""
    cuda = BrokenDriver(monkeypatch)
    assert devices.bind({}) == "cpu" and cuda.inits == 1
    assert devices.bind({"CUDA_VISIBLE_DEVICES": ""}) == "cpu" and cuda.inits == 1
    devices.check_local(4)  # CPU processes (gloo): as many as wanted


def test_train_on_gpus_with_a_broken_driver_exits_2_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m toolkit.train` in a Slurm GPU allocation whose driver does not load: exit
    status 2, one `error:` line naming the allocation and the driver's words, and nothing
    written into the run directory (no hold, no recipe, no checkpoint)."""
    from toolkit import train
    from toolkit.data.format import MANIFEST
    from toolkit.data.sharding import shard

    make_pairs(tmp_path / "src", 8)
    shard(tmp_path / "src", tmp_path / "shards", val_fraction=0.25, shard_size=8)
    assert (tmp_path / "shards" / MANIFEST).is_file()
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)  # whatever Slurm job the tests run in
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cuda = BrokenDriver(monkeypatch)
    run = tmp_path / "run"
    overrides = tiny(tmp_path / "shards", run, "train.max_steps=1")
    capsys.readouterr()
    assert train.main([str(DEBUG_RECIPE), *overrides]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        "error: this process was given GPUs (SLURM_JOB_GPUS=0) but CUDA does not initialise: "
        f"{NO_DRIVER}"
    )
    assert cuda.inits == 1
    assert not run.exists()

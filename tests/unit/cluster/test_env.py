"""Slurm / torchrun environment -> ranks: node-list expansion, rank, world and master derivation."""

from __future__ import annotations

import pytest

from toolkit.cluster import env
from toolkit.cluster.env import NodeListError, Ranks

# What srun gave task 1 of a 2-node job (1 task per node) on the test cluster, trimmed.
TASK1 = {
    "SLURM_JOB_ID": "8",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_TASKS_PER_NODE": "1(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_ID": "0",
    "SLURMD_NODENAME": "n2",
}


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("gpu[1,3]-ib,login", ["gpu1-ib", "gpu3-ib", "login"]),
        ("node-a.example.org", ["node-a.example.org"]),
    ],
)
def test_expand_nodelist(text: str, hosts: list[str]) -> None:
    assert env.expand_nodelist(text) == hosts


@pytest.mark.parametrize(
    "text", ["", "n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[]", "a,,b", "n[[1]]"]
)
def test_malformed_nodelists_are_refused(text: str) -> None:
    with pytest.raises(NodeListError):
        env.expand_nodelist(text)


def test_expand_tasks_per_node() -> None:
    assert env.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert env.expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        env.expand_tasks_per_node("2x3")


def test_master_port_is_a_function_of_the_job_id() -> None:
    assert env.master_port("8") == env.PORT_BASE + 8
    assert env.master_port(123456) == env.PORT_BASE + 3456
    assert env.master_port("777_3") == env.master_port("777")  # an array task's combined id
    ports = {env.master_port(j) for j in range(1, 100000, 37)}
    assert min(ports) >= env.PORT_BASE and max(ports) < env.PORT_BASE + env.PORT_SPAN < 32768


def test_ranks_of_an_srun_task() -> None:
    assert env.from_slurm(TASK1) == Ranks(
        rank=1,
        world_size=2,
        local_rank=0,
        local_world_size=1,
        node_rank=1,
        master_addr="n1",
        master_port=env.PORT_BASE + 8,
    )


def test_several_tasks_per_node_and_uneven_nodes() -> None:
    task = {
        **TASK1,
        "SLURM_STEP_NODELIST": "gpu[07-09]",
        "SLURM_STEP_NUM_TASKS": "9",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2),1",
        "SLURM_NODEID": "2",
        "SLURM_PROCID": "8",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "31337",
    }
    r = env.from_slurm(task)
    assert r is not None
    assert (r.rank, r.world_size, r.node_rank, r.local_world_size) == (8, 9, 2, 1)
    assert (r.master_addr, r.master_port) == ("gpu07", env.PORT_BASE + 1337)
    r = env.from_slurm({**task, "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"})
    assert r is not None and (r.rank, r.local_rank, r.local_world_size) == (5, 1, 4)


def test_job_values_when_the_step_ones_are_missing() -> None:
    task = {k: v for k, v in TASK1.items() if not k.startswith("SLURM_STEP_")}
    task["SLURM_STEPID"] = "0"  # the older spelling of the step id
    r = env.from_slurm(task)
    assert r is not None and (r.world_size, r.master_addr, r.local_world_size) == (2, "n1", 1)


def test_the_batch_script_is_not_a_task() -> None:
    """The batch step has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step id."""
    batch = {k: v for k, v in TASK1.items() if "STEP" not in k} | {"SLURM_PROCID": "0"}
    assert not env.is_slurm_task(batch)
    assert env.from_slurm(batch) is None
    assert env.ranks(batch) is None
    assert env.setup(dict(batch)) is None


def test_torchrun_variables() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "1", "MASTER_ADDR": "host-a", "MASTER_PORT": "29400"}  # fmt: skip
    expected = Ranks(3, 4, 1, 2, 1, "host-a", 29400)
    assert env.from_torchrun(torchrun) == expected
    assert env.from_torchrun({"RANK": "0"}) is None
    # torchrun run inside a Slurm job: its own variables win over the job's.
    assert env.ranks({**TASK1, **torchrun}) == expected
    assert expected.as_env() == torchrun


def test_setup_writes_the_torchrun_variables() -> None:
    environ = dict(TASK1)
    ranks = env.setup(environ)
    assert ranks is not None
    assert {k: environ[k] for k in env.TORCHRUN_KEYS} == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": str(env.PORT_BASE + 8),
    }


def test_setup_leaves_torchrun_variables_alone() -> None:
    environ = {**TASK1, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "elsewhere"}
    assert env.setup(environ) is None
    assert environ["MASTER_ADDR"] == "elsewhere" and "LOCAL_WORLD_SIZE" not in environ


def test_setup_asks_scontrol_only_for_a_list_it_cannot_read(monkeypatch) -> None:
    asked: list[str] = []

    def hostnames(nodelist: str) -> list[str]:
        asked.append(nodelist)
        return ["odd-1", "odd-2"]

    monkeypatch.setattr(env, "scontrol_hostnames", hostnames)
    assert env.setup(dict(TASK1)) is not None and asked == []
    environ = {**TASK1, "SLURM_STEP_NODELIST": "odd-[1-2]{ib}]"}
    assert env.setup(environ) is not None
    assert asked == ["odd-[1-2]{ib}]"] and environ["MASTER_ADDR"] == "odd-1"

"""`toolkit.launch` and slurm/*.sh on the real two-node Slurm cluster (no mocks): one process
group across n1 and n2, the plain sbatch scripts, USR2 -> checkpoint -> requeue -> exact resume,
chained stages and --after, a dead task failing its job at once, ZeRO-2 across nodes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cluster.jobs import launch, launched, sacct, sbatch, wait_done
from tests.helpers import DEBUG_RECIPE, ROOT, cli, logged_steps, make_shards, tiny
from toolkit.data.format import read_manifest
from toolkit.runs.hold import held

pytestmark = pytest.mark.cluster

# Seconds-long runs: the cluster's 2 nodes share this machine's cores with everything else.
SMALL = ["train.max_steps=6", "train.checkpoint_every=2", "cluster.gpus_per_node=0",
         "cluster.partition=debug", "cluster.time=00:10:00", "cluster.cpus_per_task=1"]  # fmt: skip
# Slow enough to be signalled mid-run (a few hundred steps of ~10 ms).
LONG = ["train.max_steps=400", "train.checkpoint_every=100", "cluster.gpus_per_node=0",
        "cluster.partition=debug", "cluster.time=00:10:00", "cluster.cpus_per_task=1"]  # fmt: skip
SCRIPT_SIZE = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
ONE_NODE = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm-data")  # under /tmp: the nodes share this file system
    return make_shards(root, 40, val_fraction=0.2, shard_size=8)


def wait_step(run_dir: Path, step: int, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if logged_steps(run_dir) and logged_steps(run_dir)[-1] >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"{run_dir}: step {step} not reached after {timeout} s")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def complete_final_checkpoint(run_dir: Path, step: int) -> Path:
    name = f"step-{step:08d}"
    assert (run_dir / "checkpoints/latest").read_text().strip() == name
    ckpt = run_dir / "checkpoints" / name
    assert json.loads((ckpt / "COMPLETE").read_text())["step"] == step
    assert (run_dir / "model.safetensors").is_file()
    return ckpt


def task_pid(job: str, rank: int, needle: str) -> int:
    """The training process of one task (the nodes are namespaces of this machine)."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if (
            f"SLURM_JOB_ID={job}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
            and "python" in cmdline
            and needle in cmdline
        ):
            return int(proc.name)
    pytest.fail(f"no process of job {job} rank {rank} running {needle}")


def submit(how: str, cluster, cwd: Path, shards: Path, run_dir: Path, *extra: str) -> str:
    """A 2-node job through `toolkit.launch` or through slurm/pretrain.sh."""
    overrides = [*tiny(shards, run_dir, task="mae"), *extra]
    if how == "launch":
        return launched(launch(cluster, cwd, str(DEBUG_RECIPE), *overrides, "--nodes", "2"))[0]
    script = str(ROOT / "slurm/pretrain.sh")
    return sbatch(cluster, cwd, *SCRIPT_SIZE, script, str(DEBUG_RECIPE), *overrides)


# --- the tests -----------------------------------------------------------------------------------


def test_launch_two_nodes_form_one_group(slurm_cluster, shards, tmp_path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*tiny(shards, run_dir, task="mae"), *SMALL]
    proc = launch(slurm_cluster, tmp_path, str(DEBUG_RECIPE), *overrides, "--nodes", "2",
                  "--wait", timeout=180)  # fmt: skip
    (job,) = launched(proc)
    assert f"run dir: {run_dir}\n" in proc.stdout
    assert f"logs:    {run_dir}/slurm/{job}_0_log.err" in proc.stdout
    assert f"tensorboard --logdir {run_dir}/tb\n" in proc.stdout
    assert f"job {job}: debug finished" in proc.stdout
    assert wait_done(job) == ("COMPLETED", "0:0")
    logs = [(run_dir / "slurm" / f"{job}_{t}_log.err").read_text() for t in (0, 1)]
    port = 20000 + int(job) % 10000
    assert "rank 0 of 2 on n1 (node 0, local rank 0 of 1, GPU - of all, 1 CPUs)" in logs[0]
    assert "rank 1 of 2 on n2 (node 1, local rank 0 of 1, GPU - of all, 1 CPUs)" in logs[1]
    assert all(f"master n1:{port}" in log for log in logs)
    assert all("world 2" in log for log in logs)  # the engine checks the group has 2 members
    ckpt = complete_final_checkpoint(run_dir, 6)
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_sbatch_finetune_script(slurm_cluster, shards, tmp_path) -> None:
    """`sbatch slurm/finetune.sh` from a fresh clone (no runs/ folder yet) runs, and its log
    lands in the submit directory; spaces in the recipe path and in an override: the script
    quotes everything."""
    clone = tmp_path / "clone"  # what a fresh clone holds of what sbatch needs: no runs/
    shutil.copytree(ROOT / "slurm", clone / "slurm", symlinks=True)  # as git checks them out
    recipes = clone / "my recipes"
    recipes.mkdir()
    shutil.copy(DEBUG_RECIPE, recipes / "debug run.yaml")
    shutil.copy(ROOT / "recipes/_base.yaml", recipes)
    run_dir = tmp_path / "run dir"
    job = sbatch(slurm_cluster, clone, *SCRIPT_SIZE, "slurm/finetune.sh",
                 "my recipes/debug run.yaml", *tiny(shards, run_dir), *SMALL)  # fmt: skip
    log = clone / f"slurm-finetune.sh-{job}.out"
    assert wait_done(job) == ("COMPLETED", "0:0"), log.read_text()
    text = log.read_text()
    assert "rank 0 of 2 on n1" in text and "rank 1 of 2 on n2" in text
    assert "debug: task sr, model srmae, " in text and "world 2" in text
    complete_final_checkpoint(run_dir, 6)
    val = read_manifest(shards).count("val")
    assert json.loads((run_dir / "eval.json").read_text())["count"] == val


def test_sbatch_scripts_are_one_script_whose_name_picks_the_recipe(
    slurm_cluster, shards, tmp_path
) -> None:
    """slurm/pretrain.sh and slurm/finetune.sh are links to slurm/train.sh. Given no RECIPE, each
    runs recipes/<its stage>.yaml of the submit directory, in a job named after it; --job-name
    renames the job, not its recipe; train.sh itself has no default recipe and says so."""
    script = ROOT / "slurm/train.sh"
    assert (
        (ROOT / "slurm/pretrain.sh").resolve() == (ROOT / "slurm/finetune.sh").resolve() == script
    )
    here = tmp_path / "here"  # the submit directory: its recipes/, not the checkout's
    (here / "recipes").mkdir(parents=True)
    for stage in ("pretrain", "finetune"):
        (here / "recipes" / f"{stage}.yaml").write_text(
            f"extends: {DEBUG_RECIPE}\nname: {stage}-here\n"
        )
    # (entry, job name, stage): the job names are the entries' unless --job-name says otherwise
    cases = [("pretrain.sh", "pretrain.sh", "pretrain"), ("finetune.sh", "finetune.sh", "finetune"),
             ("finetune.sh", "srmae-finetune", "finetune")]  # fmt: skip
    jobs = [
        sbatch(slurm_cluster, here, *ONE_NODE, *([f"--job-name={name}"] if name != entry else []),
               str(ROOT / "slurm" / entry), *tiny(shards, tmp_path / name, task="mae"), *SMALL)
        for entry, name, _ in cases
    ]  # fmt: skip
    bare = sbatch(slurm_cluster, here, *ONE_NODE, str(script), *tiny(shards, tmp_path / "bare"))
    for (_, name, stage), job in zip(cases, jobs, strict=True):
        log = here / f"slurm-{name}-{job}.out"
        assert wait_done(job, timeout=180) == ("COMPLETED", "0:0"), log.read_text()
        assert sacct(job, "JobName") == [[name]]
        text = log.read_text()
        assert f": recipes/{stage}.yaml data.shards=" in text  # the line the script writes
        assert f"{stage}-here: task mae, model mae, " in text  # what toolkit.train read
        complete_final_checkpoint(tmp_path / name, 6)
    state = wait_done(bare)
    log = (here / f"slurm-train.sh-{bare}.out").read_text()
    assert state == ("FAILED", "2:0"), log
    assert log == (
        "error: train.sh has no default recipe; name one: "
        "sbatch slurm/train.sh RECIPE [key=value ...]\n"
    )
    assert not (tmp_path / "bare").exists()


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LONG run straight through on 2 local processes (torchrun, gloo): the reference."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    overrides = [*tiny(shards, run_dir, task="mae"), *LONG]
    proc = cli("toolkit.launch", str(DEBUG_RECIPE), *overrides, "--local", "--procs", "2",
               python=slurm_cluster.python, timeout=300, OMP_NUM_THREADS="1")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("how", ["launch", "sbatch"])
def test_usr2_checkpoints_requeues_and_resumes_exactly(
    slurm_cluster, shards, tmp_path, uninterrupted, how
) -> None:
    run_dir = tmp_path / "run"
    job = submit(how, slurm_cluster, tmp_path, shards, run_dir, *LONG)
    wait_step(run_dir, 20)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    assert wait_done(job, timeout=150) == ("COMPLETED", "0:0")
    runs = [row[0].split()[0] for row in sacct(job, "State")]
    assert runs[0] == "REQUEUED" and runs[-1] == "COMPLETED", runs
    # The requeued job resumed from the checkpoint written at the signal, not from the start:
    # every step ran (and was logged) exactly once.
    if how == "launch":
        log = (run_dir / "slurm" / f"{job}_0_log.err").read_text()
    else:
        log = (tmp_path / f"slurm-pretrain.sh-{job}.out").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+/step-(\d{8})", log)]
    assert resumed and 20 <= resumed[0] < 400, log[-3000:]
    assert logged_steps(run_dir) == list(range(1, 401))
    complete_final_checkpoint(run_dir, 400)
    a, b = weights(uninterrupted), weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_usr2_during_start_up_requeues_at_once(slurm_cluster, shards, tmp_path) -> None:
    """Before the loop runs, submitit's own handler takes the signal: checkpoint() and requeue;
    with no checkpoint yet the requeued job starts over."""
    run_dir = tmp_path / "run"
    job = submit("launch", slurm_cluster, tmp_path, shards, run_dir, *SMALL)
    log = run_dir / "slurm" / f"{job}_0_log.err"
    end = time.monotonic() + 60
    while "Slurm task: rank 0" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < end, "the job did not start"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    assert wait_done(job, timeout=150) == ("COMPLETED", "0:0")
    runs = [row[0].split()[0] for row in sacct(job, "State")]
    assert runs[0] == "REQUEUED" and runs[-1] == "COMPLETED", runs
    text = log.read_text()
    assert "Calling checkpoint method" in text and "stopped by a signal at step" not in text
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    complete_final_checkpoint(run_dir, 6)


@pytest.mark.parametrize("how", ["launch", "sbatch"])
def test_scancel_cancels_for_good(slurm_cluster, shards, tmp_path, how) -> None:
    """The loop also stops and checkpoints on scancel's SIGTERM; the job must not requeue."""
    run_dir = tmp_path / "run"
    job = submit(how, slurm_cluster, tmp_path, shards, run_dir, *LONG, "train.max_steps=100000")
    wait_step(run_dir, 5)
    subprocess.run(["scancel", job], check=True, timeout=30)
    time.sleep(20)  # a requeued job is back within ~12 s here
    assert [row[0].split()[0] for row in sacct(job, "State")] == ["CANCELLED"]
    squeue = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
    assert squeue.stdout.strip() == ""


def test_chain_and_after_wait_for_their_predecessors(slurm_cluster, shards, tmp_path) -> None:
    """Two recipes on one command line: pretrain, then a finetune whose init.from is the
    pretrain's run directory; the first waits for --after, the second for the first."""
    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    (tmp_path / "pre.yaml").write_text(
        f"extends: {DEBUG_RECIPE}\nname: pre\nrun: {{dir: {pre_dir}}}\n"
    )
    (tmp_path / "ft.yaml").write_text(
        f"extends: {DEBUG_RECIPE}\nname: ft\ntask: sr\nmodel: {{arch: srmae}}\n"
        "train: {loss: l1}\n"
        f"init: {{from: {pre_dir}}}\nrun: {{dir: {ft_dir}}}\n"
    )
    sleeper = sbatch(slurm_cluster, tmp_path, "-o", "sleeper.out", "--wrap", "sleep 8")
    common = [f"data.shards={shards}", "data.batch_size=4", "train.eval_every=0", *SMALL]
    proc = launch(slurm_cluster, tmp_path, "pre.yaml", "ft.yaml", *common, "--nodes", "1",
                  "--after", sleeper)  # fmt: skip
    pre, ft = launched(proc)
    assert f"job {ft}: ft, 1 node(s) x 1 process(es) = 1, after job {pre} succeeds" in proc.stdout
    assert f"tensorboard --logdir {tmp_path}\n" in proc.stdout  # the chain's common parent
    squeue = subprocess.run(["squeue", "-h", "-j", f"{pre},{ft}", "-o", "%i %T %r"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert sorted(squeue.split("\n")[:2]) == [
        f"{pre} PENDING Dependency",
        f"{ft} PENDING Dependency",
    ]
    assert wait_done(ft, timeout=150) == ("COMPLETED", "0:0")
    assert wait_done(sleeper) == wait_done(pre) == ("COMPLETED", "0:0")
    times = {j: sacct(j, "Start,End")[-1] for j in (sleeper, pre, ft)}
    assert times[pre][0] >= times[sleeper][1] and times[ft][0] >= times[pre][1]  # ISO times
    log = (ft_dir / "slurm" / f"{ft}_0_log.err").read_text()
    assert f"init.from {pre_dir}: " in log
    complete_final_checkpoint(ft_dir, 6)


@pytest.mark.parametrize("how", ["launch", "sbatch"])
def test_a_killed_task_fails_the_job_within_a_minute(slurm_cluster, shards, tmp_path, how) -> None:
    run_dir = tmp_path / "run"
    job = submit(how, slurm_cluster, tmp_path, shards, run_dir, *LONG, "train.max_steps=100000")
    wait_step(run_dir, 5)
    pid = task_pid(job, 1, "submitit" if how == "launch" else "toolkit.train")
    killed = time.monotonic()
    os.kill(pid, 9)
    state, _ = wait_done(job, timeout=60)
    assert state == "FAILED"
    assert time.monotonic() - killed < 60
    assert logged_steps(run_dir)[-1] < 100000


def test_zero2_on_two_nodes_trains_and_resumes(slurm_cluster, shards, tmp_path) -> None:
    """A 3-step ZeRO-2 job, then a 6-step one after it in the same run directory: the second
    resumes from the first's sharded checkpoint (each rank wrote its own optimiser shard)."""
    run_dir = tmp_path / "run"
    overrides = [*tiny(shards, run_dir, task="mae"), *SMALL, "deepspeed.zero_stage=2"]
    args = [str(DEBUG_RECIPE), *overrides, "--nodes", "2"]
    (first,) = launched(launch(slurm_cluster, tmp_path, *args, "train.max_steps=3"))
    proc = launch(slurm_cluster, tmp_path, *args, "--after", first, "--wait", timeout=240)
    (second,) = launched(proc)
    assert wait_done(first) == wait_done(second) == ("COMPLETED", "0:0")
    shards_of = {p.name for p in (run_dir / "checkpoints/step-00000003/pytorch_model").iterdir()}
    assert {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    } <= shards_of
    log = (run_dir / "slurm" / f"{second}_0_log.err").read_text()
    assert re.search(r"resumed from \S+/step-00000003 \(step 3", log), log[-3000:]
    assert "world 2" in log
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    complete_final_checkpoint(run_dir, 6)


def test_a_job_sbatch_refuses_is_one_user_error(slurm_cluster, shards, tmp_path) -> None:
    overrides = tiny(shards, tmp_path / "run", task="mae")
    proc = launch(slurm_cluster, tmp_path, str(DEBUG_RECIPE), *overrides, "--partition", "nope")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: sbatch refused job debug: sbatch: error: Batch job submission failed: "
        "Invalid partition name specified"
    ]


def test_a_held_run_directory_refuses_launch_and_sbatch(slurm_cluster, shards, tmp_path) -> None:
    """One writer per run directory on the cluster: `launch` refuses before it submits, and a
    plain sbatch job stops at its start with the holder named in its log, writing nothing."""
    run_dir = tmp_path / "run"
    overrides = [*tiny(shards, run_dir, task="mae"), *SMALL]
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "slurm", clone / "slurm", symlinks=True)
    with held(run_dir, "training by hand"):
        proc = launch(slurm_cluster, tmp_path, str(DEBUG_RECIPE), *overrides)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert f"in use by training by hand (pid {os.getpid()} on " in proc.stderr
        assert not (run_dir / "slurm").exists()  # nothing submitted
        job = sbatch(slurm_cluster, clone, *SCRIPT_SIZE, "slurm/finetune.sh", str(DEBUG_RECIPE),
                     *overrides)  # fmt: skip
        state, _ = wait_done(job)
        log = (clone / f"slurm-finetune.sh-{job}.out").read_text()
        assert state == "FAILED", log
        assert f"in use by training by hand (pid {os.getpid()} on " in log
    # The job wrote nothing there: the folder made for the hold went with it, empty.
    assert not run_dir.exists()


def test_a_sweep_is_one_array_whose_preempted_task_requeues_alone(
    slurm_cluster, shards, tmp_path
) -> None:
    """`--sweep train.seed=0,1,2` on Slurm: one job array of 3 one-node variants, at most 2 at a
    time. USR2 to task 1 checkpoints and requeues that task alone; all three end with the weights
    of the same variants trained straight through here."""
    base, ref = tmp_path / "sweep", tmp_path / "reference"
    sweep = ["--sweep", "train.seed=0,1,2"]
    local = cli("toolkit.launch", str(DEBUG_RECIPE), *tiny(shards, ref, task="mae"), *LONG,
                *sweep, "--local", python=slurm_cluster.python, OMP_NUM_THREADS="1")  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    proc = launch(slurm_cluster, tmp_path, str(DEBUG_RECIPE), *tiny(shards, base, task="mae"),
                  *LONG, *sweep, "--nodes", "1", "--array-limit", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = re.search(r"^array job (\d+): 3 variant\(s\), at most 2", proc.stdout, re.M).group(1)
    assert "#SBATCH --array=0-2%2" in next((base / "slurm").glob("*.sh")).read_text()
    wait_step(base / "train.seed=1", 20)
    subprocess.run(["scancel", "--signal=USR2", f"{array}_1"], check=True, timeout=30)
    for i in range(3):
        assert wait_done(f"{array}_{i}", timeout=240) == ("COMPLETED", "0:0"), i
    states = {i: [row[0].split()[0] for row in sacct(f"{array}_{i}", "State")] for i in range(3)}
    assert states[1][0] == "REQUEUED" and states[1][-1] == "COMPLETED", states
    assert states[0] == states[2] == ["COMPLETED"], states
    for seed in range(3):
        name = f"train.seed={seed}"
        assert logged_steps(base / name) == list(range(1, 401))
        complete_final_checkpoint(base / name, 400)
        a, b = weights(ref / name), weights(base / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), seed
    assert json.loads((base / "sweep.json").read_text())["array"] == array

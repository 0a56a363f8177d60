"""Slurm job specs without a cluster: Slurm's time syntax, flags over the recipe, submitit's
parameters for a chain, the sbatch text, and the refusal when no Slurm answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.cluster import launching, slurm
from toolkit.core.errors import UserError
from toolkit.runs import recipe

ROOT = Path(__file__).resolve().parents[3]
NO_FLAGS = dict.fromkeys(launching.SLURM_FLAGS)


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("30", 30),
        ("90:30", 91),
        ("02:00:00", 120),
        ("1-00", 1440),
        ("1-02:30", 1590),
        ("0-00:00:01", 1),
    ],
)
def test_time_minutes_reads_every_slurm_form_rounding_up(text: str, minutes: int) -> None:
    assert slurm.time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["soon", "1:2:3:4", "0", "00:00:00"])
def test_time_minutes_refuses_what_slurm_would(text: str) -> None:
    with pytest.raises(UserError, match="--time"):
        slurm.time_minutes(text, "--time")


def test_flags_override_the_recipe_cluster_section() -> None:
    r = recipe.load(ROOT / "recipes/pretrain.yaml")
    spec = slurm.job_spec(r, {**NO_FLAGS, "nodes": 4, "partition": "big", "time": "30"})
    assert (spec.nodes, spec.gpus_per_node, spec.partition, spec.minutes) == (4, 8, "big", 30)
    assert (spec.cpus_per_task, spec.requeue, spec.tasks_per_node) == (8, True, 8)
    cpu = slurm.job_spec(r, {**NO_FLAGS, "gpus_per_node": 0})
    assert cpu.tasks_per_node == 1  # CPU nodes: one task each


def test_parameters_of_a_chained_cpu_stage() -> None:
    r = recipe.load(ROOT / "recipes/debug.yaml", ["cluster.requeue=false"])
    params = slurm.parameters(slurm.job_spec(r, NO_FLAGS), "afterok:41")
    assert params["dependency"] == "afterok:41"
    assert params["additional_parameters"] == {"no-requeue": True, "kill-on-invalid-dep": "yes"}
    assert "gpus_per_node" not in params and "partition" not in params
    # srun is told the CPUs per task: Slurm 22.05-23.02 srun would give each task one
    assert params["srun_args"] == ["--kill-on-bad-exit=1", "--cpus-per-task=2"]
    assert params["signal_delay_s"] == 120 and params["wckey"] is None
    text = slurm.sbatch_script(Path("/runs/x/slurm"), params, python="py")
    assert "#SBATCH --dependency=afterok:41" in text and "#SBATCH --no-requeue" in text
    assert "py -u -m submitit.core._submit /runs/x/slurm" in text
    assert "--wckey" not in text  # submitit's default wckey is refused where wckeys are enforced
    assert "--kill-on-bad-exit=1 --cpus-per-task=2 " in text


def test_gres_mem_and_wckey_reach_the_job() -> None:
    r = recipe.load(ROOT / "recipes/pretrain.yaml", ["cluster.gres=gpu:a100:4", "cluster.mem=64G"])
    spec = slurm.job_spec(r, {**NO_FLAGS, "wckey": "proj"})
    assert (spec.gpus_per_node, spec.tasks_per_node) == (4, 4)  # the count of the gres
    params = slurm.parameters(spec)
    assert (params["gres"], params["mem"], params["wckey"]) == ("gpu:a100:4", "64G", "proj")
    assert "gpus_per_node" not in params
    # --gpus-per-node on the command line wins over the recipe's gres
    flagged = slurm.job_spec(r, {**NO_FLAGS, "gpus_per_node": 2})
    assert (flagged.gres, flagged.gpus_per_node) == (None, 2)
    with pytest.raises(UserError, match="--gres: expected gpu:N or gpu:TYPE:N"):
        slurm.job_spec(r, {**NO_FLAGS, "gres": "gpu:many"})


def test_no_slurm_on_path_is_one_line_suggesting_local(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="sbatch is not on PATH; use --local"):
        slurm.require_slurm()


def test_a_requeued_task_is_the_same_task_again() -> None:
    task = slurm.TrainTask(["recipes/debug.yaml", "train.max_steps=3"], "/work", requeue=True)
    again = task.checkpoint()
    assert again.function is task and again.args == ()

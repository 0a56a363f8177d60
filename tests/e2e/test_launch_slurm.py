"""The launch CLI's Slurm side without a cluster: the sbatch script of a dry run, chains, and
the one-line refusal when no Slurm is reachable (in-process, and once as a real subprocess)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import cli, run_main
from toolkit import launch

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "recipes/debug.yaml")
PRETRAIN = str(ROOT / "recipes/pretrain.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_main(capsys, launch.main, *argv)


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_prints_the_sbatch_script(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, DEBUG, "--nodes", "2", "--dry-run")
    assert code == 0
    script = out[out.index("# sbatch script") :]
    lines = sbatch_lines(script)
    expected = ["--nodes=2", "--ntasks-per-node=1", "--signal=USR2@120", "--requeue", "--time=10",
                "--open-mode=append", "--job-name=debug", "--cpus-per-task=2"]  # fmt: skip
    assert [f"#SBATCH {x}" for x in expected if f"#SBATCH {x}" not in lines] == []
    assert not [x for x in lines if "gpus" in x or "partition" in x]  # CPU nodes, site default
    log = tmp_path / "runs/debug/slurm/%j_0_log.out"
    assert f"#SBATCH --output={log}" in lines
    srun = [x for x in script.splitlines() if x.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0]
    assert f"{sys.executable} -u -m submitit.core._submit {log.parent}" in srun[0]
    assert f"export PYTHONPATH={ROOT}" in script
    assert not (tmp_path / "runs").exists()  # a dry run starts and writes nothing


def test_dry_run_json_fills_sbatch_and_flags_override_the_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [PRETRAIN, "--dry-run", "--json", "--nodes", "2", "--partition", "big gpu",
            "--time", "1-00:30", "--account", "proj", "--qos", "high", "--constraint", "a100",
            "--after", "41"]  # fmt: skip
    code, out, _ = run(capsys, *argv)
    assert code == 0
    doc = json.loads(out)
    assert doc["world"] == {"nodes": 2, "gpus_per_node": 8, "world_size": 16}
    lines = sbatch_lines(doc["sbatch"])
    expected = ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition='big gpu'",
                "--time=1470", "--account=proj", "--qos=high", "--constraint=a100",
                "--dependency=afterok:41", "--kill-on-invalid-dep=yes", "--signal=USR2@120",
                "--requeue"]  # fmt: skip
    assert [f"#SBATCH {x}" for x in expected if f"#SBATCH {x}" not in lines] == []
    # Without flags the recipe's cluster section decides.
    _, out, _ = run(capsys, PRETRAIN, "cluster.requeue=false", "--dry-run", "--json")
    lines = sbatch_lines(json.loads(out)["sbatch"])
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --time=1440" in lines
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --requeue" not in lines
    # A local run has no sbatch script.
    _, out, _ = run(capsys, PRETRAIN, "--local", "--dry-run", "--json")
    assert json.loads(out)["sbatch"] is None


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_chain_dry_run(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pre = write(tmp_path / "pre.yaml", f"extends: {DEBUG}\nname: pre\n")
    ft = write(
        tmp_path / "ft.yaml",
        f"extends: {DEBUG}\nname: ft\ntask: sr\nmodel: {{arch: srmae}}\ninit: {{from: runs/pre}}\n",
    )
    elsewhere = write(tmp_path / "other.yaml", f"extends: {ft}\nname: other\ninit: {{from: x}}\n")
    code, out, _ = run(capsys, pre, ft, elsewhere, "train.max_steps=5", "--dry-run", "--json")
    assert code == 0
    docs = json.loads(out)
    assert [d["recipe"]["name"] for d in docs] == ["pre", "ft", "other"]
    assert all(d["recipe"]["train"]["max_steps"] == 5 for d in docs)  # overrides: every stage
    assert "--dependency" not in docs[0]["sbatch"]
    assert "#SBATCH --dependency='afterok:<job id of stage 1>'" in docs[1]["sbatch"]
    # ft's init.from is written by the stage before it: not a warning; other's is nobody's.
    assert not [w for w in docs[1]["warnings"] if w.startswith("init.from")]
    assert [w for w in docs[2]["warnings"] if w.startswith("init.from: x does not exist")]
    code, out, _ = run(capsys, pre, ft, "--dry-run")
    assert code == 0 and "# stage 1 of 2" in out and "# stage 2 of 2" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([DEBUG, "--time", "soon", "--dry-run"], "--time: expected a Slurm time"),
        ([DEBUG, "cluster.time=0", "--dry-run"], "cluster.time of debug: the time limit must be"),
        ([DEBUG, "--after", "12;rm", "--dry-run"], "--after: expected a Slurm job id"),
        ([DEBUG, "--local", "--partition", "p"], "--partition: for Slurm launches, not --local"),
        ([DEBUG, DEBUG, "--local"], "--local runs one recipe"),
        ([DEBUG, DEBUG, "--dry-run"], "each stage of a chain needs its own"),
        ([DEBUG, "--wait", "--dry-run"], "--wait goes with a real launch"),
        (["train.epochs=1", "--dry-run"], "no recipe given"),
    ],
)
def test_user_errors_are_one_line_with_status_2(capsys, argv, needle) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1


def fake_tools(bin_dir: Path, scontrol: str) -> None:
    """sbatch, sacct and an scontrol whose `ping` prints what a site without a controller says."""
    bin_dir.mkdir()
    for name, body in (("sbatch", "exit 1"), ("sacct", "exit 1"), ("scontrol", scontrol)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize("case", ["no sbatch", "SLURM_CONF nowhere", "controller down"])
def test_no_slurm_reachable_is_one_line_with_status_2(capsys, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    down = (
        "echo 'Slurmctld(primary) at ctl is DOWN'; "
        "echo 'scontrol: error: Unable to contact slurm controller (connect failure)' >&2; exit 1"
    )
    if case == "no sbatch":
        monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
        expected = "no Slurm reachable: sbatch is not on PATH; use --local"
    elif case == "SLURM_CONF nowhere":
        fake_tools(tmp_path / "bin", down)
        monkeypatch.setenv("PATH", str(tmp_path / "bin"))
        monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere.conf"))
        expected = f"SLURM_CONF={tmp_path / 'nowhere.conf'} does not exist; use --local"
    else:
        fake_tools(tmp_path / "bin", down)
        monkeypatch.setenv("PATH", str(tmp_path / "bin"))
        monkeypatch.delenv("SLURM_CONF", raising=False)
        expected = "scontrol ping: scontrol: error: Unable to contact slurm controller"
    code, out, err = run(capsys, DEBUG, "--nodes", "2")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_no_slurm_as_a_subprocess(tmp_path) -> None:
    proc = cli("toolkit.launch", DEBUG, cwd=tmp_path, PATH=str(tmp_path / "nothing"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: no Slurm reachable: sbatch is not on PATH; use --local to run on this machine"
    ]

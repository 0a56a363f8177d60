"""Slurm jobs through submitit: the job each stage asks for, its sbatch text, submission with
afterok chaining, and the per-task callable that trains and requeues after a warning signal."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.errors import UserError
from toolkit.runs import recipe

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # where toolkit is imported from: the job must too
# Slurm sends the warning signal this long before the time limit: time for the step in progress,
# a checkpoint and the requeue call.
SIGNAL_DELAY_S = 120
# submitit stops requeueing a job after this many time-outs (preemptions do not count). Every
# requeue resumes from a checkpoint, so a long run may need many; the bound stops a job whose time
# limit is too short to reach a checkpoint from requeueing forever.
MAX_TIMEOUTS = 20
# submitit's srun runs every task with this: one task that dies ends the step at once, instead
# of the others waiting in a collective until the time limit. --cpus-per-task is added per job:
# srun of Slurm 22.05-23.02 does not take it from the job, and its tasks would get one CPU each.
SRUN_ARGS = ("--kill-on-bad-exit=1",)


@dataclass(frozen=True)
class JobSpec:
    """What one stage asks Slurm for: the recipe's `cluster` section, command-line flags winning."""

    name: str
    nodes: int
    gpus_per_node: int  # 0: CPU nodes, one task each
    gres: str | None  # asked for instead of --gpus-per-node (its count is gpus_per_node)
    mem: str | None
    wckey: str | None
    cpus_per_task: int
    time: str  # Slurm syntax, as given
    minutes: int
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    requeue: bool

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


def time_minutes(text: str, where: str = "cluster.time") -> int:
    """Slurm's time syntax -> whole minutes (rounded up): MM, MM:SS, HH:MM:SS, D-HH,
    D-HH:MM, D-HH:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise UserError(
            f"{where}: expected a Slurm time (MM, HH:MM:SS or D-HH:MM:SS), got {text!r}"
        )
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        seconds = int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif len(parts) == 3:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif len(parts) == 2:  # MM:SS
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 60
    if seconds <= 0:
        raise UserError(f"{where}: the time limit must be positive, got {text!r}")
    return -(-seconds // 60)


def job_spec(r: recipe.Recipe, flags: dict[str, Any]) -> JobSpec:
    """The stage's job: `flags` (nodes, gpus_per_node, partition, time, account, qos,
    constraint; None: not given) override the recipe's `cluster` section."""
    c = r.cluster

    def pick(key: str) -> Any:
        value = flags.get(key)
        return getattr(c, key) if value is None else value

    time = pick("time")
    where = "--time" if flags.get("time") is not None else f"cluster.time of {r.name}"
    gres, gpus = pick("gres"), pick("gpus_per_node")
    if flags.get("gpus_per_node") is not None and flags.get("gres") is None:
        gres = None  # --gpus-per-node on the command line wins over the recipe's gres
    if gres is not None:
        if not re.fullmatch(r"gpu(:[\w.-]+)?:\d+", gres):
            raise UserError(f"--gres: expected gpu:N or gpu:TYPE:N, got {gres!r}")
        gpus = int(gres.rsplit(":", 1)[1])
    return JobSpec(
        name=r.name,
        nodes=pick("nodes"),
        gpus_per_node=gpus,
        gres=gres,
        mem=pick("mem"),
        wckey=pick("wckey"),
        cpus_per_task=c.cpus_per_task,
        time=str(time),
        minutes=time_minutes(time, where),
        partition=pick("partition"),
        account=pick("account"),
        qos=pick("qos"),
        constraint=pick("constraint"),
        requeue=c.requeue,
    )


def job_folder(r: recipe.Recipe) -> Path:
    """Where submitit keeps a stage's script, pickles and per-task logs: <run dir>/slurm."""
    return (r.run_dir / "slurm").absolute()


def parameters(spec: JobSpec, dependency: str | None = None) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for a job."""
    params: dict[str, Any] = {
        "job_name": spec.name,
        "nodes": spec.nodes,
        "ntasks_per_node": spec.tasks_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "time": spec.minutes,  # submitit also times the job with it: whole minutes
        "signal_delay_s": SIGNAL_DELAY_S,
        "srun_args": [*SRUN_ARGS, f"--cpus-per-task={spec.cpus_per_task}"],
        "wckey": spec.wckey,  # submitit sets --wckey=submitit unless told None
        # The job imports toolkit from this checkout, whatever the nodes' environment has.
        "setup": [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        "additional_parameters": {"requeue" if spec.requeue else "no-requeue": True},
    }
    if spec.gres:
        params["gres"] = spec.gres
    elif spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(spec, key):
            params[key] = getattr(spec, key)
    if dependency:
        params["dependency"] = dependency
        # A stage whose predecessor failed can never start: end it instead of leaving it pending.
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    return params


def sbatch_script(
    folder: Path,
    params: dict[str, Any],
    python: str | None = None,
    array: tuple[int, int] | None = None,
) -> str:
    """The sbatch file submitit writes for these parameters (what a dry run shows); `array`:
    (tasks, at most this many at a time) for a job array."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = shlex.quote(sys.executable) if python is None else python
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    if array is not None:
        params = {**params, "map_count": array[0], "array_parallelism": array[1]}
    return _make_sbatch_string(command=command, folder=folder, **params)


def require_slurm() -> None:
    """Raise a one-line user error unless a Slurm controller answers from here."""
    advice = "use --local to run on this machine"
    missing = [t for t in ("sbatch", "scontrol", "sacct") if shutil.which(t) is None]
    if missing:
        raise UserError(f"no Slurm reachable: {missing[0]} is not on PATH; {advice}")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # Slurm's tools would retry it for a minute
        raise UserError(f"no Slurm reachable: SLURM_CONF={conf} does not exist; {advice}")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"no Slurm reachable: `scontrol ping` got no answer in 20 s; {advice}"
        ) from None
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        lines = (ping.stdout + ping.stderr).strip().splitlines() or ["no output"]
        raise UserError(f"no Slurm reachable: scontrol ping: {lines[-1].strip()}; {advice}")


def job_state(job_id: str) -> str:
    """The job's state as the controller has it now (RUNNING, COMPLETING, ...)."""
    proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    found = re.search(r"JobState=(\S+)", proc.stdout)
    return found.group(1) if found else "UNKNOWN"


@dataclass(frozen=True)
class Submitted:
    job_id: str
    job: Any  # submitit.slurm.slurm.SlurmJob


def submit(spec: JobSpec, folder: Path, argv: list[str], after: str | None) -> Submitted:
    """Submit one stage: every task runs `toolkit.train argv` in this directory."""
    return submit_array(spec, folder, [argv], after)[0]


def submit_array(
    spec: JobSpec, folder: Path, argvs: list[list[str]], after: str | None, limit: int | None = None
) -> list[Submitted]:
    """Submit one job, or with several `argvs` one job array (a sweep): array task i runs
    `toolkit.train argvs[i]` on `spec`'s nodes, at most `limit` at a time, each requeued and
    resumed on its own after a warning signal. Job ids: "A" for one job, "A_i" in an array."""
    import submitit
    from submitit.core.utils import FailedJobError

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(**parameters(spec, f"afterok:{after}" if after else None))
    if limit is not None:
        executor.update_parameters(array_parallelism=limit)
    cwd = str(Path.cwd())
    try:
        # submitit also prints sbatch's complaint on stderr; the user error below carries it.
        with contextlib.redirect_stderr(io.StringIO()):
            if len(argvs) == 1:
                jobs = [executor.submit(TrainTask(argvs[0], cwd, spec.requeue))]
            else:
                with executor.batch():
                    jobs = [executor.submit(TrainTask(a, cwd, spec.requeue)) for a in argvs]
    except (FailedJobError, subprocess.CalledProcessError, OSError) as err:
        lines = [x for x in str(err).splitlines() if "error" in x.lower()] or str(err).splitlines()
        raise UserError(f"sbatch refused job {spec.name}: {lines[-1].strip()}") from None
    return [Submitted(job_id=str(job.job_id), job=job) for job in jobs]


class TrainTask:
    """What every task of a submitted job runs: `toolkit.train`'s per-process entry.

    Warning signal (USR2): submitit installs a handler that calls `checkpoint()` on rank 0 and
    requeues the job. While the training loop runs, its own handler replaces that one: it
    finishes the step, writes a checkpoint on every rank and returns (train's status 3). Then
    rank 0 calls submitit's handler itself, so submitit counts the time-out, rewrites the job's
    pickle and runs `scontrol requeue`; the other ranks leave without a result and the requeue
    ends the job. A signal outside the loop (start-up, export) goes to submitit's handler
    directly. Either way the requeued job resumes from the newest complete checkpoint in the run
    directory (`checkpoint()` has nothing to save: the loop did it)."""

    def __init__(self, argv: list[str], cwd: str, requeue: bool = True) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.requeue = requeue

    def __call__(self) -> dict[str, Any]:
        from submitit import JobEnvironment

        from toolkit.cluster import worker

        os.chdir(self.cwd)
        usr_sig = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
        submitit_handler = signal.getsignal(usr_sig)  # taken now: the loop swaps it while it runs
        status = worker.main(self.argv)
        if status == worker.STOPPED:
            self._after_stop(submitit_handler, usr_sig)
        if status != 0:
            raise RuntimeError(f"toolkit.train exited with status {status}")
        return {"rank": int(os.environ.get("RANK", "0")), "host": socket.gethostname()}

    def _after_stop(self, handler: Any, usr_sig: int) -> None:
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import UncompletedJobError

        if int(os.environ.get("SLURM_PROCID", "0")) != 0:
            # Rank 0 requeues the job, which ends this task too. No result pickle: submitit must
            # not take this task as done.
            sys.exit(0)
        job_id = os.environ["SLURM_JOB_ID"]
        # The loop stops on SIGTERM too, which is also what `scancel` and the end of the time
        # limit send: requeueing then would bring back a job its user cancelled. Only a job that
        # is still running (the warning signal, a preemption notice) is requeued.
        state = job_state(job_id)
        if not self.requeue or state != "RUNNING":
            why = "cluster.requeue is false" if not self.requeue else f"the job is {state}"
            raise UncompletedJobError(
                f"stopped by a signal after a checkpoint and not requeued ({why}): launch the "
                "same command again to resume"
            )
        logger.info("stopped by a signal after a checkpoint: requeueing job %s", job_id)
        if isinstance(getattr(handler, "__self__", None), SignalHandler):
            handler(usr_sig, None)  # checkpoint(), `scontrol requeue`, exit; or raises
        subprocess.check_call(["scontrol", "requeue", job_id], timeout=60)
        sys.exit(0)

    def checkpoint(self) -> Any:
        """Called by submitit on rank 0 before it requeues: the same task again, which resumes
        from the run directory's newest complete checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)

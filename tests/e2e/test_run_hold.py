"""One writer per run directory, through the real commands: a second launch is refused while the
first trains on untouched, and no rank outlives a SIGKILLed `launch --local --procs 2`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import DEBUG_RECIPE, logged_steps, make_shards, run_cli, tiny
from toolkit.runs.hold import HOLD, holder_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("hold"), 24, val_fraction=0.25, shard_size=8)


def wait_for(condition, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def ranks_of(run: Path) -> list[int]:
    """Pids of the training processes writing `run` (found by their command lines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        rank = b"toolkit.train" in cmd and b"torch.distributed.run" not in cmd  # not torchrun
        if state != "Z" and rank and f"run.dir={run}".encode() in cmd:
            found.append(int(entry.name))
    return found


def test_a_second_launch_is_refused_and_the_first_trains_on(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [str(DEBUG_RECIPE), "--local", *tiny(shards, run, "train.max_steps=1500", "name=a")]
    first = run_cli("toolkit.launch", *args)
    wait_for(lambda: len(logged_steps(run)) >= 2)
    second = run_cli("toolkit.launch", *args)
    out, _ = second.communicate(timeout=120)
    assert first.poll() is None, "the first run ended before the second was checked"
    assert second.returncode == 2, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error: run.dir: {run}: in use by training a (pid {first.pid} on ")
    assert "Traceback" not in out
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:]
    assert logged_steps(run) == list(range(1, 1501))  # every step logged once
    assert not (run / HOLD).exists()


@pytest.mark.parametrize("kill", ["launcher", "process group"])
def test_no_rank_outlives_a_sigkilled_local_launch(shards: Path, tmp_path: Path, kill: str) -> None:
    run = tmp_path / "run"
    launcher = run_cli("toolkit.launch", str(DEBUG_RECIPE), "--local", "--procs", "2",
                       *tiny(shards, run, "train.max_steps=100000"), stdout=subprocess.DEVNULL,
                       start_new_session=True, OMP_NUM_THREADS="1")  # fmt: skip
    try:
        wait_for(lambda: len(logged_steps(run)) >= 2)
        assert len(ranks_of(run)) == 2
        if kill == "launcher":
            launcher.kill()
        else:  # what a terminal's Ctrl-\ or a job's cleanup does; torchrun's workers are in
            os.killpg(launcher.pid, signal.SIGKILL)  # sessions of their own, outside the group
        launcher.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not ranks_of(run), timeout=15)
        sys.stderr.write(f"ranks gone {time.monotonic() - t0:.1f} s after the kill\n")
    finally:
        for pid in ranks_of(run):
            os.kill(pid, signal.SIGKILL)
    # A next launch is not blocked: the holder's pid is dead once the kernel has reaped it (a
    # killed rank's command line reads empty while it exits, so ranks_of misses it a moment).
    wait_for(lambda: holder_of(run) is None, timeout=15)

"""One writer per run directory: the hold file, its live and dead holders, takeover races."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit import hold
from toolkit.hold import HOLD, Held, acquire, holder_of


def plant(directory: Path, **fields: object) -> Path:
    """A hold file as another process would have written it."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": None, "job": None,
           "command": "training other", "token": "theirs", **fields}  # fmt: skip
    path = directory / HOLD
    path.write_text(json.dumps(doc))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    first = acquire(tmp_path / "run", "training a")
    try:
        with pytest.raises(Held) as err:
            acquire(tmp_path / "run", "training b")
        host = socket.gethostname()
        assert str(err.value).startswith(
            f"{tmp_path / 'run'}: in use by training a (pid {os.getpid()} on {host})"
        )
        assert holder_of(tmp_path / "run") == first.holder
    finally:
        first.release()
    assert not (tmp_path / "run" / HOLD).exists() and holder_of(tmp_path / "run") is None
    acquire(tmp_path / "run", "training b").release()  # free again


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path: Path, caplog) -> None:
    plant(tmp_path, pid=dead_pid())
    assert holder_of(tmp_path) is None
    mine = acquire(tmp_path, "training b")
    assert "training other (pid" in caplog.text and "taking it over" in caplog.text
    assert json.loads((tmp_path / HOLD).read_text())["token"] == mine.holder.token
    mine.release()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path: Path) -> None:
    # The pid runs (it is this process) but started at another time: another process.
    plant(tmp_path, pid=os.getpid(), started="1")
    acquire(tmp_path, "training b").release()
    plant(tmp_path, pid=os.getpid(), started=hold._start_time(os.getpid()))
    with pytest.raises(Held):
        acquire(tmp_path, "training b")


def test_another_hosts_holder_lives_while_it_refreshes(tmp_path: Path) -> None:
    path = plant(tmp_path, host="gpu-node-17", pid=12345, job="4242")
    with pytest.raises(Held, match=r"pid 12345 on gpu-node-17, Slurm job 4242"):
        acquire(tmp_path, "training b")
    old = time.time() - hold.STALE - 5  # no refresh for longer than STALE: its node is gone
    os.utime(path, (old, old))
    assert holder_of(tmp_path) is None
    acquire(tmp_path, "training b").release()


def test_a_requeued_job_takes_over_its_own_hold(tmp_path: Path, monkeypatch) -> None:
    plant(tmp_path, host="gpu-node-17", pid=12345, job="4242")  # fresh: alive to anyone else
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(Held):
        acquire(tmp_path, "training b")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    acquire(tmp_path, "training b").release()


def test_release_leaves_a_newer_holder_alone(tmp_path: Path) -> None:
    mine = acquire(tmp_path, "training a")
    plant(tmp_path, token="newer")  # taken over while we were presumed dead
    mine.release()
    assert json.loads((tmp_path / HOLD).read_text())["token"] == "newer"


def test_a_writer_that_lost_its_hold_stops(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hold, "HEARTBEAT", 0.05)
    mine = acquire(tmp_path, "training a")
    plant(tmp_path, token="newer")
    gc.disable()  # no finaliser runs in the main thread meanwhile (one would swallow it: below)
    try:
        with pytest.raises(KeyboardInterrupt):
            # The heartbeat thread notices within one beat (0.05 s) of running; a minute, as a
            # loaded 2-core CI machine once did not run it within 10 s.
            for _ in range(1200):
                time.sleep(0.05)
    finally:
        mine.release()
        gc.enable()


class _SlowFinaliser:
    """An object whose `__del__` runs while the hold is lost: an interrupt landing in it is
    swallowed, as one landing in any finaliser the garbage collector runs would be."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __del__(self) -> None:
        plant(self.directory, token="newer")
        for _ in range(1200):  # the loss is noticed, and the first interrupt lands, in here
            time.sleep(0.05)


def test_an_interrupt_swallowed_by_a_finaliser_is_sent_again(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hold, "HEARTBEAT", 0.05)
    monkeypatch.setattr(hold, "RESEND", 3.0)
    swallowed: list = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)  # what Python does with it
    mine = acquire(tmp_path, "training a")
    gc.disable()
    try:
        slow = _SlowFinaliser(tmp_path)
        del slow  # its __del__ runs here, in the main thread, and swallows the first interrupt
        assert [u.exc_type for u in swallowed] == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt):
            for _ in range(1200):  # the next one comes RESEND (3 s) after the first
                time.sleep(0.05)
    finally:
        mine.release()
        gc.enable()


def _contend(directory: str, go: multiprocessing.synchronize.Event, out: multiprocessing.Queue):
    judge = hold.alive

    def slow(*args: object) -> bool:  # a slow file system: all judge the holder dead, then act
        verdict = judge(*args)
        time.sleep(0.3)
        return verdict

    hold.alive = slow  # in this forked contender only
    go.wait()
    try:
        taken = acquire(Path(directory), "contender")
    except Held:
        out.put("refused")
        return
    out.put("won")
    time.sleep(2)  # hold it while the others try
    taken.release()


def test_of_many_contenders_for_a_dead_hold_exactly_one_wins(tmp_path: Path) -> None:
    plant(tmp_path, pid=dead_pid())
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), go, out)) for _ in range(6)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(30)
    results = sorted(out.get(timeout=5) for _ in procs)
    assert results == ["refused"] * 5 + ["won"]


def test_a_folder_made_for_a_hold_goes_with_it_when_nothing_was_written(tmp_path: Path) -> None:
    """A command refused after taking its hold (an init.from that does not fit) left an empty
    run directory behind; a folder it wrote into, or one that was there before, stays."""
    new = tmp_path / "new"
    acquire(new, "test").release()
    assert not new.exists()
    written = tmp_path / "written"
    h = acquire(written, "test")
    (written / "recipe.yaml").write_text("name: x\n")
    h.release()
    assert sorted(p.name for p in written.iterdir()) == ["recipe.yaml"]
    there = tmp_path / "there"
    there.mkdir()
    acquire(there, "test").release()
    assert there.is_dir() and not any(there.iterdir())

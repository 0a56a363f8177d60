"""One writer per run directory: the hold file, its live and dead holders, takeover races."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.runs import hold
from toolkit.runs.hold import HOLD, Held, acquire, holder_of


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


# A writer in a process of its own, as a training is: the pytest process's signal state is
# whatever earlier tests left (a library's handler, SIGINT ignored), which a real writer's is not.
_WRITER = """
import gc, signal, sys, time
from pathlib import Path
from toolkit.runs import hold
from tests.unit.test_hold import plant
hold.HEARTBEAT, hold.RESEND = 0.05, 2.0
directory, how = Path(sys.argv[1]), sys.argv[2]
swallowed = []
sys.unraisablehook = swallowed.append

class SlowFinaliser:  # its __del__ runs when the hold is lost; an interrupt landing in it is
    def __del__(self):  # swallowed, as one in any finaliser the garbage collector runs would be
        plant(directory, token="newer")
        for _ in range(1200):
            time.sleep(0.05)

# A writer started in a terminal handles SIGINT; one started in the background (as this test
# may be, by a CI runner) inherits it ignored. Each case sets its own, whatever pytest's is.
signal.signal(signal.SIGINT, signal.SIG_IGN if how == "ignored" else signal.default_int_handler)
gc.disable()  # no other finaliser runs meanwhile
mine = hold.acquire(directory, "training a")
try:
    if how == "finaliser":
        slow = SlowFinaliser()
        del slow
    else:
        plant(directory, token="newer")
    for _ in range(1200):  # a minute: the heartbeat notices within one beat of running
        time.sleep(0.05)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted;", "swallowed:", [u.exc_type.__name__ for u in swallowed])
finally:
    mine.release()
"""


def _writer(directory: Path, how: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-c", _WRITER, str(directory), how], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_a_writer_that_lost_its_hold_stops(tmp_path: Path) -> None:
    done = _writer(tmp_path, "plain")
    assert done.stdout.strip() == "interrupted; swallowed: []", done.stderr[-2000:]
    assert "lost the hold on this directory to training other" in done.stderr


def test_an_interrupt_swallowed_by_a_finaliser_is_sent_again(tmp_path: Path) -> None:
    """The first interrupt lands in a finaliser, which swallows it: the next, RESEND later,
    stops the writer."""
    done = _writer(tmp_path, "finaliser")
    assert done.stdout.strip() == "interrupted; swallowed: ['KeyboardInterrupt']", done.stderr
    assert done.returncode == 0


def test_a_writer_that_ignores_sigint_exits_when_it_lost_its_hold(tmp_path: Path) -> None:
    done = _writer(tmp_path, "ignored")
    assert done.returncode == hold.LOST_EXIT and done.stdout == "", done.stderr[-2000:]
    assert "does not handle SIGINT; exiting (status 3)" in done.stderr


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

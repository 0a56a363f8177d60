"""One writer per run directory: a hold file naming its holder, taken over when the holder died.

A run directory (checkpoints, metrics.jsonl, eval.json) is written by one process at a time: the
training's rank 0, or an `evaluate`. A second writer would interleave its steps into the same
metrics and race the same checkpoint names, so it is refused with one line naming the holder.

The hold is `DIR/.hold`, created with O_EXCL (atomic on local disks and on NFS, Lustre and GPFS,
where POSIX and flock locks are not reliably shared across nodes) and holding who took it: host,
pid, the pid's start time, the Slurm job. Whether that holder still lives:
- the same Slurm job (a requeued job restarting) takes over its own hold;
- on the same host, its pid must still run and have the same start time (pids are reused);
- from another host, the holder refreshes the file's mtime every HEARTBEAT seconds; an mtime
  older than STALE, measured by the file server's clock (a probe file's mtime, so clock skew
  between nodes does not matter), means the holder's node or process is gone.
A dead holder's file is renamed aside (one contender wins the rename) and the hold taken anew.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit.core.atomic import make_folder
from toolkit.core.errors import UserError

logger = logging.getLogger(__name__)

HOLD = ".hold"
HEARTBEAT = 15.0  # seconds between the holder's refreshes of its hold file
STALE = 90.0  # a hold from another host not refreshed for this long belongs to a dead holder
RESEND = 5.0  # seconds between the interrupts of a writer that lost its hold, until it lets go
LOST_EXIT = 3  # exit status of a writer that lost its hold and could not be interrupted


class Held(UserError):
    """The directory has a live writer already."""


@dataclass(frozen=True)
class Holder:
    """Who holds a directory, as written into its hold file."""

    host: str
    pid: int
    started: str | None  # the pid's start time (/proc), so a reused pid is not taken for it
    job: str | None  # SLURM_JOB_ID: a requeued job takes over its own hold
    command: str
    token: str

    def describe(self) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        return f"{self.command} (pid {self.pid} on {self.host}{job})"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _running(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _stat(pid)
    if fields is None:  # no /proc (not Linux): the pid exists
        return True
    # A zombie has ended (its parent has not reaped it yet); another start time: a reused pid.
    return fields[0] != "Z" and (started is None or fields[19] == started)


def me(command: str) -> Holder:
    pid = os.getpid()
    return Holder(host=socket.gethostname(), pid=pid, started=_start_time(pid),
                  job=os.environ.get("SLURM_JOB_ID"), command=command,
                  token=uuid.uuid4().hex)  # fmt: skip


def _read(path: Path) -> Holder | None:
    """The holder a hold file names; None if it is gone or not (yet) complete."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _age(path: Path) -> float | None:
    """Seconds since `path` was last modified, by the file server's clock."""
    probe = path.with_name(f"{HOLD}.probe-{uuid.uuid4().hex}")
    try:
        probe.touch()
        now = probe.stat().st_mtime
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return None
    finally:
        probe.unlink(missing_ok=True)


def alive(path: Path, holder: Holder | None, by: Holder) -> bool:
    """Whether the hold at `path` (naming `holder`) still belongs to a live writer, seen by `by`."""
    if holder is None:  # being written this instant, or garbage: live until it goes stale
        age = _age(path)
        return age is not None and age < STALE
    if holder.job is not None and holder.job == by.job:
        return False  # our own job, requeued: its earlier run is over
    if holder.host == by.host:
        return _running(holder.pid, holder.started)
    age = _age(path)
    return age is not None and age < STALE


def holder_of(directory: Path) -> Holder | None:
    """The live holder of `directory`, if any (what a launch checks before it submits)."""
    path = Path(directory) / HOLD
    holder = _read(path)
    return holder if holder is not None and alive(path, holder, me("check")) else None


def refusal(directory: Path, holder: Holder) -> str:
    return (f"{directory}: in use by {holder.describe()}; wait for it to finish, or write "
            f"elsewhere (another run.dir)")  # fmt: skip


def refuse_if_held(directory: Path) -> None:
    """Raise `Held` when `directory` has a live writer (checked before starting or submitting
    processes that would take the hold themselves)."""
    holder = holder_of(directory)
    if holder is not None:
        raise Held(refusal(directory, holder))


class Hold:
    """This process's hold on a directory: refreshed in the background until released."""

    def __init__(self, path: Path, holder: Holder, made: bool = False) -> None:
        self.path, self.holder = path, holder
        self.made = made  # the directory was made for this hold
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hold-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT):
            current = _read(self.path)
            if current is None or current.token != self.holder.token:
                # Our refreshes did not land for STALE seconds (a frozen node, a file-system
                # outage) and another writer took over: stop writing at once rather than
                # interleave with it (the main thread gets KeyboardInterrupt).
                taker = current.describe() if current else "nobody"
                logger.error("%s: lost the hold on this directory to %s: stopping",
                             self.path.parent, taker)  # fmt: skip
                self._interrupt_until_released()
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _interrupt_until_released(self) -> None:
        """KeyboardInterrupt in the main thread, again every RESEND seconds until `release`: an
        interrupt that lands while the main thread runs a finaliser (`__del__`, a weakref
        callback, run by the garbage collector at any moment) is swallowed there ("Exception
        ignored in ...") and the writer would go on. Where SIGINT is ignored or left to the
        system (a process started in the background inherits it ignored), interrupt_main does
        nothing: the process ends at once instead, its writes unfinished rather than
        interleaved with the new holder's."""
        while True:
            if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
                logger.error("%s: this process does not handle SIGINT; exiting (status %d)",
                             self.path.parent, LOST_EXIT)  # fmt: skip
                logging.shutdown()
                os._exit(LOST_EXIT)
            _thread.interrupt_main()
            if self._done.wait(RESEND):
                return

    def release(self) -> None:
        """Give the directory up, if it is still ours."""
        self._done.set()
        self._thread.join()
        current = _read(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
            if self.made:  # a command refused before writing leaves no empty folder behind
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()  # only if empty


def acquire(directory: Path, command: str) -> Hold:
    """Hold `directory` (created if missing) for this process, or raise `Held` naming the live
    holder. A dead holder's hold is taken over, with a warning."""
    made = not Path(directory).exists()
    directory = make_folder(Path(directory))
    path = directory / HOLD
    mine = me(command)
    body = json.dumps(asdict(mine)) + "\n"
    for _ in range(100):  # each turn: a create, or one step of a takeover
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if alive(path, holder, mine):
                if holder is None:
                    raise Held(f"{directory}: another process is taking it (see {path})") from None
                raise Held(refusal(directory, holder)) from None
            _take_from_the_dead(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return Hold(path, mine, made)
    raise Held(f"{directory}: other processes keep taking it (see {path})")


def _take_from_the_dead(path: Path, holder: Holder | None) -> None:
    """Remove a dead holder's file, so that the next O_EXCL create decides who holds it.

    Only the process that creates the marker `.hold.taking-<dead token>` may remove it, and only
    after reading that the file still names that dead holder: a live holder's file, created
    after ours was judged, is never removed (renaming the file aside and back would leave a
    moment in which a third process could take the hold while the file was away)."""
    marker = path.with_name(f"{HOLD}.taking-{holder.token if holder else 'unreadable'}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        age = _age(marker)
        if age is not None and age > STALE:  # a taker that died half-way
            marker.unlink(missing_ok=True)
        else:
            time.sleep(0.1)  # another process is taking it over: see what it makes of it
        return
    os.close(fd)
    try:
        now = _read(path)
        if holder is None:
            still_dead = now is None
        else:
            still_dead = now is not None and now.token == holder.token
        if still_dead:
            path.unlink(missing_ok=True)
            if holder is not None:
                logger.warning("%s: %s had stopped without releasing it; taking it over",
                               path.parent, holder.describe())  # fmt: skip
    finally:
        marker.unlink(missing_ok=True)


@contextlib.contextmanager
def held(directory: Path, command: str) -> Iterator[Hold]:
    """`with held(dir, "evaluate"):` the directory is this process's until the block ends."""
    hold = acquire(directory, command)
    try:
        yield hold
    finally:
        hold.release()

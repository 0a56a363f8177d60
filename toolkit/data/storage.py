"""Where shards live: a local folder, or an object store through fsspec (s3://, gs://, https://),
read by byte ranges with read-ahead and retried from the byte where a read stopped.

Credentials never pass through here: s3fs (botocore) finds them in the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or the user's AWS configuration;
a recipe names only where the store is (`data.storage_options`). The retrying is ours alone
(botocore's and s3fs's own are turned off), so that each retry is counted and logged once and
none re-reads bytes already delivered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from toolkit.core.errors import UserError
from toolkit.core.schema import StorageConfig

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# A request reads at most this much: the read-ahead thread is at most one block ahead of its
# reader, and a generic store (no streamed body) re-reads at most one block after a failure.
BLOCK = 4 << 20
_PIECE = 256 << 10  # what a streamed body is read in
_BACKOFF, _BACKOFF_CAP = 0.2, 10.0  # seconds: the first retry's wait, and the longest


class StorageError(UserError):
    """A store refused or kept failing: one line naming the URL (exit status 2)."""


# How a store is reached: the recipe's `data.storage_options` (none of it a credential).
StoreOptions = StorageConfig


def parse_options(items: list[str], flag: str = "--storage") -> StoreOptions:
    """`KEY=VALUE` items (the keys of a recipe's `data.storage_options`) as options; a
    credential is refused: it belongs in the environment, never on a command line."""
    known = {f.name: f for f in dataclasses.fields(StoreOptions)}
    values: dict[str, Any] = {}
    for n, item in enumerate(items, 1):
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            # Never the text itself: a value (or a key pasted without "=") may be a secret.
            shown = f"{key}=..." if sep else f"item {n} (no '=')"
            raise UserError(
                f"{flag} {shown}: expected KEY=VALUE with KEY one of {', '.join(known)}"
                + ("; credentials come from the environment (AWS_ACCESS_KEY_ID, "
                   "AWS_SECRET_ACCESS_KEY) or the AWS configuration"
                   if sep and key not in known else "")
            )  # fmt: skip
        if key == "anonymous":
            if raw.lower() not in ("true", "false"):
                raise UserError(f"{flag} {key}={raw}: expected true or false")
            values[key] = raw.lower() == "true"
        elif key == "attempts":
            if not raw.isdigit() or not 1 <= int(raw) <= 100:
                raise UserError(f"{flag} {key}={raw}: expected an integer from 1 to 100")
            values[key] = int(raw)
        else:
            values[key] = raw or None
    return StoreOptions(**values)


def is_url(where: str | Path | Remote) -> bool:
    """Whether `where` names an object (`s3://b/k`); `file://` names a local path."""
    if isinstance(where, Remote):
        return True
    m = _SCHEME.match(str(where)) if isinstance(where, str) else None
    return m is not None and m.group(1).lower() != "file"


def locate(where: str | Path | Remote, options: StoreOptions | None = None) -> Path | Remote:
    """A local path, or a Remote for a URL (refused: credentials in it, or no bucket)."""
    if isinstance(where, Remote | Path):
        return where
    if not is_url(where):
        return Path(where[len("file://") :] if where.lower().startswith("file://") else where)
    protocol = _SCHEME.match(where).group(1).lower()  # type: ignore[union-attr]
    rest = where[len(protocol) + 3 :].rstrip("/")
    host = rest.split("/", 1)[0]
    if "@" in host:
        raise StorageError(
            f"{protocol}://...@{host.rsplit('@', 1)[1]}: a URL must not carry credentials; "
            "give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the AWS "
            "configuration"
        )
    if not host:
        raise StorageError(f"{where}: expected {protocol}://BUCKET/PREFIX")
    return Remote(f"{protocol}://{rest}", options or StoreOptions())


@dataclass(frozen=True)
class Remote:
    """An object (or a prefix) in a store: joined with `/` like a Path, shown as its URL."""

    url: str
    options: StoreOptions = field(default_factory=StoreOptions)

    def __truediv__(self, name: str) -> Remote:
        return Remote(f"{self.url}/{name}", self.options)

    def __str__(self) -> str:
        return self.url

    def absolute(self) -> Remote:
        return self

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def fs(self) -> Any:
        return filesystem(self.protocol, self.options)


# --- one file system per process ------------------------------------------------------------------

_FILESYSTEMS: dict[tuple[int, str, StoreOptions], Any] = {}


def filesystem(protocol: str, options: StoreOptions) -> Any:
    """This process's fsspec file system for `protocol` (made once per process, so that a
    DataLoader worker keeps its own connections open across shards and epochs; one made before
    a fork is never used after it)."""
    key = (os.getpid(), protocol, options)
    fs = _FILESYSTEMS.get(key)
    if fs is not None:
        return fs
    for name in ("botocore", "aiobotocore"):  # where they found credentials: not news
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import fsspec
    except ImportError:
        raise StorageError(
            f"{protocol}:// shards need fsspec: pip install 'srmae-toolkit[s3]'"
        ) from None
    kwargs: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        # Attempts are ours (`_attempts`): botocore and s3fs try once.
        kwargs["config_kwargs"] = {"retries": {"total_max_attempts": 1},
                                   "connect_timeout": 10, "read_timeout": 60}  # fmt: skip
        if options.endpoint_url:
            kwargs["endpoint_url"] = options.endpoint_url
        if options.region:
            kwargs["client_kwargs"] = {"region_name": options.region}
        if options.anonymous:
            kwargs["anon"] = True
        kwargs["session"] = _aio_session()
    elif options.endpoint_url or options.region:
        raise StorageError(
            f"{protocol}://: data.storage_options.endpoint_url and region apply to s3:// only"
        )
    elif options.anonymous and protocol in ("gs", "gcs"):
        kwargs["token"] = "anon"
    try:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **kwargs)
    except ImportError as err:
        extra = "s3" if protocol in ("s3", "s3a") else protocol
        raise StorageError(f"{protocol}:// shards need a package: {err} (for s3: pip install "
                           f"'srmae-toolkit[{extra}]')") from None  # fmt: skip
    except ValueError as err:  # an unknown protocol
        raise StorageError(f"{protocol}://: {err}") from None
    if hasattr(fs, "retries"):
        fs.retries = 1
    _FILESYSTEMS[key] = fs
    return fs


_SESSION: list[Any] = []


def _aio_session() -> Any:
    """One botocore session for this process and the DataLoader workers it forks: a fork
    inherits its parsed service models and resolved credentials, so a worker's first request
    does not load them again (~0.1 s a worker, each epoch of a loader that is made anew)."""
    if not _SESSION:
        from aiobotocore.session import AioSession

        _SESSION.append(AioSession())
    return _SESSION[0]


# --- what failed, and whether to try again --------------------------------------------------------


def _is_transient(err: BaseException) -> bool:
    """A reset, a timeout, a 5xx or throttling: worth another try. Not found, denied, no
    credentials, a bad name: no try will do better."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    try:
        import botocore.exceptions as bce
    except ImportError:
        bce = None
    if bce is not None:
        if isinstance(err, bce.ClientError):
            meta = err.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode") or 0)
            code = err.response.get("Error", {}).get("Code", "")
            return status >= 500 or status in (408, 429) or "Throttl" in code or code in (
                "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable")  # fmt: skip
        transient = (bce.ConnectionError, bce.HTTPClientError, bce.ResponseStreamingError,
                     bce.IncompleteReadError, bce.ReadTimeoutError)  # fmt: skip
        if isinstance(err, transient):
            return True
        if isinstance(err, bce.BotoCoreError):  # no credentials, a bad parameter or region
            return False
    status = getattr(err, "status", None)  # aiohttp's ClientResponseError (https://)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(err, OSError) and err.errno in (errno.EINVAL, errno.ENOENT, errno.EACCES):
        return False
    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    if aiohttp is not None and isinstance(err, aiohttp.ClientError):
        return True
    return isinstance(err, (OSError, TimeoutError, EOFError))


def _why(err: BaseException) -> str:
    """One line of what a store said."""
    if isinstance(err, FileNotFoundError):
        return "not found (no such bucket or object)"
    if isinstance(err, PermissionError):
        return f"access denied ({err})"
    name = type(err).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or data.storage_options.anonymous=true for a public bucket")  # fmt: skip
    text = " ".join(str(err).split()) or name
    return f"{name}: {text[:200]}"


T = TypeVar("T")


@dataclass
class Counts:
    """What this process asked of stores: requests, body bytes received (of them, by range
    reads: shards' samples), retries."""

    requests: int = 0
    bytes: int = 0
    ranged: int = 0
    retries: int = 0


COUNTS = Counts()
_COUNTS_LOCK = threading.Lock()


def _count(requests: int = 0, nbytes: int = 0, retries: int = 0, ranged: int = 0) -> None:
    with _COUNTS_LOCK:
        COUNTS.requests += requests
        COUNTS.bytes += nbytes + ranged
        COUNTS.ranged += ranged
        COUNTS.retries += retries


def attempt(
    what: Remote, action: str, fn: Callable[[], T], progress: Callable[[], int] | None = None
) -> T:
    """`fn()`, tried again after a transient failure (exponential backoff with full jitter, at
    most `attempts` tries in a row without progress: a failure after `progress()` has grown
    starts the count again, so a long read over a flaky link gets through); a permanent
    failure, or the last try, is a StorageError naming the URL."""
    tries = max(1, what.options.attempts)
    failed, last = 0, progress() if progress else 0
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as err:  # classified below: a programming error is re-raised
            if not _is_transient(err):
                if _is_programming(err):
                    raise
                raise StorageError(f"{what}: {action}: {_why(err)}") from None
            now = progress() if progress else 0
            failed = 1 if now > last else failed + 1
            last = now
            if failed >= tries:
                raise StorageError(
                    f"{what}: {action}: failed {tries} times in a row, last: {_why(err)}"
                ) from None
            wait = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF * 2 ** (failed - 1)))
            _count(retries=1)
            logger.warning("%s: %s: %s (try %d of %d); retrying in %.2f s",
                           what, action, _why(err), failed, tries, wait)  # fmt: skip
            time.sleep(wait)


def _is_programming(err: BaseException) -> bool:
    return isinstance(err, (TypeError, AttributeError, NameError, AssertionError, KeyError,
                            IndexError))  # fmt: skip


# --- whole objects --------------------------------------------------------------------------------


def read_bytes(what: Path | Remote) -> bytes:
    """A whole file or object."""
    if isinstance(what, Path):
        return what.read_bytes()

    def get() -> bytes:
        data = what.fs().cat_file(what.url)
        _count(requests=1, nbytes=len(data))
        return data

    return attempt(what, "read", get)


def read_many(items: list[Remote]) -> list[bytes]:
    """Whole objects, eight requested at a time, each tried on its own (a failure of one is
    not a failure of the others): the indexes of the shards a worker's pass reads cost about
    one round trip, not one each."""
    if len(items) <= 1:
        return [read_bytes(i) for i in items]
    with ThreadPoolExecutor(min(8, len(items)), thread_name_prefix="shard-index") as pool:
        return list(pool.map(read_bytes, items))


_UNLISTED = ("http", "https")  # read-only, and no listing: each object is asked its size


def sizes(root: Remote, names: list[str] | None = None) -> dict[str, int]:
    """The size of every object under a prefix, by its name relative to the prefix (of `names`
    where the store cannot list: https://, one HEAD each, eight at a time)."""
    if root.protocol in _UNLISTED:
        if names is None:
            raise StorageError(f"{root}: {root.protocol}:// is read-only: write shards to a "
                               "local folder or an object store (s3://)")  # fmt: skip
        with ThreadPoolExecutor(8, thread_name_prefix="shard-size") as pool:
            got = dict(zip(names, pool.map(lambda n: _size(root / n), names), strict=True))
        return {n: v for n, v in got.items() if v is not None}

    def listing() -> dict[str, int]:
        fs = root.fs()
        found = fs.find(root.url, detail=True)
        _count(requests=1)
        base = fs._strip_protocol(root.url).rstrip("/") + "/"
        return {k[len(base) :]: int(v.get("size") or 0) for k, v in found.items()
                if k.startswith(base)}  # fmt: skip

    return attempt(root, "list", listing)


def _size(what: Remote) -> int | None:
    """An object's size; None if there is no such object."""

    def get() -> int | None:
        _count(requests=1)
        try:
            return int(what.fs().size(what.url))
        except FileNotFoundError:
            return None

    return attempt(what, "size", get)


def put_file(local: Path, what: Remote) -> None:
    """Upload a file as one object: a store makes it visible whole or not at all (S3's PUT and
    multipart upload complete atomically), so no reader sees part of it under its name."""
    attempt(what, "write", lambda: what.fs().put_file(str(local), what.url))
    _count(requests=1)


def put_bytes(what: Remote, data: bytes) -> None:
    attempt(what, "write", lambda: what.fs().pipe_file(what.url, data))
    _count(requests=1)


def remove(what: Remote) -> None:
    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            what.fs().rm_file(what.url)

    attempt(what, "remove", rm)
    _count(requests=1)


# --- byte ranges, read ahead ----------------------------------------------------------------------


def _stream_s3(fs: Any, url: str, start: int, end: int, sink: Callable[[bytes], None]) -> None:
    """Bytes [start, end) of an S3 object, handed to `sink` as they arrive (one GET)."""
    from fsspec.asyn import sync

    async def run() -> None:
        bucket, key, version = fs.split_path(url)
        extra = {"VersionId": version} if version else {}
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                 Range=f"bytes={start}-{end - 1}", **extra)  # fmt: skip
        body = resp["Body"]
        got = resp.get("ContentRange", "")
        try:
            if not got.startswith(f"bytes {start}-"):  # a store that ignored the range
                raise OSError(errno.EIO, f"asked for bytes {start}-{end - 1}, got {got!r}")
            while chunk := await body.read(_PIECE):
                sink(chunk)
        finally:
            body.close()

    sync(fs.loop, run)


def _fetch(what: Remote, start: int, end: int, sink: Callable[[bytes], None]) -> None:
    """Bytes [start, end) of an object into `sink`, in order and each once: a failed request is
    made again from the first byte not yet handed over."""
    at = [start]

    def counted(chunk: bytes) -> None:
        at[0] += len(chunk)
        _count(ranged=len(chunk))
        sink(chunk)

    def once() -> None:
        fs = what.fs()
        _count(requests=1)
        if what.protocol in ("s3", "s3a"):
            _stream_s3(fs, what.url, at[0], end, counted)
        else:  # no streamed body in fsspec's generic API: the block is the unit
            data = fs.cat_file(what.url, start=at[0], end=end)
            if len(data) > end - at[0]:  # a server that ignores ranges sends the whole file
                raise StorageError(f"{what}: asked for bytes {at[0]}-{end - 1}, got "
                                   f"{len(data)} bytes: the server ignores ranges")  # fmt: skip
            counted(data)
        if at[0] != end:
            raise EOFError(f"the object ended at byte {at[0]}, expected {end}")

    attempt(what, f"read bytes {start}-{end - 1}", once, progress=lambda: at[0])


class RangeReader:
    """The bytes of a list of (object, start, end) ranges, as one stream read in order.

    A thread fetches them a block at a time, at most one block ahead of the reader: the network
    overlaps decoding, and no byte outside the ranges is ever requested. A range that cannot be
    read raises StorageError in the reader.
    """

    def __init__(self, ranges: list[tuple[Remote, int, int]], block: int = BLOCK) -> None:
        self._chunks: deque[bytes] = deque()
        self._held = 0  # bytes in _chunks
        self._head = 0  # bytes of _chunks[0] already read
        self._error: BaseException | None = None
        self._done = False
        self._stop = False
        self._block = block
        self._at = ranges[0][1] if ranges else 0  # `tell`: meaningful for one range
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(ranges,), daemon=True,
                                        name="shard-read-ahead")  # fmt: skip
        self._thread.start()

    def _run(self, ranges: list[tuple[Remote, int, int]]) -> None:
        try:
            for what, start, end in ranges:
                for lo in range(start, end, self._block):
                    with self._cv:  # no more than one block ahead of the reader
                        self._cv.wait_for(lambda: self._stop or self._held < self._block)
                        if self._stop:
                            return
                    _fetch(what, lo, min(lo + self._block, end), self._put)
        except BaseException as err:  # handed to the reader, which raises it
            with self._cv:
                self._error = err
                self._cv.notify_all()
            return
        with self._cv:
            self._done = True
            self._cv.notify_all()

    def _put(self, chunk: bytes) -> None:
        with self._cv:
            self._chunks.append(chunk)
            self._held += len(chunk)
            self._cv.notify_all()

    def read(self, n: int) -> bytes:
        """The next `n` bytes (fewer only at the end of the ranges)."""
        out = []
        need = n
        with self._cv:
            while need:
                self._cv.wait_for(lambda: self._chunks or self._done or self._error is not None)
                if not self._chunks:
                    if self._error is not None:
                        raise self._error
                    break  # the end
                head = self._chunks[0]
                take = head[self._head : self._head + need]
                out.append(take)
                need -= len(take)
                self._head += len(take)
                if self._head == len(head):
                    self._chunks.popleft()
                    self._held -= len(head)
                    self._head = 0
                    self._cv.notify_all()
        data = b"".join(out)
        self._at += len(data)
        return data

    def tell(self) -> int:
        """The offset in the object of the next byte (of a reader over one range)."""
        return self._at

    def seek(self, offset: int, whence: int = 0) -> int:
        """Forward only, from the current position (whence 1): the bytes are read past."""
        if whence != 1 or offset < 0:
            raise OSError(errno.ESPIPE, "a range reader seeks forward only")
        while offset:
            got = len(self.read(min(offset, BLOCK)))
            if not got:
                raise EOFError("seek past the end of the ranges")
            offset -= got
        return 0

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spans(starts: list[int], ends: list[int]) -> Iterator[tuple[int, int]]:
    """Adjacent byte spans merged: one request for a run of consecutive samples."""
    lo = hi = None
    for s, e in zip(starts, ends, strict=True):
        if hi is not None and s == hi:
            hi = e
            continue
        if lo is not None:
            yield lo, hi  # type: ignore[misc]
        lo, hi = s, e
    if lo is not None:
        yield lo, hi  # type: ignore[misc]

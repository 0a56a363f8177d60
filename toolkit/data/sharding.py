"""Writing shards: a source folder -> WebDataset tars per split (train/val) + manifest.json: the
split and order of each key, the plan of shards, the worker pool, the commit. `python -m
toolkit.shard` and the demo call `shard`."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from toolkit.core.errors import UserError
from toolkit.core.schema import StorageConfig
from toolkit.data.fit import unit_misfit
from toolkit.data.fits import FITS_EXTS
from toolkit.data.format import (
    INDEX_GLOB,
    MANIFEST,
    SHARD_GLOB,
    SPLITS,
    TEMP_GLOB,
    ShardResult,
    TarWriter,
    commit,
    manifest_doc,
)
from toolkit.data.normalise import parse as parse_normalisation
from toolkit.data.sources import (
    Item,
    Source,
    _one_line,
    decode,
    list_source,
    npy_range,
    probe,
)
from toolkit.data.storage import Remote, is_url, locate, put_bytes, put_file, remove, sizes

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- split and plan


def _hash_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """A sample's split, from its key alone: adding files never moves existing samples."""
    h = _hash_hex(f"{seed}:{key}")
    return "val" if int(h[:16], 16) / 2**64 < val_fraction else "train"


def class_of(key: str) -> str:
    """A labelled sample's class: the first folder of its path (SRC/<class>/...)."""
    return key.split("/", 1)[0]


def classes_of(source: Source, seed: int, val_fraction: float) -> tuple[str, ...]:
    """The class names of a labelled source (its top folders, sorted: the label is the index);
    a user error unless every file lies in a class folder, there are two classes or more, and
    every class has samples in val."""
    if source.kind != "hr":
        raise UserError(f"{source.root}: --labels needs class folders of images, not hr/ + lr/")
    loose = [it.key for it in source.items if "/" not in it.key]
    if loose:
        raise UserError(f"{source.root}: {loose[0]} lies in no class folder (--labels: the class "
                        "of SRC/<class>/<file> is <class>)")  # fmt: skip
    classes = tuple(sorted({class_of(it.key) for it in source.items}))
    if len(classes) < 2:
        raise UserError(f"{source.root}: --labels found one class folder ({classes[0]}): "
                        "expected two or more")  # fmt: skip
    if val_fraction > 0:
        in_val = {class_of(it.key) for it in source.items
                  if split_of(it.key, seed, val_fraction) == "val"}  # fmt: skip
        missing = [c for c in classes if c not in in_val]
        if missing:
            raise UserError(
                f"{source.root}: class {missing[0]} has no sample in val at --val-fraction "
                f"{val_fraction}: add samples of it or raise the fraction"
            )
    return classes


def refuse_unfit(
    root: Path,
    results: list[ShardResult],
    normalise: str | None,
    classes: tuple[str, ...] | None,
    val_fraction: float,
) -> None:
    """What the files turned out to hold, checked before the shards are made visible: one SR
    factor for every pair, a class left with samples in every split it needs (files of it may
    have been skipped), values in [0, 1] where `--normalise unit` says so."""
    scales: dict[int, int] = {}
    for r in results:
        for k, n in r.scales.items():
            scales[k] = scales.get(k, 0) + n
    if len(scales) > 1:
        found = ", ".join(f"{n} at scale {k}" for k, n in sorted(scales.items()))
        raise UserError(f"{root}: hr/lr pairs of several scales ({found}): one shard set holds "
                        "one scale; shard each in its own")  # fmt: skip
    if classes is not None:
        for split in ("train", "val") if val_fraction > 0 else ("train",):
            counts = [0] * len(classes)
            for r in results:
                if r.split == split:
                    for label, n in r.class_counts.items():
                        counts[label] += n
            empty = [c for c, n in zip(classes, counts, strict=True) if not n]
            if empty:
                bad = sum(class_of(p) == empty[0] for r in results for p, _ in r.skipped)
                why = f"{bad} of its files were skipped: see the log" if bad else "none fell there"
                raise UserError(
                    f"{root}: class {empty[0]} has no readable sample in {split} ({why}); add "
                    "samples of it or mend them"
                )
    low = min((r.low for r in results if r.count), default=0.0)
    high = max((r.high for r in results if r.count), default=1.0)
    problem = unit_misfit(
        str(root), (low, high), "--normalise", parse_normalisation(normalise or "none")
    )
    if problem is not None:
        raise UserError(problem)


def order_of(key: str, seed: int) -> str:
    """A sample's sort key within its split: a second hash, so that every shard is well mixed."""
    return _hash_hex(f"{seed}:order:{key}")


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its planned place and samples; a worker writes it whole."""

    split: str
    index: int  # planned number; the final one may be lower if an earlier shard ends up empty
    out: Path
    root: Path
    items: list[Item]
    strict: bool
    nonfinite: str = "refuse"  # NaN/inf pixels: "refuse" the file, or "zero": fill and count
    hdu: str | None = None  # the FITS HDU to read (None: the first holding an image)
    classes: tuple[str, ...] | None = None  # labelled: the class names, a sample's its folder's


def plan(
    source: Source,
    out: Path,
    seed: int,
    val_fraction: float,
    shard_size: int,
    strict: bool,
    nonfinite: str = "refuse",
    hdu: str | None = None,
    classes: tuple[str, ...] | None = None,
) -> list[ShardJob]:
    """The shards to write: per split, samples ordered by hash and cut into shard_size pieces."""
    by_split: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for item in source.items:
        by_split[split_of(item.key, seed, val_fraction)].append(item)
    jobs = []
    for split, items in by_split.items():
        items.sort(key=lambda it: (order_of(it.key, seed), it.key))
        for i in range(0, len(items), shard_size):
            piece = items[i : i + shard_size]
            jobs.append(
                ShardJob(
                    split, i // shard_size, out, source.root, piece, strict, nonfinite, hdu, classes
                )
            )
    return jobs


# ---------------------------------------------------------------- writing one shard


def _read(path: Path) -> bytes:
    """A file's bytes: one open, one fstat and one read where it holds the size fstat gave, a
    third of what Path.read_bytes costs on small files."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size + 1)  # the extra byte tells a file that grew
            if len(data) == size:
                return data
            # A short read (over 2 GiB at once), or a file that changed: read to its end.
            parts = [data]
            while more := os.read(fd, 1 << 24):
                parts.append(more)
            return b"".join(parts)
        finally:
            os.close(fd)
    except OSError as err:
        raise ValueError(f"unreadable: {err.strerror or err}") from err


# Formats whose values their type does not bound: decoded at shard time for their range and
# their NaN/inf pixels. 8- and 16-bit PNG/JPEG lie in [0, 1] by their scaling.
_VALUED = (".npy", ".tif", ".tiff", *FITS_EXTS)


def _values(
    data: bytes, ext: str, policy: str, hdu: str | None
) -> tuple[bytes, str, tuple[int, int, int], int, float, float]:
    """(bytes to store, their extension, (channels, height, width), NaN/inf pixels filled,
    lowest, highest value) of one file; ValueError when it is corrupt, or holds NaN/inf and the
    policy refuses them. Headers are probed first (the clearest word on a truncated file), but
    a FITS's, whose probe is a decode: formats of unbounded values are decoded once."""
    if ext not in _VALUED:
        return data, ext, probe(data, ext, hdu), 0, 0.0, 1.0
    if ext not in FITS_EXTS:
        shape = probe(data, ext, hdu)
        if ext == ".npy":  # the range from a view of the bytes: no decode unless NaN/inf
            low, high = npy_range(data)
            if math.isfinite(low) and math.isfinite(high):
                return data, ext, shape, 0, low, high
    a = decode(data, ext, hdu)
    c, h, w = a.shape
    bad = ~np.isfinite(a)
    count = int(bad.sum())
    if count and policy == "refuse":
        raise ValueError(
            f"{count} NaN/inf pixels (of {a.size}): --nonfinite zero fills them with 0 and "
            "counts them in the manifest"
        )
    if count:
        a = np.where(bad, np.float32(0), a)
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        data, ext = buf.getvalue(), ".npy"  # stored filled, as the float32 array it decodes to
    return data, ext, (c, h, w), count, float(a.min()), float(a.max())


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _meta(data: bytes) -> bytes:
    """A sample's metadata file as stored (its own bytes); ValueError unless it is a JSON
    object (NaN and Infinity, which JSON lacks, included)."""
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"not readable JSON: {_one_line(err)}") from err
    if not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not an object ({{...}})")
    return data


# One file read and checked: `_values`'s tuple (the metadata: its bytes), or why it is bad.
Checked = tuple[bytes, str, tuple[int, int, int], int, float, float] | bytes | ValueError


@dataclass(frozen=True)
class Loaded:
    """A sample's files, each read and checked: hr, lr (None: none) and metadata."""

    hr: Checked
    lr: Checked | None
    meta: Checked | None


def _checked(job: ShardJob, path: Path) -> Checked:
    try:
        return _values(_read(path), os.path.splitext(path)[1].lower(), job.nonfinite, job.hdu)
    except ValueError as err:
        return err


def _meta_checked(path: Path) -> Checked:
    try:
        return _meta(_read(path))
    except ValueError as err:
        return err


def load(job: ShardJob, item: Item) -> Loaded:
    """Read and check every file of a sample; touches nothing shared, so it can run ahead on
    another thread (reads and numpy's reductions let go of the GIL)."""
    return Loaded(
        _checked(job, item.hr),
        None if item.lr is None else _checked(job, item.lr),
        None if item.meta is None else _meta_checked(item.meta),
    )


def _members(
    job: ShardJob, item: Item, loaded: Loaded, result: ShardResult
) -> list[tuple[str, bytes]] | None:
    """The tar members of one sample, or None (recorded in result.skipped) if a file is bad:
    an image, or its metadata (meta/<key>.json, stored as `<key>.json`, webdataset's member)."""
    members, shapes, values, ok = [], [], [], True
    for side, path, got in (("hr", item.hr, loaded.hr), ("lr", item.lr, loaded.lr)):
        if path is None:
            continue
        if isinstance(got, ValueError):
            result.skipped.append((path.relative_to(job.root).as_posix(), str(got)))
            ok = False
            if job.strict:
                break
            continue
        data, ext, shape, filled, low, high = got  # type: ignore[misc]
        members.append((f"{item.key}.{side}.{ext.lstrip('.')}", data))
        shapes.append(shape)
        values.append((path, filled, low, high))
    if item.meta is not None and (ok or not job.strict):  # every bad file listed, but --strict
        if isinstance(loaded.meta, ValueError):
            result.skipped.append((item.meta.relative_to(job.root).as_posix(), str(loaded.meta)))
            ok = False
        else:
            members.append((f"{item.key}.json", loaded.meta))  # type: ignore[arg-type]
    if not ok:
        return None
    if len(shapes) == 2:  # a pair: its LR must be its HR reduced by one whole factor
        (_, h, w), (_, lh, lw) = shapes
        if lh < 1 or lw < 1 or h % lh or w % lw or h // lh != w // lw or h // lh < 2:
            lr = item.lr.relative_to(job.root).as_posix()  # type: ignore[union-attr]
            result.skipped.append((lr, f"{lh}x{lw}: not its hr {h}x{w} reduced by one factor"))
            return None  # before anything of it is counted
        result.scales[h // lh] = result.scales.get(h // lh, 0) + 1
    if job.classes is not None:  # webdataset's `cls`: the class index as text
        label = job.classes.index(class_of(item.key))
        members.append((f"{item.key}.cls", str(label).encode()))
        result.class_counts[label] = result.class_counts.get(label, 0) + 1
    result.meta += item.meta is not None
    for path, filled, low, high in values:
        result.low, result.high = min(result.low, low), max(result.high, high)
        if filled:
            result.filled[path.relative_to(job.root).as_posix()] = filled
    result.channels.update(c for c, _, _ in shapes)
    _, h, w = shapes[0]
    result.hr_min = (min(result.hr_min[0], h), min(result.hr_min[1], w))
    result.hr_max = (max(result.hr_max[0], h), max(result.hr_max[1], w))
    return members


T = TypeVar("T")
R = TypeVar("R")
# Samples are read and checked in runs of about _READ_BYTES (at most _READ_RUN samples, at least
# one), _READ_AHEAD runs ahead: a task per sample hands the GIL to and fro more than it reads,
# and a count alone would hold gigabytes of large FITS files.
_READ_BYTES, _READ_RUN, _READ_AHEAD = 4 << 20, 32, 2


def read_run(job: ShardJob) -> int:
    """Samples per read task for `job`, from the size of its first sample's files."""
    first = job.items[0]
    try:
        size = sum(os.stat(p).st_size for p in (first.hr, first.lr, first.meta) if p is not None)
    except OSError:  # unreadable: found and reported when it is read
        size = 0
    return max(1, min(_READ_RUN, _READ_BYTES // max(size, 1)))


def ahead(
    pool: Executor, fn: Callable[[T], R], items: Sequence[T], run: int, depth: int
) -> Iterator[R]:
    """fn(item) for each item, in order, computed on `pool` in runs of `run` items (a task per
    item costs as much as a small file's read), up to `depth` runs ahead."""
    waiting: deque[Future[list[R]]] = deque()
    for i in range(0, len(items), run):
        waiting.append(pool.submit(_each, fn, items[i : i + run]))
        if len(waiting) > depth:
            yield from waiting.popleft().result()
    while waiting:
        yield from waiting.popleft().result()


def _each(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [fn(item) for item in items]


def write_shard(job: ShardJob, report: Callable[[int], None]) -> ShardResult:
    """Write one shard to a temporary name in its split folder; the caller renames it."""
    result = ShardResult(job.split, job.index)
    tmp = job.out / job.split / f".shard-{job.index:06d}.tar.tmp-{os.getpid()}"
    try:
        with (
            open(tmp, "wb", buffering=0) as f,
            TarWriter(f) as tar,
            ThreadPoolExecutor(1, thread_name_prefix="shard-read") as reader,
        ):
            run = read_run(job)
            loads = ahead(reader, functools.partial(load, job), job.items, run, _READ_AHEAD)
            for item, loaded in zip(job.items, loads):  # noqa: B905 (strict: it may stop early)
                members = _members(job, item, loaded, result)
                report(item.files)
                if members is None:
                    if job.strict:
                        break
                    continue
                tar.add(members)
                result.count += 1
            digest = tar.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if result.count == 0 or (job.strict and result.skipped):
        tmp.unlink()
        return result
    index = job.out / job.split / f".shard-{job.index:06d}.idx.tmp-{os.getpid()}"
    try:
        index.write_bytes(tar.index())
    except BaseException:
        tmp.unlink(missing_ok=True)
        index.unlink(missing_ok=True)
        raise
    result.tmp, result.bytes, result.sha256 = tmp, tar.size, digest
    result.index_tmp = index
    return result


# Worker processes report progress through this queue (set by the pool initializer).
_PROGRESS: Any = None


def _init_worker(progress: Any) -> None:
    global _PROGRESS
    _PROGRESS = progress


def _pool_write_shard(job: ShardJob) -> ShardResult:
    pending = [0]

    def report(n: int) -> None:
        # Batched: one queue message per file would cost more than the file's copy.
        pending[0] += n
        if pending[0] >= 64:
            _PROGRESS.put(pending[0])
            pending[0] = 0

    try:
        return write_shard(job, report)
    finally:
        if pending[0]:
            _PROGRESS.put(pending[0])


# ---------------------------------------------------------------- running all shards


def _strict_error(result: ShardResult, root: Path) -> UserError:
    path, reason = result.skipped[0]
    return UserError(f"{root / path}: {reason} (--strict: nothing was written)")


def _drain(progress: Any, bar: tqdm) -> None:
    while True:
        try:
            bar.update(progress.get_nowait())
        except queue.Empty:
            return


def _run_pool(jobs: list[ShardJob], workers: int, bar: tqdm, done: list[ShardResult]) -> None:
    ctx = mp.get_context()
    progress = ctx.Queue()
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(progress,)
    )
    futures = [pool.submit(_pool_write_shard, job) for job in jobs]
    pending: set[Future] = set(futures)
    try:
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress, bar)
            for fut in finished:
                result = fut.result()  # a worker's error ends the run
                if jobs[0].strict and result.skipped:
                    raise _strict_error(result, jobs[0].root)
    finally:
        # Shards still being written finish first; every written one is handed back, so that
        # the caller can rename it or, on an error, remove its temporary file.
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in futures:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                done.append(fut.result())
        _drain(progress, bar)


def run_jobs(jobs: list[ShardJob], workers: int, done: list[ShardResult]) -> None:
    """Write every shard (in-process for one worker); results are appended to done as they come."""
    total = sum(it.files for job in jobs for it in job.items)
    bar = tqdm(
        total=total, unit="file", desc="shard", file=sys.stderr, disable=not sys.stderr.isatty()
    )
    workers = min(workers, len(jobs))
    try:
        if workers == 1:
            for job in jobs:
                done.append(write_shard(job, bar.update))
                if job.strict and done[-1].skipped:
                    raise _strict_error(done[-1], job.root)
        else:
            _run_pool(jobs, workers, bar, done)
    finally:
        bar.close()


# ---------------------------------------------------------------- output folder


def _check_out(out: Path, overwrite: bool) -> set[Path]:
    """Refuse a non-empty OUT without --overwrite; return the old shard files found there."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: expected an output folder, got a file")
    if not out.exists() or not any(out.iterdir()):
        return set()
    if not overwrite:
        raise UserError(
            f"{out} is not empty: choose another OUT, or pass --overwrite to replace it"
        )
    globs = (SHARD_GLOB, INDEX_GLOB, TEMP_GLOB)
    return {p for s in SPLITS for g in globs for p in (out / s).glob(g)}


def _make_dirs(out: Path) -> list[Path]:
    created = []
    for d in (out, out / "train", out / "val"):
        if not d.exists():
            d.mkdir(parents=True)
            created.append(d)
    return created


# ---------------------------------------------------------------- the command


def _shard_to_store(src: str | Path, out: Remote, overwrite: bool, kwargs: dict) -> dict:
    """`shard` into a store: refused before any work where OUT holds something and no
    --overwrite; sharded in a staging folder (TMPDIR), then published (`publish`)."""
    listed = sizes(out)
    if listed and not overwrite:
        raise UserError(
            f"{out} is not empty: choose another OUT, or pass --overwrite to replace it"
        )
    with tempfile.TemporaryDirectory(prefix="srmae-shard-") as staging:
        local = Path(staging) / "out"
        manifest = shard(src, local, **kwargs)
        publish(local, out, listed)
    return manifest


def publish(local: Path, out: Remote, listed: dict[str, int]) -> None:
    """Upload a finished shard folder to a store: its old manifest removed first (readers see
    no shards rather than old and new mixed), each shard and index one object (a store shows
    an object whole or not at all), the manifest last, then old shards it no longer names."""
    start = time.perf_counter()
    if MANIFEST in listed:
        remove(out / MANIFEST)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    objects = [name for name in files if name != MANIFEST]
    with ThreadPoolExecutor(8, thread_name_prefix="shard-upload") as pool:
        # list(): the first failed upload raises here, before the manifest is written
        list(pool.map(lambda name: put_file(local / name, out / name), objects))
    put_bytes(out / MANIFEST, (local / MANIFEST).read_bytes())
    stale = [n for n in listed if n not in files and _is_shard_object(n)]
    for name in stale:
        remove(out / name)
    mb = sum((local / n).stat().st_size for n in files) / 1e6
    logger.info("%s: %d objects, %.1f MB uploaded in %.1f s; %d old ones removed",
                out / MANIFEST, len(files), mb, time.perf_counter() - start,
                len(stale))  # fmt: skip


def _is_shard_object(name: str) -> bool:
    split, _, base = name.partition("/")
    return split in SPLITS and any(fnmatch.fnmatch(base, g) for g in (SHARD_GLOB, INDEX_GLOB))


def _check_args(val_fraction: float, shard_size: int, workers: int) -> None:
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise UserError(f"--shard-size: expected an integer >= 1, got {shard_size}")
    if workers < 1:
        raise UserError(f"--workers: expected an integer >= 1, got {workers}")


def _log_summary(out: Path, manifest: dict, seconds: float) -> None:
    skipped = manifest["skipped"]
    for entry in skipped[:10]:
        logger.warning("skipped %s: %s", entry["path"], entry["reason"])
    if len(skipped) > 10:
        logger.warning("... and %d more skipped files, listed in %s", len(skipped) - 10, MANIFEST)
    mb = sum(s["bytes"] for sp in manifest["splits"].values() for s in sp["shards"]) / 1e6
    parts = [
        f"{name} {sp['count']} samples in {len(sp['shards'])} shard(s)"
        for name, sp in manifest["splits"].items()
    ]
    logger.info(
        "%s: %s; %d file(s) skipped; %.1f MB in %.1f s (%.0f MB/s)",
        out / MANIFEST,
        ", ".join(parts),
        len(skipped),
        mb,
        seconds,
        mb / max(seconds, 1e-9),
    )


def shard(
    src: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.1,
    shard_size: int = 1000,
    workers: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    strict: bool = False,
    nonfinite: str = "refuse",
    normalise: str | None = None,
    hdu: str | None = None,
    labels: bool = False,
    storage: StorageConfig | None = None,
) -> dict:
    """Shard SRC into OUT/{train,val}/shard-NNNNNN.tar and write OUT/manifest.json; return it.
    `labels`: SRC holds a folder per class, each sample stored with its class index (`cls`).
    OUT may be a URL (s3://bucket/prefix, reached as `storage` says): the shards are written
    in a local staging folder, then uploaded one object each, the manifest last."""
    if is_url(out):
        kwargs = {"val_fraction": val_fraction, "shard_size": shard_size, "workers": workers,
                  "seed": seed, "strict": strict, "nonfinite": nonfinite,
                  "normalise": normalise, "hdu": hdu, "labels": labels}  # fmt: skip
        return _shard_to_store(src, locate(out, storage), overwrite, kwargs)
    start = time.perf_counter()
    _check_args(val_fraction, shard_size, workers)
    if normalise is not None:
        try:
            normalise = str(parse_normalisation(normalise))
        except ValueError as err:
            raise UserError(f"--normalise {err}") from None
    source = list_source(Path(src).resolve(), Path(out).resolve())
    out = Path(out)
    classes = classes_of(source, seed, val_fraction) if labels else None
    old = _check_out(out, overwrite)
    jobs = plan(source, out, seed, val_fraction, shard_size, strict, nonfinite, hdu, classes)
    created = _make_dirs(out)
    results: list[ShardResult] = []
    try:
        run_jobs(jobs, workers, results)
        if not any(r.count for r in results):
            first = min(x for r in results for x in r.skipped)
            raise UserError(
                f"{source.root}: no sample could be read (first: {first[0]}: {first[1]})"
            )
        refuse_unfit(source.root, results, normalise, classes, val_fraction)
    except BaseException:
        for r in results:
            for tmp in (r.tmp, r.index_tmp):
                if tmp:
                    tmp.unlink(missing_ok=True)
        for d in reversed(created):
            if not any(d.iterdir()):
                d.rmdir()
        raise
    args = {"seed": seed, "val_fraction": val_fraction, "shard_size": shard_size,
            "fits_hdu": hdu}  # fmt: skip
    manifest = manifest_doc(source.kind, source.root, results, args, nonfinite, normalise,
                            classes)  # fmt: skip
    commit(out, results, manifest, old)
    _log_summary(out, manifest, time.perf_counter() - start)
    return manifest

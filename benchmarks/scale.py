"""Start-up and planning at cluster scale, simulated on one machine: the manifest read and what
its broadcast costs each rank, the loader's set-up and the epoch plan of one rank (time and
memory) for 1e7 samples in 1e5 shards over 256 ranks, a resumed epoch's plan, and what
validation holds per rank.

    python -m benchmarks.scale [--samples 10000000] [--shards 100000] [--world 256] [--tiny]

Everything runs the toolkit's own code on a real manifest of empty shard files: `read_manifest`
(with its check that every shard exists), `build_loader` given the manifest as the job's main
process broadcasts it, and each DataLoader worker's set-up of `ShardStream` (its sample order
and shard segments) up to the moment it would open its first shard, where it is stopped. A
rank's workers are run one after another here (they run side by side in a job). `--tiny` runs
the same rows at 1e4 samples in 100 shards over 8 ranks, in seconds. Nothing here is a
pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from benchmarks.common import report, timed
from toolkit.core.schema import DataConfig
from toolkit.data import loader as L
from toolkit.data.format import MANIFEST, Manifest, read_manifest

logger = logging.getLogger(__name__)

TINY = {"samples": 10_000, "shards": 100, "world": 8, "val_samples": 10_000}


def write_shards(root: Path, samples: int, shards: int) -> float:
    """A manifest of `samples` train samples in `shards` empty shard files under `root` (no
    sample is read here); the size of its JSON in MB."""
    (root / "train").mkdir(parents=True)
    per, extra = divmod(samples, shards)
    entries = []
    for i in range(shards):
        name = f"train/shard-{i:06d}.tar"
        (root / name).touch()
        entries.append({"name": name, "count": per + (i < extra), "bytes": 0, "sha256": ""})
    doc = {"format": "srmae-shards/1", "kind": "paired", "channels": [1],
           "hr_size": {"min": [150, 150], "max": [150, 150]},
           "splits": {"train": {"count": samples, "shards": entries},
                      "val": {"count": 0, "shards": []}}}  # fmt: skip
    (root / MANIFEST).write_text(json.dumps(doc))
    return (root / MANIFEST).stat().st_size / 1e6


def peak_memory(fn: Callable[[], Any]) -> tuple[float, float | None]:
    """(peak MB Python and numpy allocated while `fn` ran, by tracemalloc; peak growth of the
    process's resident memory in MB, where Linux lets its high-water mark be reset)."""
    rss = _reset_peak_rss()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return peak, (_status_mb("VmHWM") - rss if rss is not None else None)


def _reset_peak_rss() -> float | None:
    """The resident MB now, with the high-water mark set to it; None where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:
        return None


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e3  # kB
    raise KeyError(field)


class _FirstRead(Exception):
    """Raised where a worker would open its first shard: its set-up is complete."""

    def __init__(self, segments: list[Any]) -> None:
        super().__init__(len(segments))
        self.segments = segments


def _stop_at_first_read(segments: list[Any], wanted: Any) -> Any:
    raise _FirstRead(segments)


def rank_loader(m: Manifest, data: DataConfig, rank: int, world: int) -> L.Loader:
    """The train loader of `rank` as a job builds it from the broadcast manifest."""
    return L.build_loader(data, "train", crop=32, seed=0, rank=rank, world_size=world,
                          manifest=m)  # fmt: skip


def worker_setup(stream: L.ShardStream, worker: int) -> int:
    """One DataLoader worker's pass set-up, as that worker runs it, up to its first read; the
    shard segments it would read."""
    with mock.patch.object(L, "get_worker_info", return_value=SimpleNamespace(id=worker)):
        try:
            next(iter(stream))
        except _FirstRead as first:
            return len(first.segments)
    raise RuntimeError("the stream was not stopped at its first read")


def plan_row(what: str, m: Manifest, data: DataConfig, world: int, skip: int,
             repeats: int) -> dict[str, Any]:  # fmt: skip
    """The epoch plan of the middle rank: every worker's set-up, timed and measured."""
    stream = rank_loader(m, data, world // 2, world).stream
    stream.start(epoch=1, skip=skip)
    stream._read = _stop_at_first_read  # type: ignore[method-assign]
    workers = range(stream.workers)
    seconds = [timed(lambda w=w: worker_setup(stream, w), repeats, warmup=1)[0] for w in workers]
    peaks = [peak_memory(lambda w=w: worker_setup(stream, w)) for w in workers]
    rss = [r for _, r in peaks if r is not None]
    return {"what": what, "ranks": world, "seconds": sum(seconds), "worker_max_s": max(seconds),
            "peak_MB": max(p for p, _ in peaks), "rss_MB": max(rss) if rss else None,
            "segments": sum(worker_setup(stream, w) for w in workers),
            "samples_per_rank": stream.plan.size}  # fmt: skip


def startup_rows(root: Path, size_mb: float, data: DataConfig, world: int,
                 repeats: int) -> tuple[Manifest, list[dict[str, Any]]]:  # fmt: skip
    """The main process's manifest read, its broadcast to a rank, and a rank's loader set-up."""
    seconds, m = timed(lambda: read_manifest(root), max(1, repeats // 3))
    peak, rss = peak_memory(lambda: read_manifest(root))
    rows = [{"what": f"manifest read + shard check ({size_mb:.3g} MB json), main process once",
             "ranks": 1, "seconds": seconds, "peak_MB": peak, "rss_MB": rss}]  # fmt: skip
    sent = pickle.dumps(m)
    seconds, _ = timed(lambda: pickle.loads(sent), repeats)
    peak, rss = peak_memory(lambda: pickle.loads(sent))
    rows.append({"what": f"manifest broadcast ({len(sent) / 1e6:.3g} MB pickled), unpickled "
                 "and held by each rank", "ranks": world, "seconds": seconds, "peak_MB": peak,
                 "rss_MB": rss})  # fmt: skip
    seconds, _ = timed(lambda: rank_loader(m, data, world // 2, world), repeats)
    peak, rss = peak_memory(lambda: rank_loader(m, data, world // 2, world))
    rows.append({"what": "loader set-up (build_loader), one rank", "ranks": world,
                 "seconds": seconds, "peak_MB": peak, "rss_MB": rss})  # fmt: skip
    return m, rows


def validation_rows(val_samples: int, world: int) -> list[dict[str, Any]]:
    """What one rank holds after validation's reduction, then and now (4 metrics per image)."""
    n_rank = -(-val_samples // world)
    keys = [f"{i:08d}" for i in range(n_rank)]
    metrics = ("loss", "mse", "psnr", "ssim")
    old_part = len(pickle.dumps((keys, {n: [0.5] * n_rank for n in metrics})))
    return [
        {"what": "validation: per-sample values held by every rank (all_gather_object)",
         "ranks": world, "peak_MB": old_part * world / 1e6},
        {"what": "validation now: held by rank 0 (float64 tensor + keys)", "ranks": 1,
         "peak_MB": (val_samples * 4 * 8 + len(pickle.dumps(keys)) * world) / 1e6},
        {"what": "validation now: held by any other rank (its own share)", "ranks": 1,
         "peak_MB": n_rank * 4 * 8 / 1e6},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--world", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--val-samples", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="1e4 samples in 100 shards over 8 ranks: the same rows in seconds",
    )
    p.add_argument("--out", default="benchmarks/results/scale.json")
    a = p.parse_args(argv)
    if a.tiny:
        for key, value in TINY.items():
            setattr(a, key, value)
    logging.getLogger("toolkit").setLevel(logging.WARNING)  # the loader's padding note
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size_mb = write_shards(root, a.samples, a.shards)
        data = DataConfig(shards=str(root), batch_size=a.batch, num_workers=a.workers)
        m, rows = startup_rows(root, size_mb, data, a.world, a.repeats)
        per_rank_batches = -(-a.samples // a.world) // a.batch
        for what, world, skip in (
            ("epoch plan, one rank (its workers' set-up)", a.world, 0),
            ("resumed epoch plan (half done), one rank", a.world, per_rank_batches // 2),
            ("epoch plan, the whole set on one rank", 1, 0),
        ):
            rows.append(plan_row(what, m, data, world, skip, a.repeats))
    rows += validation_rows(a.val_samples, a.world)
    logger.info("measured in %.0f s", time.perf_counter() - start)
    report(
        f"scale: {a.samples:,} samples in {a.shards:,} shards over {a.world} ranks, {a.workers} "
        f"workers per rank, batch {a.batch}; validation of {a.val_samples:,} samples",
        rows, a.out, samples=a.samples, shards=a.shards, world=a.world, workers=a.workers,
        batch=a.batch, val_samples=a.val_samples, tiny=a.tiny,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

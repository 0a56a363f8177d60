"""Start-up and planning at cluster scale, simulated on one machine: the epoch plan of one rank
(time and memory) for 1e7 samples in 1e5 shards over 256 ranks, a resumed epoch's plan, the
manifest read, and what validation and checkpoint discovery send or touch per rank.

    python -m benchmarks.scale [--samples 10000000] [--shards 100000] [--world 256]

The plan is what every DataLoader worker computes at each epoch start (ShardStream's set-up up
to its first read), run for the workers of one rank; the previous implementation of the shard
lookup (a scan of the shard list from its start for every segment) is kept below as the
baseline. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.common import report
from toolkit.data import plan as P
from toolkit.data.format import Manifest, Shard, read_manifest


def old_segments(order: list[Shard], lo: int, hi: int) -> list[P.Segment]:
    """The shard lookup before bisection: every segment scans the shard list from its start."""
    total = sum(s.count for s in order)
    out, pos = [], lo
    while pos < hi:
        offset = pos % total
        for shard in order:
            if offset < shard.count:
                take = min(shard.count - offset, hi - pos)
                out.append(P.Segment(shard, offset, offset + take, pos))
                pos += take
                break
            offset -= shard.count
    return out


def fake_manifest(samples: int, shards: int) -> Manifest:
    counts = np.full(shards, samples // shards)
    counts[: samples % shards] += 1
    items = tuple(Shard(f"train/shard-{i:06d}.tar", int(c), Path(f"/x/{i}")) for i, c in
                  enumerate(counts))  # fmt: skip
    return Manifest(Path("/x"), "paired", (1,), (150, 150), {"train": items, "val": ()})


def worker_plan(m: Manifest, rank: int, world: int, workers: int, batch: int, skip: int,
                segments=P.segments) -> int:  # fmt: skip
    """What each worker of `rank` computes before its first read; the segments found."""
    plan = P.rank_plan(m.count("train"), batch, rank, world, True)
    found = 0
    counts = P.split_even(plan.batches, workers)
    done, _ = P.resume_point(skip, counts)
    b0 = 0
    for w, count in enumerate(counts):
        lo = plan.lo + b0 * batch
        hi = min(lo + count * batch, plan.lo + plan.size)
        b0 += count
        order = P.buffered_shuffle(np.arange(lo, hi), 1000, np.random.default_rng([0, 1, rank, w]))
        todo = order[done[w] * batch :]
        wanted = np.zeros(hi - lo, dtype=bool)
        wanted[todo - lo] = True
        shards = P.shard_order(m.splits["train"], 0, 1, True)
        found += len(segments(shards, int(todo.min()), int(todo.max()) + 1))
    return found


def measured(fn) -> tuple[float, float, object]:
    """(seconds, peak MB allocated by Python meanwhile, result)."""
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--world", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--val-samples", type=int, default=1_000_000)
    p.add_argument("--out", default="benchmarks/results/scale.json")
    a = p.parse_args(argv)
    m = fake_manifest(a.samples, a.shards)
    per_rank = -(-a.samples // a.world)
    rows = []
    for label, world, skip, segs in (
        ("epoch plan, one rank", a.world, 0, P.segments),
        ("epoch plan, one rank, old shard lookup", a.world, 0, old_segments),
        ("resumed epoch plan (half done), one rank", a.world, per_rank // a.batch // 2,
         P.segments),
        ("epoch plan, the whole set on one rank", 1, 0, P.segments),
    ):  # fmt: skip
        seconds, peak, found = measured(
            lambda w=world, s=skip, g=segs: worker_plan(m, w // 2, w, a.workers, a.batch, s, g)
        )
        rows.append({"what": label, "ranks": world, "seconds": seconds, "peak_MB": peak,
                     "segments": found, "samples_per_rank": -(-a.samples // world)})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "train").mkdir()
        entries = []
        for s in m.splits["train"]:
            (root / s.name).touch()
            entries.append({"name": s.name, "count": s.count, "bytes": 0, "sha256": ""})
        doc = {"format": "srmae-shards/1", "kind": "paired", "channels": [1],
               "hr_size": {"min": [150, 150], "max": [150, 150]},
               "splits": {"train": {"count": a.samples, "shards": entries},
                          "val": {"count": 0, "shards": []}}}  # fmt: skip
        (root / "manifest.json").write_text(json.dumps(doc))
        seconds, peak, _ = measured(lambda: read_manifest(root))
        size = (root / "manifest.json").stat().st_size / 1e6
        rows.append({"what": f"manifest read + shard check ({size:.1f} MB json), rank 0 only",
                     "ranks": 1, "seconds": seconds, "peak_MB": peak})  # fmt: skip
    # Validation: what one rank holds after the reduction, then and now (4 metrics per image).
    n_rank = -(-a.val_samples // a.world)
    keys = [f"{i:08d}" for i in range(n_rank)]
    old_part = len(
        pickle.dumps((keys, {n: [0.5] * n_rank for n in ("loss", "mse", "psnr", "ssim")}))
    )
    rows.append({"what": "validation: per-sample values held by every rank (all_gather_object)",
                 "ranks": a.world, "peak_MB": old_part * a.world / 1e6})  # fmt: skip
    rows.append(
        {
            "what": "validation now: held by rank 0 (float64 tensor + keys)",
            "ranks": 1,
            "peak_MB": (a.val_samples * 4 * 8 + len(pickle.dumps(keys)) * a.world) / 1e6,
        }
    )
    rows.append({"what": "validation now: held by any other rank (its own share)", "ranks": 1,
                 "peak_MB": n_rank * 4 * 8 / 1e6})  # fmt: skip
    report(
        f"scale: {a.samples:,} samples in {a.shards:,} shards over {a.world} ranks, {a.workers} "
        f"workers per rank, batch {a.batch}; validation of {a.val_samples:,} samples",
        rows, a.out, samples=a.samples, shards=a.shards, world=a.world,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

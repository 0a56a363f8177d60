"""Data-path benchmark: the loader against a plain read+decode loop, sharding against `tar cf`."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import report, timed
from toolkit.data.loader import build_loader
from toolkit.data.sources import decode
from toolkit.recipe import DataConfig
from toolkit.shard import shard

logger = logging.getLogger("benchmarks.data")


def make_pairs(root: Path, count: int, hr: int = 150, scale: int = 2) -> None:
    """Lensing-sized float32 pairs (150x150 / 75x75), random content: decode cost is what counts."""
    rng = np.random.default_rng(0)
    (root / "hr").mkdir(parents=True)
    (root / "lr").mkdir()
    for i in range(count):
        np.save(root / "hr" / f"{i:06d}.npy", rng.random((hr, hr), dtype=np.float32))
        np.save(root / "lr" / f"{i:06d}.npy", rng.random((hr // scale,) * 2, dtype=np.float32))


def plain_loop(src: Path, batch: int) -> int:
    """The floor: read and decode the same files from a folder, batch them, nothing else."""
    n, hrs, lrs = 0, [], []
    for path in sorted((src / "hr").iterdir()):
        hrs.append(torch.from_numpy(decode(path.read_bytes(), "npy")))
        lrs.append(torch.from_numpy(decode((src / "lr" / path.name).read_bytes(), "npy")))
        if len(hrs) == batch:
            torch.stack(hrs), torch.stack(lrs)
            n, hrs, lrs = n + batch, [], []
    return n + len(hrs)


def loader_epoch(shards: Path, batch: int, workers: int) -> int:
    cfg = DataConfig(shards=str(shards), batch_size=batch, num_workers=workers)
    return sum(len(b["key"]) for b in build_loader(cfg, "train", crop=150, seed=0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=2000, help="LR/HR pairs to generate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/data.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src, shards = Path(tmp) / "src", Path(tmp) / "shards"
        make_pairs(src, args.count)
        mb = sum(f.stat().st_size for f in src.rglob("*.npy")) / 1e6

        def do_shard(workers: int) -> Callable[[], int]:
            return lambda: shard(
                src, shards, val_fraction=0.0, shard_size=500, workers=workers, overwrite=True
            )["splits"]["train"]["count"]

        def do_tar() -> int:
            tar = Path(tmp) / "all.tar"
            subprocess.run(["tar", "cf", str(tar), "-C", str(src), "."], check=True)
            tar.unlink()
            return args.count

        t_tar, _ = timed(do_tar, args.repeats)
        for w in (1, 2):
            t_shard, n = timed(do_shard(w), args.repeats)
            rows.append(
                {
                    "case": f"shard, {w} worker(s)",
                    "seconds": t_shard,
                    "items_per_s": n / t_shard,
                    "baseline": "tar cf",
                    "baseline_s": t_tar,
                    "ratio": t_tar / t_shard,
                    "goal": 0.5,
                }
            )
        t_plain, n_plain = timed(lambda: plain_loop(src, args.batch), args.repeats)
        t_load, n_load = timed(lambda: loader_epoch(shards, args.batch, 1), args.repeats)
        assert n_plain == n_load == args.count
        rows.append(
            {
                "case": "loader, 1 worker",
                "seconds": t_load,
                "items_per_s": n_load / t_load,
                "baseline": "read+decode loop",
                "baseline_s": t_plain,
                "ratio": t_plain / t_load,
                "goal": 0.9,
            }
        )
        shutil.rmtree(shards, ignore_errors=True)
    report(
        f"data benchmark: {args.count} LR/HR pairs ({mb:.0f} MB), median of {args.repeats} runs; "
        "ratio = baseline time / our time (goals: loader >= 0.9, shard >= 0.5)",
        rows,
        args.out,
        count=args.count,
        megabytes=mb,
        repeats=args.repeats,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loader vs webdataset and a plain read+decode loop, writer vs ShardWriter, alternating rounds."""

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

from benchmarks.common import alternating, paired, report
from toolkit.data.loader import build_loader
from toolkit.data.sharding import shard
from toolkit.data.sources import decode
from toolkit.runs.recipe import DataConfig

logger = logging.getLogger("benchmarks.data")

WORKERS = (0, 1, 2)
WRITER_GOAL = 1.5  # against ShardWriter, with every check the writer makes
LOADER_GOAL = 1.0  # against webdataset's pipeline at the same worker count
PLAIN_GOAL = {1: 0.8, 2: 0.8}  # against the plain loop, where workers hand batches over


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
    loader = build_loader(cfg, "train", crop=150, seed=0)
    n = sum(len(b["key"]) for b in loader)
    loader.close()
    return n


def _wds_sample(sample: dict) -> dict:
    """The toolkit's decode of one webdataset sample: float32 [C, H, W] tensors."""
    return {
        "key": sample["__key__"],
        "hr": torch.from_numpy(decode(sample["hr.npy"], "npy")),
        "lr": torch.from_numpy(decode(sample["lr.npy"], "npy")),
    }


def webdataset_epoch(shards: Path, batch: int, workers: int) -> int:
    """webdataset's own reader over the same tars: WebDataset -> the same decode -> batches,
    through its WebLoader (each worker takes whole shards)."""
    import webdataset as wds

    urls = sorted(str(p) for p in (shards / "train").glob("shard-*.tar"))
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .map(_wds_sample)
        .batched(batch, collation_fn=torch.utils.data.default_collate)
    )
    return sum(len(b["key"]) for b in wds.WebLoader(ds, batch_size=None, num_workers=workers))


def shardwriter_run(src: Path, out: Path, shard_size: int) -> int:
    """webdataset's ShardWriter writing the same files as shards (bytes as they are)."""
    import webdataset as wds

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    n = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for path in sorted((src / "hr").iterdir()):
            sink.write({"__key__": path.stem, "hr.npy": path.read_bytes(),
                        "lr.npy": (src / "lr" / path.name).read_bytes()})  # fmt: skip
            n += 1
    return n


ROW_KEYS = ("case", "baseline", "seconds", "baseline_s", "ratio", "ratio_min", "ratio_max",
            "rounds", "goal", "items_per_s")  # fmt: skip


def row(case: str, n: int, baseline: str, stats: dict[str, float], goal: float | None) -> dict:
    """One comparison from `paired`: ratio = the baseline's time / ours per round (above 1: ours
    is faster), its median and spread over the rounds; seconds are medians."""
    out = {"case": case, "baseline": baseline, **stats, "goal": goal,
           "items_per_s": n / stats["seconds"]}  # fmt: skip
    return {k: out[k] for k in ROW_KEYS}


def counted(fn: Callable[[], int], expected: int) -> Callable[[], int]:
    """`fn`, checked to have handled every item (a side that drops some is not faster)."""

    def run() -> int:
        n = fn()
        if n != expected:
            raise RuntimeError(f"handled {n} items, expected {expected}")
        return n

    return run


def writer_rows(src: Path, tmp: Path, args: argparse.Namespace) -> list[dict]:
    """toolkit.shard (1 and 2 workers) against ShardWriter and `tar cf`, in alternating rounds."""

    def do_shard(workers: int) -> int:
        m = shard(src, tmp / f"shard{workers}", val_fraction=0.0, shard_size=args.shard_size,
                  workers=workers, overwrite=True)  # fmt: skip
        return m["splits"]["train"]["count"]

    def do_tar() -> int:
        tar = tmp / "all.tar"
        subprocess.run(["tar", "cf", str(tar), "-C", str(src), "."], check=True)
        tar.unlink()
        return args.count

    cases = {
        "ShardWriter": lambda: shardwriter_run(src, tmp / "wds", args.shard_size),
        "shard1": lambda: do_shard(1),
        "shard2": lambda: do_shard(2),
        "tar": do_tar,
    }
    times = alternating({k: counted(fn, args.count) for k, fn in cases.items()}, args.repeats,
                        args.warmup)  # fmt: skip
    rows = []
    for w in (1, 2):
        ours = times[f"shard{w}"]
        for base, name, goal in (("ShardWriter", "webdataset ShardWriter", WRITER_GOAL),
                                 ("tar", "tar cf", None)):  # fmt: skip
            rows.append(row(f"shard, {w} worker(s)", args.count, name, paired(times[base], ours),
                            goal))  # fmt: skip
    return rows


def loader_rows(src: Path, shards: Path, args: argparse.Namespace) -> list[dict]:
    """The loader at 0, 1 and 2 workers against webdataset's pipeline at as many and against
    the plain read+decode loop, in alternating rounds."""
    cases: dict[str, Callable[[], int]] = {"plain": lambda: plain_loop(src, args.batch)}
    for w in WORKERS:
        cases[f"loader{w}"] = lambda w=w: loader_epoch(shards, args.batch, w)
        cases[f"wds{w}"] = lambda w=w: webdataset_epoch(shards, args.batch, w)
    times = alternating({k: counted(fn, args.count) for k, fn in cases.items()}, args.repeats,
                        args.warmup)  # fmt: skip
    rows = []
    for w in WORKERS:
        ours = times[f"loader{w}"]
        rows.append(row(f"loader, {w} worker(s)", args.count,
                        f"WebDataset + WebLoader, {w} worker(s)", paired(times[f"wds{w}"], ours),
                        LOADER_GOAL))  # fmt: skip
        rows.append(row(f"loader, {w} worker(s)", args.count, "read+decode loop",
                        paired(times["plain"], ours), PLAIN_GOAL.get(w)))  # fmt: skip
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=2000, help="LR/HR pairs to generate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (medians of these)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a smoke run: 64 pairs, 2 rounds, no warm-up (the same report)",
    )
    p.add_argument("--out", default="benchmarks/results/data.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.count, args.batch, args.shard_size, args.repeats, args.warmup = 64, 16, 16, 2, 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        src, shards = Path(tmp) / "src", Path(tmp) / "shards"
        make_pairs(src, args.count)
        mb = sum(f.stat().st_size for f in src.rglob("*.npy")) / 1e6
        rows = writer_rows(src, Path(tmp), args)
        # The loader's shards: the same files, written once by the writer measured above.
        shard(src, shards, val_fraction=0.0, shard_size=args.shard_size, workers=1)
        rows += loader_rows(src, shards, args)
    report(
        f"data benchmark: {args.count} LR/HR pairs ({mb:.0f} MB), batches of {args.batch}; "
        f"{args.repeats} alternating rounds (after {args.warmup} untimed): ratio = baseline "
        "time / ours per round, its median and spread [ratio_min, ratio_max]; seconds are "
        "medians",
        rows,
        args.out,
        count=args.count,
        megabytes=mb,
        batch=args.batch,
        shard_size=args.shard_size,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    missed = [f"{r['case']} vs {r['baseline']}: {r['ratio']:.2f} < {r['goal']}" for r in rows
              if r["goal"] is not None and r["ratio"] < r["goal"]]  # fmt: skip
    for line in missed:
        logger.warning("goal missed: %s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

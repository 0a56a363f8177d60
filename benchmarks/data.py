"""Data-path benchmark: the loader against webdataset's own pipeline (WebDataset + WebLoader, the
same decode) at 0, 1 and 2 workers and against a plain read+decode loop; sharding against
webdataset's ShardWriter writing the same files, and against `tar cf`."""

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
from toolkit.data.sharding import shard
from toolkit.data.sources import decode
from toolkit.runs.recipe import DataConfig

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


def row(case: str, seconds: float, n: int, baseline: str, base_s: float, goal: float | None):
    """One comparison: ratio = the baseline's time / ours (above 1: ours is faster)."""
    return {"case": case, "seconds": seconds, "items_per_s": n / seconds, "baseline": baseline,
            "baseline_s": base_s, "ratio": base_s / seconds, "goal": goal}  # fmt: skip


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
        t_writer, n_writer = timed(
            lambda: shardwriter_run(src, Path(tmp) / "wds", 500), args.repeats
        )
        assert n_writer == args.count
        for w in (1, 2):
            t_shard, n = timed(do_shard(w), args.repeats)
            for baseline, t_base, goal in (("webdataset ShardWriter", t_writer, 1.0),
                                           ("tar cf", t_tar, None)):  # fmt: skip
                rows.append(row(f"shard, {w} worker(s)", t_shard, n, baseline, t_base, goal))
        t_plain, n_plain = timed(lambda: plain_loop(src, args.batch), args.repeats)
        for w in (0, 1, 2):
            t_load, n_load = timed(lambda w=w: loader_epoch(shards, args.batch, w), args.repeats)
            t_wds, n_wds = timed(lambda w=w: webdataset_epoch(shards, args.batch, w), args.repeats)
            assert n_plain == n_load == n_wds == args.count
            rows.append(row(f"loader, {w} worker(s)", t_load, n_load,
                            f"WebDataset + WebLoader, {w} worker(s)", t_wds, 1.0))  # fmt: skip
            rows.append(row(f"loader, {w} worker(s)", t_load, n_load, "read+decode loop",
                            t_plain, None))  # fmt: skip
        shutil.rmtree(shards, ignore_errors=True)
    report(
        f"data benchmark: {args.count} LR/HR pairs ({mb:.0f} MB), median of {args.repeats} runs; "
        "ratio = baseline time / our time (goal: >= 1.0 against webdataset's reader and writer)",
        rows,
        args.out,
        count=args.count,
        megabytes=mb,
        repeats=args.repeats,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

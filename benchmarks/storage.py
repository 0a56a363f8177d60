"""The loader reading shards from an S3 server on the loopback interface (moto), from local disk,
and webdataset reading the same bucket by URL: throughput at 0/1/2 workers, and the bytes an
epoch and a resumed epoch ask the store for against what their samples occupy."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import alternating, paired, report
from benchmarks.data import WORKERS, _wds_sample, counted, loader_epoch, make_pairs
from toolkit.core.schema import StorageConfig
from toolkit.data import storage
from toolkit.data.format import read_manifest
from toolkit.data.loader import build_loader
from toolkit.data.sharding import shard
from toolkit.runs.recipe import DataConfig

logger = logging.getLogger("benchmarks.storage")
BUCKET = "bench"
# Credentials of the benchmark's own server (moto accepts any): set here, in this process's
# environment only, where botocore and the loader's workers find them as a user's would.
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
       "AWS_CONFIG_FILE": "/nonexistent",
       "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}  # fmt: skip
ROW_KEYS = ("case", "baseline", "seconds", "baseline_s", "ratio", "ratio_min", "ratio_max",
            "rounds", "items_per_s")  # fmt: skip


def start_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own (not a thread of this one, whose loader it
    would slow), on a free loopback port; its endpoint once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import logging, time; from moto.server import ThreadedMotoServer; "
            "logging.getLogger('werkzeug').setLevel(logging.WARNING); "
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}).start(); "
            "time.sleep(1e9)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the moto server did not start in 60 s")


def webdataset_urls(url: str, endpoint: str) -> list[str]:
    """webdataset's way into a bucket without the aws CLI: a presigned https URL per shard,
    which it reads through curl (`pipe:curl`), each object whole."""
    import shlex

    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, config=Config(signature_version="s3v4"))
    manifest = read_manifest(url, StorageConfig(endpoint_url=endpoint))
    keys = [f"set/{s.name}" for s in manifest.splits["train"]]
    return [
        "pipe:curl -s -f " + shlex.quote(client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": k}, ExpiresIn=24 * 3600))
        for k in keys
    ]  # fmt: skip


def webdataset_epoch(urls: list[str], batch: int, workers: int) -> int:
    import webdataset as wds

    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .map(_wds_sample)
        .batched(batch, collation_fn=torch.utils.data.default_collate)
    )
    return sum(len(b["key"]) for b in wds.WebLoader(ds, batch_size=None, num_workers=workers))


def s3_epoch(url: str, endpoint: str, batch: int, workers: int) -> int:
    cfg = DataConfig(shards=url, batch_size=batch, num_workers=workers,
                     storage_options=StorageConfig(endpoint_url=endpoint))  # fmt: skip
    loader = build_loader(cfg, "train", crop=150, seed=0)
    n = sum(len(b["key"]) for b in loader)
    loader.close()
    return n


def speed_rows(local: Path, url: str, endpoint: str, args: argparse.Namespace) -> list[dict]:
    urls = webdataset_urls(url, endpoint)
    cases: dict[str, Callable[[], int]] = {}
    for w in WORKERS:
        cases[f"disk{w}"] = lambda w=w: loader_epoch(local, args.batch, w)
        cases[f"s3{w}"] = lambda w=w: s3_epoch(url, endpoint, args.batch, w)
        cases[f"wds{w}"] = lambda w=w: webdataset_epoch(urls, args.batch, w)
    times = alternating({k: counted(fn, args.count) for k, fn in cases.items()}, args.repeats,
                        args.warmup)  # fmt: skip
    rows = []
    for w in WORKERS:
        for base, name in ((f"disk{w}", "loader, local disk"),
                           (f"wds{w}", "webdataset, presigned URLs (curl)")):  # fmt: skip
            stats = paired(times[base], times[f"s3{w}"])
            out = {"case": f"loader from S3, {w} worker(s)", "baseline": f"{name}, {w} worker(s)",
                   **stats, "items_per_s": args.count / stats["seconds"]}  # fmt: skip
            rows.append({k: out[k] for k in ROW_KEYS})
    return rows


def byte_rows(local: Path, url: str, endpoint: str, args: argparse.Namespace) -> list[dict]:
    """What the store is asked for (this process, no worker: its own counters), against what
    the samples delivered occupy in their shards (from the shards' indexes)."""
    cfg = DataConfig(shards=url, batch_size=args.batch, num_workers=0,
                     storage_options=StorageConfig(endpoint_url=endpoint))  # fmt: skip
    manifest = read_manifest(url, cfg.storage_options)
    spans = {}
    for s in manifest.splits["train"]:
        index = json.loads((local / s.name.replace(".tar", ".idx")).read_text())["samples"]
        keys = _keys(local / s.name)
        spans.update({k: n for k, (_, n, _) in zip(keys, index, strict=True)})
    whole = sum(s.size for s in manifest.splits["train"])

    def epoch(state: dict | None = None, stop: int | None = None) -> tuple[list[str], int, dict]:
        loader = build_loader(cfg, "train", crop=150, seed=0)
        if state is not None:
            loader.load_state_dict(state)
        before, keys = storage.COUNTS.ranged, []
        for i, b in enumerate(loader):
            keys += list(b["key"])
            if stop is not None and i + 1 == stop:
                break
        return keys, storage.COUNTS.ranged - before, loader.state_dict()

    keys, full, _ = epoch()
    half = -(-len(keys) // args.batch) // 2
    _, _, state = epoch(stop=half)
    rest, resumed, _ = epoch(state=state)
    rows = [
        {"case": "loader, one epoch", "requested_bytes": full,
         "samples_bytes": sum(spans[k] for k in keys), "shards_bytes": whole},
        {"case": f"loader, resumed after {half} of {-(-len(keys) // args.batch)} batches",
         "requested_bytes": resumed, "samples_bytes": sum(spans[k] for k in rest),
         "shards_bytes": whole},
        {"case": "webdataset, one epoch or a restart (whole objects)", "requested_bytes": whole,
         "samples_bytes": sum(spans[k] for k in keys), "shards_bytes": whole},
    ]  # fmt: skip
    return rows


def _keys(tar: Path) -> list[str]:
    """Sample keys of a shard in order (with Python's tarfile: not the code measured)."""
    import tarfile

    out: list[str] = []
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            key = m.name.split(".")[0]
            if not out or out[-1] != key:
                out.append(key)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=1000, help="LR/HR pairs to generate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (medians of these)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--tiny", action="store_true",
                   help="a smoke run: 64 pairs, 2 rounds, no warm-up")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results/storage.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.count, args.batch, args.shard_size, args.repeats, args.warmup = 64, 16, 16, 2, 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.update(ENV)
    server, endpoint = start_server()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            src, local = Path(tmp) / "src", Path(tmp) / "shards"
            make_pairs(src, args.count)
            shard(src, local, val_fraction=0.0, shard_size=args.shard_size)
            url = f"s3://{BUCKET}/set"
            shard(src, url, val_fraction=0.0, shard_size=args.shard_size,
                  storage=StorageConfig(endpoint_url=endpoint))  # fmt: skip
            mb = sum(f.stat().st_size for f in local.rglob("*.tar")) / 1e6
            rows = speed_rows(local, url, endpoint, args)
            rows += byte_rows(local, url, endpoint, args)
    finally:
        server.kill()
        server.wait()
    report(
        f"storage benchmark: {args.count} LR/HR pairs in {mb:.0f} MB of shards of "
        f"{args.shard_size}, batches of {args.batch}, an S3 server (moto) on the loopback "
        f"interface; {args.repeats} alternating rounds (after {args.warmup} untimed): ratio = "
        "baseline time / S3 time per round (above 1: S3 is faster), its median and spread; "
        "seconds are medians. Bytes: what the store was asked for, what the delivered samples "
        "occupy in their shards, and the shards' total",
        rows,
        args.out,
        count=args.count,
        megabytes=mb,
        batch=args.batch,
        shard_size=args.shard_size,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

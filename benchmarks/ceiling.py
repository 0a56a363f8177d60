"""Benchmark: what a perfect super-resolution scores on simulated shards, the ceiling the noise
leaves every metric of the SR table and its physics table.

    python -m benchmarks.ceiling [SHARDS] [--split val] [--seed 0]
                                 [--out benchmarks/results/ceiling.json]

For each sample of SHARDS' split (shards of `python -m toolkit.simulate` output: keys are system
indices), the simulator renders the same system again without noise (`simulate_system(...,
noise=False)`), and the SR task's metrics score that noiseless HR as the model's output against
the noisy HR and LR the shards hold, with the PSFs the simulator recorded. A model that matched
it would be perfect; the noise in HR and LR is what keeps it from PSNR 100, power ratio 1, and
LR consistency 100. Run it on the demo's shards (`data/demo/shards`, seed 0) for the ceiling of
the demo's tables. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import report
from toolkit.core.metrics import image_metrics
from toolkit.core.seen import Seen, Truth
from toolkit.data.degrade import degrade
from toolkit.data.format import member, read_manifest, read_samples
from toolkit.data.loader import psf_sigmas
from toolkit.data.sources import decode
from toolkit.tasks.sr import PHYSICS

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("mse", "psnr", "ssim", *PHYSICS)


def ceiling(shards: Path, split: str, seed: int) -> dict[str, list[float]]:
    """Each metric of the noiseless HR, per sample of the split."""
    from toolkit.data.sim.lensing import simulate_system

    manifest = read_manifest(shards)
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    for shard in manifest.splits[split]:
        with open(shard.path, "rb") as f:
            samples = [x for _, x in read_samples(f, 0, shard.count, lambda _: True)]
        for sample in samples:
            assert sample is not None
            hr = torch.from_numpy(decode(*member(sample, "hr"), manifest.fits_hdu))[None].double()
            lr = torch.from_numpy(decode(*member(sample, "lr"), manifest.fits_hdu))[None].double()
            scale = hr.shape[-1] // lr.shape[-1]
            _, clean, _ = simulate_system(np.random.default_rng([seed, int(sample["__key__"])]),
                                          noise=False)  # fmt: skip
            psf = psf_sigmas(sample.get("json"), scale)[None].double()
            truth = Truth(hr, lr, psf, degrade=lambda x, s=scale: degrade(x, s, clamp=False),
                          scale=scale, saturated=hr >= 1)  # fmt: skip
            got = image_metrics(METRICS, Seen(torch.from_numpy(clean)[None, None], truth))
            for name in METRICS:
                values[name].append(got[name].item())
    return values


def tiny_shards(root: Path, seed: int) -> Path:
    """Four simulated systems sharded, half of them in the val split (what `--tiny` scores)."""
    from toolkit.data.sharding import shard
    from toolkit.data.sim.write import generate

    generate(root / "raw", 4, seed=seed)
    shard(root / "raw", root / "shards", val_fraction=0.5, seed=0)
    return root / "shards"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shards", type=Path, nargs="?", default=Path("data/demo/shards"))
    p.add_argument("--split", default="val")
    p.add_argument("--seed", type=int, default=0, help="the seed the data was simulated with")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ceiling.json"))
    p.add_argument("--tiny", action="store_true", help="4 systems simulated here: it works")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.shards = tiny_shards(Path(tmp), args.seed)
        values = ceiling(args.shards, args.split, args.seed)
    count = len(values["psnr"])
    rows = [{"metric": name, "noiseless HR": float(np.mean(v))} for name, v in values.items()]
    report(f"the noiseless HR on {args.shards} ({args.split}, {count} samples)", rows, args.out,
           count=count)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the report's bootstrap intervals on a large validation set.

    python -m benchmarks.bootstrap [--samples 100000] [--resamples 1000] [--repeats 3]
                                   [--out benchmarks/results/bootstrap.json]

What one table row and one pair cost: the interval of the SR metrics (3 means), of a paired
difference of two SR runs (6 means on one draw), and of the classification statistic
(accuracy, micro and macro one-vs-rest AUC of 3 classes, resampled within each class), on
synthetic per-sample values. Median wall time of `--repeats`. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import report, timed
from toolkit.core import stats

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bootstrap.json"))
    p.add_argument("--tiny", action="store_true", help="1,000 samples, 50 resamples: it works")
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.resamples, args.repeats = 1000, 50, 1
    n, r = args.samples, args.resamples
    rng = np.random.default_rng(0)
    sr = np.stack([rng.gamma(2, 1e-3, n), 30 + rng.gamma(2, 1.5, n), rng.beta(20, 2, n)], 1)
    other = sr + rng.normal(0, 0.01, sr.shape)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), labels] += 1.0
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    hits = (scores.argmax(1) == labels).astype(np.float64)[:, None]
    cases = {
        "SR row (MSE, PSNR, SSIM)": (stats.mean_statistic(sr), None),
        "SR pair A - B (same draw)": (
            stats.difference(stats.mean_statistic(sr), stats.mean_statistic(other)),
            None,
        ),
        "classify row (accuracy, AUC micro, macro)": (
            stats.concat(stats.mean_statistic(hits), stats.auc_statistic(scores, labels)),
            labels,
        ),
    }
    rows = []
    for name, (statistic, strata) in cases.items():
        seconds, iv = timed(
            lambda s=statistic, st=strata: stats.bootstrap(s, n, st, resamples=r), args.repeats
        )
        rows.append({"case": name, "samples": n, "resamples": r, "seconds": seconds,
                     "widths": " ".join(f"{w:.3g}" for w in iv.high - iv.low)})  # fmt: skip
    report("bootstrap: one interval (median s) over samples x resamples", rows, args.out,
           chunk_cells=stats.CHUNK_CELLS)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

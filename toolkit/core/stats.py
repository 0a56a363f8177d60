"""Bootstrap intervals over validation samples: a run's metrics, a group of seeds, two runs paired.

A resample is a `Draw`: ``[R, N]`` sample indices, one row per resample, drawn with replacement.
A statistic maps a draw to ``[R, M]`` values; the point estimate is its value on the sample
itself (one row, 0..N-1). One draw serves every metric, every run of a seed group and both runs
of a pair: a paired difference is the difference of two statistics of the same draw. Means are
the draw's multiplicities (a bincount) times the values, one matrix product for all columns; an
AUC is the Mann-Whitney U of the draw, from scores sorted once: a cumulative sum of the drawn
negatives' multiplicities in score order, read at each positive's place (no sort per resample).

Intervals are percentile intervals (the 2.5% and 97.5% quantiles of the statistic over the
resamples, linearly interpolated as `np.quantile` does), from a `numpy.random.Generator` seeded
with `SEED`: the same values give the same interval on every machine and in every report.
Classification resamples within each class (stratified), so every resample keeps the class
counts and every per-class AUC stays defined.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.core.atomic import write_atomic
from toolkit.core.errors import UserError

logger = logging.getLogger(__name__)

SEED = 20_240_917  # fixed: an interval is a function of the values alone
RESAMPLES = 1000
LEVEL = 0.95
# Draws per chunk (resamples x samples): bounds the memory of a chunk (its indices and
# multiplicities, a micro AUC's cumulative sums over its K N pairs per resample) to a few MB at any
# N: larger chunks were slower (page faults of fresh 100 MB arrays, measured with
# benchmarks/bootstrap.py), and at 1e5 samples the 500 chunks' Python overhead is negligible.
# Changing it changes the draws (the generator's calls), hence the intervals' last digits.
CHUNK_CELLS = 1 << 18


class Draw:
    """Bootstrap resamples: `index` [R, N] sample indices (row r: resample r)."""

    def __init__(self, index: np.ndarray, n: int) -> None:
        self.index, self.n = index, n
        self._counts: np.ndarray | None = None
        self._weights: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.index)

    @property
    def counts(self) -> np.ndarray:
        """[R, N] int64: how often each sample was drawn in each resample (rows sum to N)."""
        if self._counts is None:
            self._counts = self.bincount(self.index, self.n)
        return self._counts

    @property
    def weights(self) -> np.ndarray:
        """`counts` as float64, for the means' matrix product."""
        if self._weights is None:
            self._weights = self.counts.astype(np.float64)
        return self._weights

    def bincount(self, codes: np.ndarray, size: int) -> np.ndarray:
        """Per resample, how often each of `size` codes occurs in `codes` [R, ...] (ints in
        [0, size)): one bincount for the whole chunk, row r shifted into [r size, (r+1) size)."""
        shifted = codes.reshape(self.rows, -1) + (np.arange(self.rows) * size)[:, None]
        counts = np.bincount(shifted.ravel(), minlength=self.rows * size)
        return counts.reshape(self.rows, size)


Statistic = Callable[[Draw], np.ndarray]  # a draw of R resamples -> values [R, M]


@dataclass(frozen=True)
class Interval:
    """A statistic's value on the sample (`point`) and its bootstrap interval, each ``[M]``."""

    point: np.ndarray
    low: np.ndarray
    high: np.ndarray


def draws(
    n: int, resamples: int, rng: np.random.Generator, strata: np.ndarray | None = None
) -> Iterator[Draw]:
    """Resamples in chunks of at most `CHUNK_CELLS` draws: each of n draws with replacement,
    within each stratum (as many draws from a stratum as it has samples) where `strata` [n] is
    given."""
    groups = (
        None
        if strata is None
        else [np.flatnonzero(strata == s).astype(np.int32) for s in np.unique(strata)]
    )
    rows = max(1, CHUNK_CELLS // max(n, 1))
    done = 0
    while done < resamples:
        r = min(rows, resamples - done)
        # int32 draws: several times faster to make than int64 ones
        if groups is None:
            index = rng.integers(0, n, size=(r, n), dtype=np.int32)
        else:
            # each stratum's samples taken straight into its columns: the same draws as
            # gathering and concatenating, without two int64 copies of the chunk
            index = np.empty((r, sum(len(g) for g in groups)), dtype=np.int32)
            start = 0
            for g in groups:
                drawn = rng.integers(0, len(g), size=(r, len(g)), dtype=np.int32)
                np.take(g, drawn, out=index[:, start : start + len(g)], mode="clip")
                start += len(g)
        yield Draw(index, n)
        done += r


def bootstrap(
    statistic: Statistic,
    n: int,
    strata: np.ndarray | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Interval:
    """The percentile bootstrap interval of `statistic` over n samples."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one sample")
    rng = np.random.default_rng(seed)
    point = statistic(Draw(np.arange(n)[None], n))[0]
    values = np.concatenate([statistic(d) for d in draws(n, resamples, rng, strata)])
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail], axis=0)
    return Interval(point, low, high)


def mean_statistic(values: np.ndarray) -> Statistic:
    """The mean of each column of `values` [N, M] over a resample."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    return lambda d: d.weights @ values / n


class _AUC:
    """The ROC-AUC of one set of (score, positive) pairs under resampling: the chance that a
    positive scores above a negative, ties counting half (the Mann-Whitney U). `scores` and
    `positive` are [N, P]: sample i carries P pairs (P = K for a micro average, 1 for one
    class), and a resample draws all P of each sample it draws, so a pair weighs its sample's
    multiplicity w. The scores are sorted once: the negatives ascending, and each positive
    knows its two places in that order (after the negatives strictly below it, after those at
    most its score). A resample's U is then the cumulative sum of the negatives' w read at those
    places, weighted by the positives' w: gathers from the draw's multiplicities (`Draw.counts`,
    one bincount per draw that the accuracy's mean shares), one cumulative sum and a dot
    product; no bincount of the pairs and no pass over tie groups per resample."""

    def __init__(self, scores: np.ndarray, positive: np.ndarray) -> None:
        s, is_pos = scores.ravel(), positive.ravel().astype(bool)
        sample = np.repeat(np.arange(scores.shape[0]), scores.shape[1])  # pair -> its sample
        neg = np.flatnonzero(~is_pos)
        neg = neg[np.argsort(s[neg], kind="stable")]
        # positives in score order too: their reads of the cumulative sums go forward in memory
        pos = np.flatnonzero(is_pos)
        pos = pos[np.argsort(s[pos], kind="stable")]
        self.neg_sample, self.pos_sample = sample[neg], sample[pos]
        self.below = np.searchsorted(s[neg], s[pos], side="left")
        self.up_to = np.searchsorted(s[neg], s[pos], side="right")
        self.ties = bool((self.below != self.up_to).any())
        self._scratch: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __call__(self, d: Draw) -> np.ndarray:
        # Integers throughout (int64: U exact below 3e9 pairs): an int64 cumulative sum is
        # several times faster than a float64 one (no chain of float additions). The arrays are
        # reused from chunk to chunk: fresh MB-sized ones cost more in page faults than the
        # arithmetic (at 1e5 samples, 4x the time of the micro AUC; measured). Not safe for
        # concurrent calls.
        if d.rows not in self._scratch:
            self._scratch[d.rows] = (
                np.zeros((d.rows, len(self.neg_sample) + 1), dtype=np.int64),
                np.empty((d.rows, len(self.pos_sample)), dtype=np.int64),
                np.empty((d.rows, len(self.pos_sample)), dtype=np.int64),
            )
        cum, wpos, reads = self._scratch[d.rows]
        w = d.counts
        # cum[:, j]: the drawn negatives among the j lowest-scoring ones (cum[:, 0] stays 0);
        # "clip" takes straight into `out` (the default mode buffers), the indices are in range
        np.take(w, self.neg_sample, axis=1, out=cum[:, 1:], mode="clip")
        np.cumsum(cum[:, 1:], axis=1, out=cum[:, 1:])
        np.take(w, self.pos_sample, axis=1, out=wpos, mode="clip")
        # 2U = sum over drawn positives of (negatives below + negatives up to their score)
        np.take(cum, self.below, axis=1, out=reads, mode="clip")
        u2 = np.einsum("ij,ij->i", wpos, reads)  # int64: exact, no [R, N] temporary
        if self.ties:
            np.take(cum, self.up_to, axis=1, out=reads, mode="clip")
            u2 += np.einsum("ij,ij->i", wpos, reads)
        else:
            u2 *= 2
        return u2 / (2 * wpos.sum(axis=1) * cum[:, -1]).astype(np.float64)


def auc_statistic(scores: np.ndarray, labels: np.ndarray) -> Statistic:
    """(micro, macro) one-vs-rest ROC-AUC of class scores [N, K] for labels [N], as
    `toolkit.core.metrics.one_vs_rest_auc` computes them: micro over every (sample, class) pair,
    macro the mean over the classes that have samples (and samples of other classes)."""
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    onehot = (np.asarray(labels)[:, None] == np.arange(k)).astype(np.int64)
    micro = _AUC(scores, onehot)
    per_class = [_AUC(scores[:, c : c + 1], onehot[:, c : c + 1]) for c in range(k)
                 if 0 < onehot[:, c].sum() < n]  # fmt: skip

    def stat(d: Draw) -> np.ndarray:
        macro = np.mean([a(d) for a in per_class], axis=0) if per_class else np.nan
        return np.stack(np.broadcast_arrays(micro(d), macro), axis=1)

    return stat


def concat(*stats: Statistic) -> Statistic:
    """The columns of several statistics side by side."""
    return lambda d: np.concatenate([s(d) for s in stats], axis=1)


def average(stats: list[Statistic]) -> Statistic:
    """The mean of several statistics (the runs of a seed group) on the same draw."""
    return lambda d: np.mean([s(d) for s in stats], axis=0)


def difference(a: Statistic, b: Statistic) -> Statistic:
    """`a - b` on the same draw: the paired difference of two runs on the same samples."""
    return lambda d: a(d) - b(d)


# --- per-sample values on disk -----------------------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """One evaluation's per-sample values, sorted by sample key: `parts` maps a part ("model",
    or the reference's name) to {value name: [N] float64} (metrics, a classifier's `label` and
    `score.<k>`)."""

    keys: np.ndarray  # [N] str, sorted, distinct
    parts: dict[str, dict[str, np.ndarray]]

    @classmethod
    def of(cls, keys: list[str], parts: Mapping[str, Mapping[str, np.ndarray]]) -> Samples:
        """From values in any key order (as gathered from the ranks)."""
        order = np.argsort(np.asarray(keys, dtype=str), kind="stable")
        return cls(
            np.asarray(keys, dtype=str)[order],
            {p: {k: np.asarray(v, np.float64)[order] for k, v in vs.items()}
             for p, vs in parts.items()},
        )  # fmt: skip

    def write(self, path: Path) -> None:
        """An .npz of plain arrays (`keys`, `<part>.<name>`): loads without pickle."""
        buf = io.BytesIO()
        arrays = {f"{p}.{k}": v for p, vs in self.parts.items() for k, v in vs.items()}
        np.savez_compressed(buf, keys=self.keys, **arrays)
        write_atomic(path, buf.getvalue())

    @classmethod
    def read(cls, path: Path) -> Samples:
        """A samples file; a user error names the file and what is wrong with it."""
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise UserError(
                f"{path}: missing (eval.json names it); evaluate the run again"
            ) from None
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise UserError(f"{path}: not a samples file ({err})") from None
        keys = arrays.pop("keys", None)
        if keys is None or keys.dtype.kind != "U" or keys.ndim != 1:
            raise UserError(f"{path}: no 'keys' array of sample keys")
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            raise UserError(f"{path}: 'keys' should be sorted and distinct")
        parts: dict[str, dict[str, np.ndarray]] = {}
        for name, v in arrays.items():
            part, _, value = name.partition(".")
            if not value or v.shape != keys.shape or v.dtype != np.float64:
                raise UserError(
                    f"{path}: array {name!r} should be <part>.<name>, float64, one value per key"
                )
            parts.setdefault(part, {})[value] = v
        return cls(keys, parts)


def same_keys(a: Samples, b: Samples) -> bool:
    return a.keys.shape == b.keys.shape and bool((a.keys == b.keys).all())


def check_paired(a: Samples, b: Samples, a_name: str, b_name: str) -> None:
    """Two evaluations can be paired only on the same samples: a user error otherwise."""
    if not same_keys(a, b):
        only_a = np.setdiff1d(a.keys, b.keys)
        only_b = np.setdiff1d(b.keys, a.keys)
        raise UserError(
            f"{a_name} and {b_name}: not evaluated on the same validation samples "
            f"({len(a.keys)} and {len(b.keys)} keys; {len(only_a)} only in the first, e.g. "
            f"{only_a[:2].tolist()}, {len(only_b)} only in the second, e.g. "
            f"{only_b[:2].tolist()}); "
            "a paired difference needs the same keys"
        )


def paired(
    a: Samples,
    a_stat: Statistic,
    b: Samples,
    b_stat: Statistic,
    strata: np.ndarray | None,
    a_name: str,
    b_name: str,
) -> Interval:
    """The interval of `a_stat - b_stat` on the same resamples of the samples both were
    evaluated on: a user error where their keys differ (pairing is by key)."""
    check_paired(a, b, a_name, b_name)
    return bootstrap(difference(a_stat, b_stat), len(a.keys), strata)

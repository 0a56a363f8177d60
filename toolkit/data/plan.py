"""The epoch plan, as pure functions of (seed, epoch, rank, world size, workers): which samples
each rank and DataLoader worker reads, in which order, and where a resumed epoch picks up.
`toolkit/data/loader.py` streams what these functions lay out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from toolkit.data.format import Shard


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, which are virtual positions first..first+stop-start."""

    shard: Shard
    start: int
    stop: int
    first: int


def shard_order(shards: tuple[Shard, ...], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(order))
        order = [order[i] for i in perm]
    return order


def segments(order: list[Shard], lo: int, hi: int) -> list[Segment]:
    """Virtual positions [lo, hi) of the shard sequence, wrapping around past its end. Each
    segment's shard is found by bisection in the cumulative counts: a range spanning k of S
    shards costs O(S + k log S), not O(S k)."""
    counts = np.fromiter((s.count for s in order), dtype=np.int64, count=len(order))
    ends = np.cumsum(counts)
    total = int(ends[-1])
    out: list[Segment] = []
    pos = lo
    while pos < hi:
        offset = pos % total
        i = int(np.searchsorted(ends, offset, side="right"))  # the shard holding `offset`
        start = offset - int(ends[i] - counts[i])
        take = min(int(counts[i]) - start, hi - pos)
        out.append(Segment(order[i], start, start + take, pos))
        pos += take
    return out


def split_even(n: int, parts: int) -> list[int]:
    """n items into `parts` counts differing by at most one, larger counts first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def resume_point(consumed: int, counts: list[int]) -> tuple[list[int], int]:
    """After `consumed` batches: how many each worker has handed out, and which worker is next.

    The DataLoader takes one batch from each worker in turn and skips exhausted workers; a resumed
    DataLoader starts its turn at worker 0 again, so the next worker becomes the new worker 0.
    """
    done = [0] * len(counts)
    w = 0
    for _ in range(consumed):
        while done[w] >= counts[w]:
            w = (w + 1) % len(counts)
        done[w] += 1
        w = (w + 1) % len(counts)
    return done, w


def buffered_shuffle(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """WebDataset-style shuffle buffer over positions: an item is emitted at most `size` items
    after it is read, so a streaming reader never holds more than `size` samples. Positions stay
    in an int64 array (8 bytes each); the buffer is a list of at most `size`."""
    items = np.asarray(items, dtype=np.int64)
    if size <= 1 or len(items) < size:
        out = items.copy()
        if size > 1:
            rng.shuffle(out)
        return out
    out = np.empty(len(items), dtype=np.int64)
    draws = rng.integers(size, size=len(items) - size + 1)  # the buffer is full at each draw
    buf = items[: size - 1].tolist()
    for n, (item, j) in enumerate(zip(items[size - 1 :].tolist(), draws.tolist(), strict=True)):
        buf.append(item)
        buf[j], buf[-1] = buf[-1], buf[j]
        out[n] = buf.pop()
    rest = np.array(buf, dtype=np.int64)
    rng.shuffle(rest)
    out[len(items) - len(rest) :] = rest
    return out


@dataclass(frozen=True)
class RankPlan:
    lo: int  # first virtual position of this rank
    size: int  # samples of this rank in one epoch (padding included)
    valid: int  # of which the first `valid` count (validation pads with invalid ones)
    batches: int
    padding: int  # duplicated samples across all ranks per epoch


def rank_plan(n: int, batch_size: int, rank: int, world: int, train: bool) -> RankPlan:
    per_rank = math.ceil(n / world)
    if train:
        lo, valid, padding = rank * per_rank, per_rank, per_rank * world - n
    else:
        # Every rank runs the same number of batches (a collective in the forward, as under
        # ZeRO-3, must not hang), but the positions past its share are marked invalid, so each
        # sample is evaluated exactly once.
        lo = n * rank // world
        valid = n * (rank + 1) // world - lo
        padding = 0
    return RankPlan(lo, per_rank, valid, math.ceil(per_rank / batch_size), padding)

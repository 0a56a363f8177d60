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
    """Virtual positions [lo, hi) of the shard sequence, wrapping around past its end."""
    total = sum(s.count for s in order)
    out: list[Segment] = []
    pos = lo
    while pos < hi:
        offset = pos % total
        for shard in order:
            if offset < shard.count:
                take = min(shard.count - offset, hi - pos)
                out.append(Segment(shard, offset, offset + take, pos))
                pos += take
                break
            offset -= shard.count
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


def buffered_shuffle(items: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """WebDataset-style shuffle buffer over positions: an item is emitted at most `size` items
    after it is read, so a streaming reader never holds more than `size` samples."""
    if size <= 1:
        return list(items)
    out, buf = [], []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    rng.shuffle(buf)
    return out + buf


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

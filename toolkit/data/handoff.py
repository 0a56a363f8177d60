"""Batches handed from DataLoader workers to the training process in reused shared memory."""

from __future__ import annotations

import itertools
import mmap
import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

_ALIGN = 64  # every field starts on a cache line
_POOLS: weakref.WeakValueDictionary[int, SlotPool] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()

# (field name, numpy dtype, shape, byte offset in the slot)
Layout = tuple[tuple[str, np.dtype, tuple[int, ...], int], ...]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class SlotPool:
    """`per_producer` slots of `slot_bytes` for each of `producers` in one shared mapping.

    default_collate in a worker stacks each field into a fresh shared-memory segment per batch:
    a segment made, sized, mapped and passed as a file descriptor per tensor, and a page fault
    per 4 KiB as the worker fills it (about 1,800 for a 64 x 150 x 150 HR/LR batch, 2-5 us each
    on a small VM). Here each producer (a DataLoader worker, or the main process with no
    workers) owns a few batch-sized slots of one anonymous shared mapping, made before the
    workers fork so that they inherit it: a batch is stacked into a slot whose pages are already
    mapped, and only its keys and the slot's layout cross the worker's queue.

    A slot's flag (in the mapping, so every process sees it) is set by the producer that claims
    it and cleared in the consuming process once it holds nothing of the batch: the batch's
    tensors are views of one numpy array, whose finalizer frees the slot when every tensor, view
    and storage made from it is gone. A batch kept for any length of time keeps its slot; a
    producer finding all of its slots held collates the ordinary way, so nothing waits for a
    slot and no batch is written over while it can still be read. Anonymous shared memory is
    not /dev/shm, whose size a container may cap well below a few batches."""

    def __init__(self, producers: int, per_producer: int, slot_bytes: int) -> None:
        self.per_producer = per_producer
        self.slot_bytes = _aligned(slot_bytes)
        self.count = producers * per_producer
        self.head = _aligned(self.count)
        self.buf = mmap.mmap(-1, self.head + self.count * self.slot_bytes)
        self.flags = np.frombuffer(self.buf, np.uint8, count=self.count)
        self.owner = os.getpid()  # the consuming process
        self.live: set[int] = set()  # slots whose batch the consuming process still holds
        self.token = next(_TOKENS)
        _POOLS[self.token] = self

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Only a forked worker shares the mapping; a spawned one gets no pool and collates
        # the ordinary way.
        return (_no_pool, ())

    def claim(self, producer: int, nbytes: int) -> int | None:
        """A free slot of `producer` marked taken, or None if none is free or it is too small."""
        if nbytes > self.slot_bytes:
            return None
        first = producer * self.per_producer
        for slot in range(first, first + self.per_producer):
            if not self.flags[slot]:
                self.flags[slot] = 1
                return slot
        return None

    def view(self, slot: int) -> np.ndarray:
        offset = self.head + slot * self.slot_bytes
        return np.frombuffer(self.buf, np.uint8, count=self.slot_bytes, offset=offset)

    def hold(self, slot: int) -> np.ndarray:
        """The slot's bytes in the consuming process: the slot is freed when this array, and
        every array and tensor made from it, is gone."""
        base = self.view(slot)
        self.live.add(slot)
        weakref.finalize(base, self._release, slot)
        return base

    def _release(self, slot: int) -> None:
        self.live.discard(slot)
        self.flags[slot] = 0

    def reclaim(self) -> None:
        """Free the slots of batches that were never received (their workers are gone): call
        only when no producer is running."""
        for slot in range(self.count):
            if slot not in self.live:
                self.flags[slot] = 0


def _no_pool() -> None:
    return None


class SlotBatch:
    """A collated batch in a slot: its keys and where each field lies. `tensors()` gives the
    batch dict; a DataLoader that pins memory calls `pin_memory()` instead."""

    def __init__(
        self, pool: SlotPool, slot: int, order: tuple[str, ...], layout: Layout, keys: list[str]
    ) -> None:
        self.pool, self.slot, self.order, self.layout, self.keys = pool, slot, order, layout, keys
        # In the consuming process the slot is held from here on; a worker's copy only fills it.
        self.base = pool.hold(slot) if os.getpid() == pool.owner else pool.view(slot)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_received, (self.pool.token, self.slot, self.order, self.layout, self.keys))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name, dtype, shape, offset in self.layout:
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = self.base[offset:].view(dtype)[:count].reshape(shape)
        return out

    def tensors(self) -> dict[str, Any]:
        arrays = self.arrays()
        return {n: self.keys if n == "key" else torch.from_numpy(arrays[n]) for n in self.order}

    def pin_memory(self) -> dict[str, Any]:
        # Pinned copies: the slot is free again as soon as they are made.
        return {n: v.pin_memory() if torch.is_tensor(v) else v for n, v in self.tensors().items()}


def _received(
    token: int, slot: int, order: tuple[str, ...], layout: Layout, keys: list[str]
) -> SlotBatch:
    pool = _POOLS.get(token)
    if pool is None:
        raise RuntimeError("a batch arrived for a loader that is gone")
    return SlotBatch(pool, slot, order, layout, keys)


def _field(name: str, values: Sequence[Any]) -> tuple[np.dtype, tuple[int, ...]] | None:
    """The dtype and batch shape of one field, or None where it cannot be stacked in a slot."""
    first = values[0]
    if isinstance(first, bool):
        ok = all(isinstance(v, bool) for v in values)
        return (np.dtype(np.bool_), (len(values),)) if ok else None
    if not torch.is_tensor(first):
        return None
    if any(not torch.is_tensor(v) or v.dtype != first.dtype or v.shape != first.shape
           for v in values):  # fmt: skip
        return None  # default_collate says what is wrong
    try:
        dtype = torch.empty(0, dtype=first.dtype).numpy().dtype
    except TypeError:  # a dtype numpy lacks
        return None
    return dtype, (len(values), *first.shape)


def collate(items: list[dict[str, Any]], pool: SlotPool | None, producer: int) -> Any:
    """`items` as one batch: in a free slot of `producer` where one is, else default_collate's
    dict (the same fields, shapes and dtypes)."""
    if pool is None:
        return default_collate(items)
    order = tuple(items[0])
    fields, size = [], 0
    for name in order:
        if name == "key":
            continue
        got = _field(name, [item[name] for item in items])
        if got is None:
            return default_collate(items)
        dtype, shape = got
        fields.append((name, dtype, shape, size))
        size = _aligned(size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    slot = pool.claim(producer, size)
    if slot is None:
        return default_collate(items)
    batch = SlotBatch(pool, slot, order, tuple(fields), [item["key"] for item in items])
    for name, dest in batch.arrays().items():
        values = [item[name] for item in items]
        if dest.dtype == np.bool_:
            dest[:] = values
        else:
            torch.stack(values, out=torch.from_numpy(dest))
    return batch

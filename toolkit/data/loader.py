"""The input pipeline: WebDataset shards -> batches per rank and worker, exact and resumable.

How an epoch is laid out (all of it a pure function of seed, epoch, rank and world size; the
functions are in `toolkit/data/plan.py`):
1. The split's shards are shuffled by (seed, epoch) and read as one virtual sequence of N samples.
2. Training: the sequence is padded by wrapping around to world x R samples, R = ceil(N / world),
   and rank r takes the contiguous range [r*R, (r+1)*R): every rank gets the same number of
   batches whatever the shard sizes (uneven shards never hang a job), and each sample is seen once
   per epoch up to the `padding` reported. Validation: contiguous ranges, no padding, so each
   sample is evaluated exactly once across ranks.
3. A rank's range is cut into batches, and the batches into one contiguous run per DataLoader
   worker; each worker streams its run from the tars (several slots may share a shard, so fewer
   shards than ranks x workers is handled, not an error) through a seeded shuffle buffer.
4. The DataLoader hands out worker batches round-robin, so the order is deterministic and a cursor
   "k batches of epoch e consumed" tells each worker how many of its batches to skip on resume.
Crops and augmentation draw from a generator seeded by (seed, epoch, sample position), so they do
not depend on the worker count or on resuming.
5. A worker stacks each batch into a shared-memory slot of its own that the training process
   frees once it holds nothing of that batch (`toolkit/data/handoff.py`): only keys and the slot's
   layout cross the worker's queue.

A batch is a dict: `key` (the sample keys), `valid` (bool [N]: False for a repeat that evaluation
must not count), and the tensors the task asks for: `hr` and `lr` ([N, C, H, W] float32, in the
model's values), `label` (int64 [N]); with `lr`, `psf` (float32 [N, 2]: the HR and LR PSF's
Gaussian sigma in HR pixels, from the sample's metadata, NaN where unknown: see `psf_sigmas`);
under a per-image normalisation, `norm` (float32 [N, 2, C, 1, 1]: each sample's statistics,
`norm[i]` what `Normalisation.invert(y[i], norm[i])` takes back to the data's units).
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toolkit.core.errors import UserError
from toolkit.core.schema import DataConfig
from toolkit.data.degrade import degrade
from toolkit.data.format import (
    MANIFEST,
    Manifest,
    Shard,
    cached,
    in_unit_range,
    load_index,
    member,
    read_manifest,
    read_samples,
    sample_of,
)
from toolkit.data.handoff import SlotBatch, SlotPool, collate
from toolkit.data.normalise import Normalisation, resolve
from toolkit.data.plan import (
    Segment,
    buffered_shuffle,
    rank_plan,
    resume_point,
    segments,
    shard_order,
    split_even,
)
from toolkit.data.sources import decode
from toolkit.data.storage import RangeReader, Remote, StorageError, read_many, spans
from toolkit.data.subset import restrict

logger = logging.getLogger(__name__)

# A Gaussian's FWHM over its sigma: 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))
_SCALE_TOLERANCE = 1e-6  # relative, between lr_pixel / hr_pixel and the run's scale


def psf_sigmas(meta: bytes | None, scale: int) -> torch.Tensor:
    """A sample's PSFs from its metadata (the `.json` member: `toolkit.simulate`'s
    meta/<key>.json), as float32 [2]: the Gaussian sigma of the HR and of the LR PSF, both in HR
    pixels (fwhm / FWHM_PER_SIGMA / hr_pixel). NaN, NaN (unknown) unless the metadata says
    `"psf": "gaussian"` and gives `hr_psf_fwhm`, `lr_psf_fwhm`, `hr_pixel` and `lr_pixel` as
    positive numbers with lr_pixel / hr_pixel the run's `scale` (within 1e-6, relative)."""
    unknown = torch.full((2,), math.nan, dtype=torch.float32)
    if meta is None:
        return unknown
    try:
        doc = json.loads(meta)
    except ValueError:  # checked when sharded: only a damaged shard gets here
        return unknown
    names = ("hr_psf_fwhm", "lr_psf_fwhm", "hr_pixel", "lr_pixel")
    if not isinstance(doc, dict) or doc.get("psf") != "gaussian":
        return unknown
    values = [doc.get(n) for n in names]
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values
    ):
        return unknown
    hr_fwhm, lr_fwhm, hr_pixel, lr_pixel = (float(v) for v in values)
    if abs(lr_pixel / hr_pixel - scale) > _SCALE_TOLERANCE * scale:
        return unknown
    per = FWHM_PER_SIGMA * hr_pixel
    return torch.tensor([hr_fwhm / per, lr_fwhm / per], dtype=torch.float32)


_NO_PSF = torch.full((2,), math.nan, dtype=torch.float32)


# --- the dataset each worker iterates ------------------------------------------------------------


class ShardStream(IterableDataset):
    """Batches of one rank for one epoch; each DataLoader worker streams its own run of batches."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        batch_size: int,
        crop: int,
        scale: int,
        fields: tuple[str, ...],
        shuffle_buffer: int,
        augment: bool,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        train: bool,
        normalise: Normalisation | None = None,
    ) -> None:
        self.manifest, self.split, self.train = manifest, split, train
        self.norm = normalise or resolve(None, manifest)
        # LR made from HR-only shards is clamped to [0, 1] only where the stored values lie there.
        self.clamp_degraded = in_unit_range(manifest.value_range)
        self.batch_size, self.crop, self.scale = batch_size, crop, scale
        self.need_lr = "lr" in fields  # a task that trains on HR alone never decodes or makes LR
        self.need_label = "label" in fields  # a classification: each sample's `cls` member
        self.shuffle_buffer, self.augment, self.seed = shuffle_buffer, augment, seed
        self.rank = rank
        # The plan is cut for this many DataLoader workers (0 workers plan like 1): the sample order
        # depends on it, so a resumed job must use the same count, which the recipe fixes.
        self.workers = max(workers, 1)
        self.plan = rank_plan(manifest.count(split), batch_size, rank, world_size, self.train)
        # (epoch, batches of it already consumed) in shared memory: DataLoader workers that live
        # across epochs read each pass's cursor from here when they start it.
        self.cursor = torch.zeros(2, dtype=torch.int64).share_memory_()
        # Where batches are collated for the training process (`Loader` makes it before its
        # workers fork); None: the ordinary way.
        self.pool: SlotPool | None = None

    @property
    def epoch(self) -> int:
        # through numpy: indexing the tensor costs ~25 us, and crops ask for it per sample
        return int(self.cursor.numpy()[0])

    @property
    def skip(self) -> int:
        return int(self.cursor.numpy()[1])

    def batch_bytes(self) -> int:
        """An upper bound on the bytes of one batch's tensors (the widest channel count)."""
        c, side = max(self.manifest.channels, default=1), self.crop
        per = 4 * c * side * side + 1  # hr, valid
        if self.need_lr:
            per += 4 * c * (side // self.scale) ** 2 + 4 * 2  # lr, psf
        if self.need_label:
            per += 8
        if self.norm.per_image:
            per += 4 * 2 * c
        return self.batch_size * per + 64 * 8  # each field aligned

    def start(self, epoch: int, skip: int) -> None:
        """The next pass reads `epoch` from its batch `skip` on."""
        self.cursor[0], self.cursor[1] = epoch, skip

    def worker_runs(self, workers: int) -> list[tuple[int, int, int]]:
        """(first position, end position, batch count) of each worker's run of batches."""
        runs, b0 = [], 0
        end = self.plan.lo + self.plan.size
        for count in split_even(self.plan.batches, workers):
            lo = self.plan.lo + b0 * self.batch_size
            runs.append((lo, min(lo + count * self.batch_size, end), count))
            b0 += count
        return runs

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = info.id if info else 0
        pool = self.pool
        runs = self.worker_runs(self.workers)
        done, first = resume_point(self.skip, [c for _, _, c in runs])
        worker = (loader_worker + first) % self.workers
        lo, hi, _ = runs[worker]
        skip = done[worker] * self.batch_size
        order = np.arange(lo, hi, dtype=np.int64)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 0x5B])
            order = buffered_shuffle(order, self.shuffle_buffer, rng)
        todo = order[skip:]
        if not len(todo):
            return
        wanted = np.zeros(hi - lo, dtype=bool)
        wanted[todo - lo] = True
        shards = shard_order(self.manifest.splits[self.split], self.seed, self.epoch, self.train)
        # Reading starts at the first position still to come (a resumed epoch does not go
        # through what it consumed) and ends at the last.
        first, last = int(todo.min()), int(todo.max()) + 1
        raw = self._read(segments(shards, first, last), lambda pos: bool(wanted[pos - lo]))
        batch: list[dict[str, Any]] = []
        cache: dict[int, dict[str, Any] | None] = {}
        last_good: dict[str, Any] | None = None
        for pos in todo.tolist():
            while pos not in cache:
                got_pos, sample = next(raw)
                cache[got_pos] = sample
            item = self._transform(cache.pop(pos), pos)
            valid = pos < self.plan.lo + self.plan.valid
            if item is None:  # lost to a corrupt shard or file: repeat a good sample instead,
                # which evaluation must not count twice
                item = last_good if last_good is not None else self._fallback(pos)
                valid = False
            last_good = item
            batch.append({**item, "valid": valid})
            if len(batch) == self.batch_size:
                yield collate(batch, pool, loader_worker)
                batch = []
        if batch:
            yield collate(batch, pool, loader_worker)

    def _read(
        self, segs: list[Segment], wanted: Callable[[int], bool]
    ) -> Iterator[tuple[int, Any]]:
        """(position, raw sample or None if lost or not wanted) for every position of the
        segments, in order; samples not wanted are seeked over in the tar, not read."""
        remote = segs[0].shard.path if segs else None
        if isinstance(remote, Remote) and not remote.options.cache_dir:
            yield from _read_remote(segs, wanted)
            return
        for seg in segs:
            got = 0
            picks = seg.shard.picks
            at: Callable[[int], int | None]  # the position of shard sample i, if it has one
            if picks is None:  # the shard's samples seg.start.. are positions seg.first..
                lo, hi = seg.start, seg.stop
                at = _Shifted(seg.first - seg.start)
            else:  # a subset's: its picked samples seg.start.. are positions seg.first..
                chosen = picks[seg.start : seg.stop]
                lo, hi = chosen[0], chosen[-1] + 1
                positions = range(seg.first, seg.first + len(chosen))
                at = dict(zip(chosen, positions, strict=True)).get
            try:
                with open(_local(seg.shard), "rb") as stream:
                    rows = read_samples(stream, lo, hi, _Wanted(at, wanted))
                    for i, sample in rows:
                        pos = at(i)
                        if pos is None:  # between a subset's picks: not one of its samples
                            continue
                        if sample is not None:
                            sample["__url__"] = seg.shard.name
                        yield pos, sample
                        got += 1
            except (OSError, EOFError, ValueError) as err:
                logger.warning("shard %s is damaged (%s)", seg.shard.name, err)
            lost = seg.stop - seg.start - got
            if lost:
                logger.warning(
                    "shard %s: %d sample(s) lost at positions %d..%d; repeating good ones instead",
                    seg.shard.name,
                    lost,
                    seg.first + got,
                    seg.first + seg.stop - seg.start - 1,
                )
            for i in range(got, seg.stop - seg.start):
                yield seg.first + i, None

    def _transform(self, sample: dict[str, Any] | None, pos: int) -> dict[str, Any] | None:
        if sample is None:
            return None
        try:
            return self.make_item(sample, pos)
        except ValueError as err:
            logger.warning("sample %s of %s skipped: %s", sample["__key__"], sample["__url__"], err)
            return None

    def make_item(self, sample: dict[str, Any], pos: int) -> dict[str, Any]:
        """Decode, crop (LR at the HR crop's coordinates / scale), degrade and normalise one raw
        sample; with `lr`, its PSFs (`psf`), and its normalisation's statistics (`norm`) where
        they are per image."""
        full = torch.from_numpy(decode(*member(sample, "hr"), self.manifest.fits_hdu))
        rng = _LazyRng((self.seed, self.epoch, pos, 0xC0))
        s, c = self.scale, self.crop
        h, w = full.shape[-2:]
        if h < c or w < c:
            raise ValueError(f"image {h}x{w} is smaller than the crop {c}x{c}")
        lr_full = None
        if self.need_lr and self.manifest.kind == "paired":
            lr_full = torch.from_numpy(decode(*member(sample, "lr"), self.manifest.fits_hdu))
            if lr_full.shape[-2:] != (h // s, w // s):
                raise ValueError(f"lr is {tuple(lr_full.shape[-2:])}, expected hr / {s}")
        # Per-image statistics come from the whole input image, as `predict` fits them on a
        # whole file (a crop's or a tile's own would differ from tile to tile).
        stats = None
        if self.norm.per_image:
            ref = lr_full if lr_full is not None else full
            if lr_full is None and self.need_lr:
                ref = degrade(full[:, : h // s * s, : w // s * s], s, clamp=self.clamp_degraded)
            stats = self.norm.fit(ref)
        # Crop corners on the LR grid, so the paired LR crop is exact.
        if self.train:
            y, x = (
                int(rng.integers((h - c) // s + 1)) * s,
                int(rng.integers((w - c) // s + 1)) * s,
            )
        else:
            y, x = (h - c) // (2 * s) * s, (w - c) // (2 * s) * s
        hr = full if (h, w) == (c, c) else full[:, y : y + c, x : x + c]  # slicing costs ~4 us
        item: dict[str, Any] = {"key": sample["__key__"], "hr": hr}
        if self.need_label:
            if "cls" not in sample:
                raise ValueError("no class label (cls): shard a labelled source with --labels")
            item["label"] = torch.tensor(int(sample["cls"]), dtype=torch.long)
        if lr_full is not None:
            item["lr"] = (
                lr_full if hr is full else lr_full[:, y // s : (y + c) // s, x // s : (x + c) // s]
            )
        elif self.need_lr:
            item["lr"] = degrade(hr, s, clamp=self.clamp_degraded)
        for name in ("hr", "lr"):  # into the model's values, both with the input's statistics
            if name in item:
                item[name] = self.norm.apply(item[name], stats)
        if self.augment:
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            for name in ("hr", "lr"):
                if name in item:
                    t = torch.rot90(item[name], k, dims=(-2, -1))
                    item[name] = t.flip(-1) if flip else t
        for name in ("hr", "lr"):
            if name in item:
                item[name] = item[name].contiguous()
        if "lr" in item:  # circular Gaussians: crops, rotations and flips leave them as they are
            meta = sample.get("json")
            # collation copies it: one shared tensor serves every sample without metadata
            item["psf"] = _NO_PSF if meta is None else psf_sigmas(meta, s)
        if stats is not None:  # [2, C, 1, 1]: what `self.norm.invert` takes back to data units
            item["norm"] = stats
        return item

    def _fallback(self, pos: int) -> dict[str, Any]:
        """A good sample from anywhere in the split, when a worker's whole run so far is lost."""
        for shard in self.manifest.splits[self.split]:
            segs = [Segment(shard, 0, shard.count, 0)]
            for _, sample in self._read(segs, lambda _: True):
                item = self._transform(sample, pos)
                if item is not None:
                    return item
        raise RuntimeError(f"no readable sample left in split {self.split!r}")


def _local(shard: Shard) -> Path:
    """A shard's local file: its own, or the cache's copy of its object (fetched if need be)."""
    if isinstance(shard.path, Remote):
        return cached(shard, shard.path.options.cache_dir)  # type: ignore[arg-type]
    return shard.path


def _rows(seg: Segment) -> Iterator[tuple[int, int]]:
    """(index in the shard, position) of each sample of a segment."""
    picks = seg.shard.picks
    chosen = range(seg.start, seg.stop) if picks is None else picks[seg.start : seg.stop]
    return zip(chosen, range(seg.first, seg.first + len(chosen)), strict=True)


_INDEXES: dict[str, list[tuple[int, int, int]]] = {}  # a process's sample indexes, by URL


def _index(shard: Shard) -> list[tuple[int, int, int]]:
    key = str(shard.index)
    if key not in _INDEXES:
        _INDEXES[key] = load_index(shard)
    return _INDEXES[key]


def _read_remote(segs: list[Segment], wanted: Callable[[int], bool]) -> Iterator[tuple[int, Any]]:
    """`ShardStream._read` over a store: with their indexes, exactly the wanted samples' bytes
    are requested (consecutive ones in one range), read ahead by one thread across shards, and
    each sample checked against its CRC-32; a shard without an index is read from its start.
    A store that fails for good, or a damaged sample, stops the job (StorageError): unlike a
    local file, it would fail the same way on every rank."""
    missing = {str(s.shard.index): s.shard for s in segs
               if s.shard.index is not None and str(s.shard.index) not in _INDEXES}  # fmt: skip
    blobs = read_many([s.index for s in missing.values()])  # type: ignore[misc]
    for (key, shard), blob in zip(missing.items(), blobs, strict=True):
        _INDEXES[key] = load_index(shard, blob)
    ranges: list[tuple[Remote, int, int]] = []
    for seg in segs:
        if seg.shard.index is None:
            continue
        index = _index(seg.shard)
        picked = [i for i, pos in _rows(seg) if wanted(pos)]
        starts = [index[i][0] for i in picked]
        ends = [index[i][0] + index[i][1] for i in picked]
        ranges += [(seg.shard.path, lo, hi) for lo, hi in spans(starts, ends)]  # type: ignore[misc]
    with RangeReader(ranges) as reader:
        for seg in segs:
            shard = seg.shard
            if shard.index is None:
                yield from _read_unindexed(seg, wanted)
                continue
            index = _index(shard)
            for i, pos in _rows(seg):
                if not wanted(pos):
                    yield pos, None
                    continue
                _, length, crc = index[i]
                data = reader.read(length)
                if len(data) != length or zlib.crc32(data) != crc:
                    raise StorageError(
                        f"{shard.path}: sample {i} does not match its CRC-32 in {shard.index}: "
                        "the object is damaged (`python -m toolkit.shard --verify` checks it)"
                    )
                sample = sample_of(data, shard.path)
                sample["__url__"] = shard.name
                yield pos, sample


def _read_unindexed(seg: Segment, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Any]]:
    """A segment of a shard written before indexes: its tar streamed from the start."""
    rows = dict(_rows(seg))
    first, last = min(rows), max(rows) + 1
    shard = seg.shard
    with RangeReader([(shard.path, 0, shard.size)]) as reader:  # type: ignore[list-item]
        wants = _Wanted(rows.get, wanted)
        try:
            for i, sample in read_samples(reader, first, last, wants):  # type: ignore[arg-type]
                if i not in rows:
                    continue
                if sample is not None:
                    sample["__url__"] = shard.name
                yield rows[i], sample
        except (EOFError, ValueError) as err:
            raise StorageError(f"{shard.path}: not a readable tar ({err})") from None


class _Shifted:
    """The position of shard sample i in a segment of a whole shard: i + shift."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def __call__(self, i: int) -> int | None:
        return i + self.shift


class _Wanted:
    """Whether shard sample i is read: it has a position, and that position is wanted."""

    def __init__(self, at: Callable[[int], int | None], wanted: Callable[[int], bool]) -> None:
        self.at, self.wanted = at, wanted

    def __call__(self, i: int) -> bool:
        pos = self.at(i)
        return pos is not None and self.wanted(pos)


class _LazyRng:
    """A generator seeded by a sample's position, made only when a random crop or flip needs it
    (seeding costs ~20 us a sample, more than the rest of the work on uncropped data)."""

    def __init__(self, seed: tuple[int, ...]) -> None:
        self.seed, self.rng = seed, None

    def integers(self, high: int) -> int:
        if high == 1:
            return 0
        if self.rng is None:
            self.rng = np.random.default_rng(list(self.seed))
        return int(self.rng.integers(high))


# --- what the training loop holds ---------------------------------------------------------------


# Slots per producer: the batches a worker has queued (the DataLoader's prefetch factor, 2), the
# one it is filling and the one the training loop holds; a producer finding none free collates
# the ordinary way.
SLOTS = 4


class Loader:
    """One rank's batches, epoch after epoch, with a cursor that makes resuming exact.

    Iterating yields the rest of the current epoch; `state_dict()` after a batch says where the
    next one starts, and a fresh Loader given that state continues with exactly that batch.
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory  # page-locked batches: copies to a GPU need not wait
        self.epoch = 0
        self.batch = 0
        self._loader: DataLoader | None = None

    def _dataloader(self) -> DataLoader:
        """One DataLoader for the loader's life: its workers start once and serve every epoch
        (and every evaluation) instead of being forked again each time."""
        if self._loader is None:
            if self.stream.pool is None:  # made before the workers fork, which share it
                producers = max(self.num_workers, 1)
                self.stream.pool = SlotPool(producers, SLOTS, self.stream.batch_bytes())
            self._loader = DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers,
                pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            )  # fmt: skip
        return self._loader

    def close(self) -> None:
        """End the workers now (they would also end with the loader)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader = None
        if self.stream.pool is not None:  # batches left in the queue were never received
            self.stream.pool.reclaim()

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.plan.batches

    @property
    def padding(self) -> int:
        return self.stream.plan.padding

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        self.stream.start(self.epoch, self.batch)
        try:
            for batch in self._dataloader():
                self.batch += 1
                yield batch.tensors() if isinstance(batch, SlotBatch) else batch
        except UserError as err:  # a store that failed for good, in a worker: its one line
            raise type(err)(worker_message(str(err))) from None
        self.epoch, self.batch = self.epoch + 1, 0


def worker_message(text: str) -> str:
    """A worker's error as its own one line: a DataLoader re-raises it in the training process
    with the worker's traceback in the message, the error's line last."""
    if "Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1].endswith("Error") else last


def build_loader(
    data: DataConfig,
    split: str,
    *,
    crop: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    fields: tuple[str, ...] = ("hr", "lr"),
    pin_memory: bool = False,
    evaluation: bool = False,
    manifest: Manifest | None = None,
) -> Loader:
    """The loader of one split for one rank, from the recipe's `data` section.

    `crop` is the HR side the model works on (model.img_size); `fields` are the tensors the task
    needs besides the sample key ("hr", and "lr" for super-resolution). The train split is read
    in training order (shuffled, random crops, padded by repeats) unless `evaluation` asks for
    every sample exactly once, centre-cropped, as the validation split always is; training
    reads the recipe's subset of the split (`data.limit`, `data.per_class`) where it names one,
    evaluation the whole split; under `data.holdout` the val split is the held-out samples.
    `manifest`: the shards' manifest as already read (by the main process of a job, with the
    subset cut), else read here.
    """
    if manifest is None:
        manifest = read_manifest(data.shards, data.storage_options)
    train = split == "train" and not evaluation
    # A recipe's subset cuts the training order only; its holdout is the val split wherever it is
    # read (`data/subset.py`).
    if train or data.holdout is not None:
        manifest = restrict(manifest, data)
    if split not in manifest.splits or not manifest.count(split):
        raise UserError(f"{manifest.root / MANIFEST}: split {split!r} has no samples")
    batch = data.batch_size if train else (data.val_batch_size or data.batch_size)
    stream = ShardStream(
        manifest,
        split,
        batch_size=batch,
        crop=crop,
        scale=data.scale,
        fields=fields,
        shuffle_buffer=data.shuffle_buffer,
        augment=data.augment and train,
        seed=seed,
        rank=rank,
        world_size=world_size,
        workers=data.num_workers,
        train=train,
        normalise=resolve(data.normalise, manifest),
    )
    if train and stream.plan.padding and rank == 0:
        logger.info(
            "%d train samples over %d ranks: %d repeated per epoch so every rank gets %d batches",
            manifest.count(split),
            world_size,
            stream.plan.padding,
            stream.plan.batches,
        )
    return Loader(stream, data.num_workers, pin_memory=pin_memory)

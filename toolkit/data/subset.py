"""Training subsets for label-efficiency studies: `data.limit` (N samples of the train split) or
`data.per_class` (N of each class, for labelled shards); and `data.holdout`, a fraction of the
train split held out to be evaluated on in place of the val split (where hyperparameters are
chosen, so that the val numbers are not tuned to val).

Every train sample is ranked once by a hash of (`data.subset_seed`, its key), within its class
for per_class, and the first N are taken. So:
- the choice is the same whatever `train.seed` (a study compares models on the same samples);
- subsets are nested: the first 10 of a ranking are among its first 30;
- it depends on the keys alone, not on where they lie in the shards (sharding the same files
  into other shard sizes keeps it).
The subset is a manifest whose train shards carry the indices they keep (`Shard.picks`): the
epoch plan (`plan.py`) lays those out as it lays out a whole split, so the rank x worker split,
equal batches per rank (padding by repeats when the subset is smaller than batch x world) and
exact resume hold as they do there. Validation is never cut.

A holdout is drawn first, by a hash of (`data.subset_seed`, key) below the fraction (as `shard`
draws its val split), so it is nested too and the same for every run of a study; the subset is
cut from the rest. The manifest's val split becomes the held-out samples (train shards with
picks): the training's evaluations and `evaluate` read them, and the shards' val split is never
read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

from toolkit.core.errors import UserError
from toolkit.core.schema import DataConfig
from toolkit.data.format import MANIFEST, Manifest, Shard, open_shard, sample_keys

logger = logging.getLogger(__name__)

SUBSET = "subset.json"  # in a run directory: the keys of the subset it trained on
SPLIT = "train"  # the one split a subset cuts


def wanted(data: DataConfig) -> bool:
    return data.limit is not None or data.per_class is not None or data.holdout is not None


def eval_split(data: DataConfig, split: str) -> str:
    """What an evaluation of `split` reads under the recipe: "holdout" for the val split of a
    run that holds part of train out (eval.json and the report name it so)."""
    return "holdout" if split == "val" and data.holdout is not None else split


def problems(manifest: Manifest, data: DataConfig) -> list[str]:
    """Why the recipe's subset cannot be cut from these shards, from their manifest alone (a
    launch refuses, a dry run warns): one line each, naming the manifest and the key."""
    where = manifest.root / MANIFEST
    total = manifest.count(SPLIT) if SPLIT in manifest.splits else 0
    if data.limit is not None and data.limit > total:
        return [f"data.limit: {data.limit} is more than the {total} train samples of {where}: "
                f"use at most {total} (null: all)"]  # fmt: skip
    if data.per_class is None:
        return []
    if not manifest.classes:
        return [f"data.per_class: {where} holds no class labels: shard class folders with "
                "--labels, or cut the train split with data.limit"]  # fmt: skip
    counts = (manifest.class_counts or {}).get(SPLIT)
    if counts is not None:
        short = [(c, n) for c, n in zip(manifest.classes, counts, strict=True)
                 if n < data.per_class]  # fmt: skip
        if short:
            return [_short(where, data.per_class, short, min(counts))]
    return []


def _short(where: Any, per_class: int, short: list[tuple[str, int]], most: int) -> str:
    names = ", ".join(f"{c!r} has {n}" for c, n in short[:3])
    return (f"data.per_class: {per_class} train samples of each class, but in {where} {names}: "
            f"use at most {most}")  # fmt: skip


def size(manifest: Manifest, data: DataConfig) -> int:
    """Train samples under the recipe's subset, from the manifest alone (the step plan of a run
    is counted from it): `problems` has refused what is not possible. A holdout's size depends
    on the keys: they are listed (headers only)."""
    if data.holdout is not None:
        return restrict(manifest, data).count(SPLIT)
    total = manifest.count(SPLIT)
    if data.limit is not None:
        return min(data.limit, total)
    if data.per_class is not None and manifest.classes:
        counts = (manifest.class_counts or {}).get(SPLIT)
        if counts is None:  # a manifest without counts per class: per_class each
            return data.per_class * len(manifest.classes)
        return sum(min(data.per_class, n) for n in counts)
    return total


def rank(seed: int, key: str) -> bytes:
    """A key's place in the subset ranking of `seed`: a hash, so independent of the shards."""
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=16).digest()


def held_out(seed: int, key: str, fraction: float) -> bool:
    """Whether `key` is in the holdout of `fraction` under `seed`: a hash of its own (not the
    ranking's, which would hold out the samples a small subset takes first), so a larger
    fraction holds out a superset."""
    h = hashlib.blake2b(f"holdout:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def restrict(manifest: Manifest, data: DataConfig) -> Manifest:
    """The manifest whose train split is the recipe's subset (unchanged without one, or where
    one is applied already). Lists the train shards' keys (and labels): headers and label
    bytes only, no image is read."""
    if not wanted(data) or manifest.subset is not None:
        return manifest
    found = problems(manifest, data)
    if found:
        raise UserError(found[0])
    per_class = data.per_class is not None
    # (rank, key, shard number, index in the shard, class) of every train sample
    rows: list[tuple[bytes, str, int, int, int | None]] = []
    held: list[tuple[bytes, str, int, int, int | None]] = []
    for s, shard in enumerate(manifest.splits[SPLIT]):
        try:
            with open_shard(shard) as stream:
                for i, (key, label) in enumerate(sample_keys(stream, labels=per_class)):  # type: ignore[arg-type]
                    row = (rank(data.subset_seed, key), key, s, i, label)
                    if data.holdout is not None and held_out(data.subset_seed, key, data.holdout):
                        held.append(row)
                    else:
                        rows.append(row)
        except (OSError, EOFError, ValueError) as err:
            # The loader reads around a damaged shard too: the samples listed before the damage
            # can be chosen, those after cannot.
            logger.warning("shard %s is damaged (%s): its later samples are not in the subset",
                           shard.name, err)  # fmt: skip
    where = manifest.root / MANIFEST
    if data.holdout is not None and (not held or not rows):
        raise UserError(f"data.holdout: {data.holdout} of the {len(held) + len(rows)} train "
                        f"samples of {where} holds out {len(held)}, leaving {len(rows)} to train "
                        "on: both must be some; choose another fraction")  # fmt: skip
    rows.sort()
    if per_class:
        assert manifest.classes is not None and data.per_class is not None
        by_class: dict[int, list[tuple[bytes, str, int, int, int | None]]] = {}
        for row in rows:
            if row[4] is not None:
                by_class.setdefault(row[4], []).append(row)
        have = [len(by_class.get(c, [])) for c in range(len(manifest.classes))]
        short = [(n, k) for n, k in zip(manifest.classes, have, strict=True) if k < data.per_class]
        if short:
            raise UserError(_short(where, data.per_class, short, min(have)))
        chosen = [row for c in sorted(by_class) for row in by_class[c][: data.per_class]]
    else:
        if data.limit is not None and data.limit > len(rows):  # what the holdout left
            raise UserError(f"data.limit: {data.limit} is more than the {len(rows)} train samples "
                            f"of {where} that data.holdout {data.holdout} leaves: use at most "
                            f"{len(rows)}")  # fmt: skip
        chosen = rows[: data.limit]
    keys = sorted(row[1] for row in chosen)
    record: dict[str, Any] = {
        "limit": data.limit,
        "per_class": data.per_class,
        "subset_seed": data.subset_seed,
        "count": len(keys),
        "of": manifest.count(SPLIT),
        # two runs trained on the same samples if and only if these are equal
        "keys_sha256": _digest(keys),
        "keys": keys,  # subset.json lists them; data.json records the rest
    }
    splits = {**manifest.splits, SPLIT: _picked(manifest.splits[SPLIT], chosen)}
    if data.holdout is not None:
        # evaluated on in place of the val split, which is dropped: nothing reads it
        splits["val"] = _picked(manifest.splits[SPLIT], sorted(held, key=lambda row: row[2:4]))
        held_keys = sorted(row[1] for row in held)
        record |= {"holdout": data.holdout, "held_out": len(held_keys),
                   "held_out_sha256": _digest(held_keys)}  # fmt: skip
    logger.info("train subset: %d of %d samples (%s, data.subset_seed %d)", len(keys),
                record["of"], _described(data), data.subset_seed)  # fmt: skip
    return dataclasses.replace(manifest, splits=splits, subset=record)


def _digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _described(data: DataConfig) -> str:
    parts = [f"data.per_class {data.per_class}" if data.per_class is not None else "",
             f"data.limit {data.limit}" if data.limit is not None else "",
             f"data.holdout {data.holdout} evaluated on in place of val"
             if data.holdout is not None else ""]  # fmt: skip
    return ", ".join(p for p in parts if p)


def _picked(shards: tuple[Shard, ...], rows: list[tuple[bytes, str, int, int, int | None]]
            ) -> tuple[Shard, ...]:  # fmt: skip
    """The shards of `rows` (shard number, index), each with the indices it keeps."""
    picks: dict[int, list[int]] = {}
    for _, _, s, i, _ in rows:
        picks.setdefault(s, []).append(i)
    return tuple(dataclasses.replace(shard, count=len(picks[s]), picks=tuple(sorted(picks[s])))
                 for s, shard in enumerate(shards) if s in picks)  # fmt: skip

"""The shard format, written by `toolkit.shard` and read by the loader: WebDataset tars per split
and manifest.json (sample counts, checksums, channels, image sizes).

A sample is a run of tar members sharing a key: `<key>.hr.<ext>` and, for paired data,
`<key>.lr.<ext>`, holding the source file's bytes as they were (lossless), then `<key>.json`
where the source has the pair's metadata (meta/<key>.json: a JSON object, as it was; the
simulator's holds the pair's pixel scales and PSF widths) and `<key>.cls` for labelled data.
Members are plain ustar with mode 0444, owner 0 and mtime 0, so the same input gives the same
bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from toolkit.core.atomic import write_atomic
from toolkit.core.errors import UserError
from toolkit.data.storage import (
    BLOCK,
    RangeReader,
    Remote,
    StorageError,
    StoreOptions,
    locate,
    read_bytes,
    sizes,
)

FORMAT = "srmae-shards/1"
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.tar"
INDEX_GLOB = "shard-*.idx"
TEMP_GLOB = ".shard-*.tmp-*"
INDEX_FORMAT = "srmae-index/1"


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


def index_name(shard: str) -> str:
    """The sample index written beside a shard: each sample's byte span and CRC-32, so that a
    reader over a network asks for exactly the samples it wants (`toolkit/data/storage.py`)."""
    return shard[: -len(".tar")] + ".idx"


# --- writing -------------------------------------------------------------------------------------


_MODE = 0o444
_IOV_MAX = 1024  # buffers one writev takes (POSIX's minimum IOV_MAX is 16; Linux's is 1024)
_ZEROS = memoryview(bytes(tarfile.BLOCKSIZE))  # a member's padding, sliced


def tar_header(name: str, size: int) -> bytes:
    """The tar header of a regular member: mode 0444, owner 0, mtime 0 (same input, same bytes).

    A short ASCII name gets a ustar header built here, byte for byte what tarfile would write
    (a test checks), as tarfile's builder takes as long as copying the member's data; any other
    name goes through tarfile, which adds a PAX record for it.
    """
    raw = name.encode() if name.isascii() else b""
    if not raw or len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, _MODE
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = bytearray(tarfile.BLOCKSIZE)
    head[0 : len(raw)] = raw
    head[100:148] = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (_MODE, 0, 0, size, 0)
    head[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
    head[156:157] = tarfile.REGTYPE
    head[257:265] = tarfile.POSIX_MAGIC
    head[148:155] = b"%06o\0" % sum(head)
    return bytes(head)


class TarWriter:
    """A tar written sample by sample and hashed on the way out: members gathered until about
    _FLUSH bytes, then written with one writev and hashed as one task (a writev and a task per
    member cost more than the copying).

    sha256 costs more CPU than reading, probing and writing together, so it runs on a helper
    thread (hashlib releases the GIL) that overlaps the rest where a core is free. At most
    _AHEAD runs wait to be hashed, which bounds memory.
    """

    _AHEAD = 8
    _FLUSH = 1 << 20

    def __init__(self, f: BinaryIO) -> None:
        f.flush()  # written past its buffer from here on
        self.f, self.sha, self.size = f, hashlib.sha256(), 0  # size: bytes added so far
        self.samples: list[tuple[int, int, int]] = []  # each sample's offset, length, CRC-32
        self.fd = f.fileno()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="shard-sha256")
        self._waiting: deque[Future] = deque()
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)

    def _hash(self, chunks: list[bytes | memoryview]) -> None:
        for chunk in chunks:
            self.sha.update(chunk)

    def _write(self, chunks: list[bytes | memoryview]) -> None:
        """All of `chunks`, however much each writev takes (a regular file takes it all but on
        a full disk, which raises)."""
        views = [memoryview(c) for c in chunks if len(c)]
        while views:
            done = os.writev(self.fd, views[:_IOV_MAX])
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if done:
                views[0] = views[0][done:]

    def _flush(self) -> None:
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        if not chunks:
            return
        self._write(chunks)
        self._waiting.append(self._hasher.submit(self._hash, chunks))
        while len(self._waiting) > self._AHEAD:
            self._waiting.popleft().result()

    def _append(self, chunk: bytes | memoryview) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        self.size += len(chunk)

    def add(self, members: list[tuple[str, bytes]]) -> None:
        start, first, crc = self.size, len(self._pending), 0
        for name, data in members:
            self._append(tar_header(name, len(data)))
            self._append(data)
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                self._append(_ZEROS[:pad])
        for chunk in self._pending[first:]:  # CRC-32 runs at ~3.5 GB/s: no helper thread needed
            crc = zlib.crc32(chunk, crc)
        self.samples.append((start, self.size - start, crc))
        if self._pending_bytes >= self._FLUSH or len(self._pending) >= _IOV_MAX // 2:
            self._flush()

    def close(self) -> str:
        """End the archive, wait for the hashing, and return the sha256 of the whole file."""
        # Two zero blocks end the archive; tarfile pads to a whole record, and so do we.
        end = 2 * tarfile.BLOCKSIZE
        self._append(bytes(end + (-(self.size + end) % tarfile.RECORDSIZE)))
        self._flush()
        while self._waiting:
            self._waiting.popleft().result()
        return self.sha.hexdigest()

    def index(self) -> bytes:
        """The shard's sample index (`index_name`), as JSON."""
        doc = {"format": INDEX_FORMAT, "samples": [list(s) for s in self.samples]}
        return json.dumps(doc, separators=(",", ":")).encode()


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


@dataclass
class ShardResult:
    """What a worker wrote: a complete temporary tar (or none), its checksum and what it skipped."""

    split: str
    index: int
    tmp: Path | None = None
    index_tmp: Path | None = None  # its sample index, written beside it
    count: int = 0
    bytes: int = 0
    sha256: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    channels: set[int] = field(default_factory=set)
    hr_min: tuple[int, int] = (sys.maxsize, sys.maxsize)
    hr_max: tuple[int, int] = (0, 0)
    # Bounds of every stored value (8/16-bit images: [0, 1] by their scaling; arrays and float
    # TIFFs: their actual extremes), and the NaN/inf pixels filled per source file.
    low: float = float("inf")
    high: float = float("-inf")
    filled: dict[str, int] = field(default_factory=dict)
    class_counts: dict[int, int] = field(default_factory=dict)  # labelled: samples per class
    scales: dict[int, int] = field(default_factory=dict)  # paired: pairs per HR/LR factor
    meta: int = 0  # samples stored with their metadata (`<key>.json`)


def commit(out: Path, results: list[ShardResult], manifest: dict, old: set[Path]) -> None:
    """Make the new shards visible: manifest gone, shards renamed, manifest last, stale removed."""
    # Without a manifest nobody reads OUT, so no reader ever sees old and new files mixed.
    (out / MANIFEST).unlink(missing_ok=True)
    named = set()
    for split in SPLITS:
        kept = sorted((r for r in results if r.split == split and r.tmp), key=lambda r: r.index)
        for i, r in enumerate(kept):
            name = shard_name(split, i)
            # Renamed onto a free name: ext4 writes a file renamed over another out before
            # the rename returns (auto_da_alloc), ~40 ms a shard; no reader looks here now.
            (out / name).unlink(missing_ok=True)
            os.replace(r.tmp, out / name)
            named.add(out / name)
            entry = {"name": name, "count": r.count, "bytes": r.bytes, "sha256": r.sha256}
            if r.index_tmp is not None:
                os.replace(r.index_tmp, out / index_name(name))
                named.add(out / index_name(name))
                entry["index"] = index_name(name)
            manifest["splits"][split]["shards"].append(entry)
    write_json(out / MANIFEST, manifest)
    for path in sorted(old - named):
        path.unlink(missing_ok=True)


def in_unit_range(value_range: tuple[float, float] | list[float] | None) -> bool:
    """Whether stored values lie in [0, 1]; shards written before their range was recorded
    did (their values were clipped there when read)."""
    return value_range is None or (value_range[0] >= 0.0 and value_range[1] <= 1.0)


def default_normalise(value_range: tuple[float, float] | list[float] | None) -> str:
    """The normalisation of shards written without a choice: `unit` for values in [0, 1],
    else `none` (see toolkit/data/normalise.py)."""
    return "unit" if in_unit_range(value_range) else "none"


def _labels(classes: tuple[str, ...] | None, results: list[ShardResult]) -> dict:
    """A labelled manifest's class names and samples per class (in their order) and split."""
    if classes is None:
        return {}
    counts = {s: [0] * len(classes) for s in SPLITS}
    for r in results:
        for label, n in r.class_counts.items():
            counts[r.split][label] += n
    return {"classes": list(classes), "class_counts": counts}


def manifest_doc(
    kind: str,
    root: Path,
    results: list[ShardResult],
    args: dict,
    nonfinite: str = "refuse",
    normalise: str | None = None,
    classes: tuple[str, ...] | None = None,
) -> dict:
    """manifest.json of the shards `results` describe (their names are added by `commit`)."""
    kept = [r for r in results if r.count]
    counts = {s: sum(r.count for r in results if r.split == s) for s in SPLITS}
    value_range = [min(r.low for r in kept), max(r.high for r in kept)]
    return {
        "format": FORMAT,
        "kind": kind,
        "source": str(root),
        **args,
        "channels": sorted(set().union(*(r.channels for r in kept))),
        "hr_size": {
            "min": [min(r.hr_min[0] for r in kept), min(r.hr_min[1] for r in kept)],
            "max": [max(r.hr_max[0] for r in kept), max(r.hr_max[1] for r in kept)],
        },
        "value_range": value_range,
        # paired: the factor between HR and LR sides (`shard` refuses a set of several)
        "scale": next(iter({k for r in results for k in r.scales}), None),
        # how the loader maps values for a model, unless a recipe says otherwise
        "normalise": normalise or default_normalise(value_range),
        "nonfinite": {
            "policy": nonfinite,
            "filled": dict(sorted(x for r in results for x in r.filled.items())),
        },
        "splits": {s: {"count": counts[s], "shards": []} for s in SPLITS},
        # samples per split stored with their metadata (`<key>.json`); absent in older
        # manifests: none
        "meta": {s: sum(r.meta for r in results if r.split == s) for s in SPLITS},
        **_labels(classes, results),
        "skipped": [
            {"path": p, "reason": why} for p, why in sorted(x for r in results for x in r.skipped)
        ],
    }


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the manifest's folder
    count: int  # samples read from it: len(picks) where a subset picks some
    path: Path | Remote  # a local file, or an object in a store
    # A training subset's samples of this shard (`toolkit/data/subset.py`): their indices in
    # the tar, ascending; None: every sample.
    picks: tuple[int, ...] | None = None
    # Its sample index (`index_name`); None: shards written before there was one (read from
    # the start of the tar)
    index: Path | Remote | None = None
    size: int = 0  # bytes, as the manifest records them (0: not recorded)
    sha256: str = ""  # as the manifest records it


@dataclass(frozen=True)
class Manifest:
    root: Path | Remote
    kind: str  # "paired" (hr and lr stored) or "hr" (lr made by degradation)
    channels: tuple[int, ...]
    min_size: tuple[int, int]
    splits: dict[str, tuple[Shard, ...]]
    # Bounds of the stored values; None for shards written before they were recorded (whose
    # values were clipped to [0, 1] when read).
    value_range: tuple[float, float] | None = None
    normalise: str | None = None  # `toolkit.shard --normalise`, as written (None: not recorded)
    fits_hdu: str | None = None  # `toolkit.shard --hdu`: the HDU read from FITS members
    classes: tuple[str, ...] | None = None  # `toolkit.shard --labels`: the class names
    scale: int | None = None  # paired: HR side / LR side (None: HR only, or not recorded)
    # labelled: samples per class (in the order of `classes`) per split, where recorded
    class_counts: dict[str, tuple[int, ...]] | None = None
    # The training subset in force (`toolkit/data/subset.py`), as data.json records it; None:
    # the whole train split.
    subset: dict[str, Any] | None = None
    # Samples per split stored with their metadata (`<key>.json`); a manifest from before it
    # was recorded says none.
    meta: dict[str, int] = field(default_factory=dict)

    def count(self, split: str) -> int:
        return sum(s.count for s in self.splits[split])

    @property
    def fields(self) -> tuple[str, ...]:
        """The batch fields the loader can make of these shards: the stored image (`hr`), its
        LR (stored, or made by degradation) and, for labelled shards, the `label`."""
        return ("hr", "lr", "label") if self.classes else ("hr", "lr")


def read_manifest(
    root: str | Path | Remote, options: StoreOptions | None = None, *, sized: bool = True
) -> Manifest:
    """Read OUT/manifest.json of `toolkit.shard` (a folder, or a URL reached with `options`);
    a missing shard file, or (`sized`) an object of another size, is an error up front."""
    root = locate(root, options)
    path = root / MANIFEST
    try:
        doc = json.loads(read_bytes(path))
        splits = {
            split: tuple(
                Shard(
                    s["name"],
                    int(s["count"]),
                    root / s["name"],
                    index=root / s["index"] if s.get("index") else None,
                    size=int(s.get("bytes", 0)),
                    sha256=str(s.get("sha256", "")),
                )
                for s in v["shards"]
            )
            for split, v in doc["splits"].items()
        }
        manifest = Manifest(
            root=root,
            kind=doc["kind"],
            channels=tuple(doc["channels"]),
            min_size=tuple(doc["hr_size"]["min"]),
            splits=splits,
            value_range=tuple(doc["value_range"]) if "value_range" in doc else None,
            normalise=doc.get("normalise"),
            fits_hdu=doc.get("fits_hdu"),
            classes=tuple(doc["classes"]) if "classes" in doc else None,
            scale=int(doc["scale"]) if doc.get("scale") is not None else None,
            class_counts={k: tuple(int(n) for n in v) for k, v in doc["class_counts"].items()}
            if "class_counts" in doc
            else None,
            meta={k: int(n) for k, n in doc.get("meta", {}).items()},
        )
    except FileNotFoundError:
        raise UserError(f"{path}: not found: make shards with `python -m toolkit.shard`") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a shard manifest ({type(err).__name__}: {err})") from None
    _check_present(manifest, path, sized)
    return manifest


def _check_present(manifest: Manifest, path: Path | Remote, sized: bool) -> None:
    """Every shard (and index) the manifest names exists; in a store, with the size recorded
    (one listing: a truncated or replaced object is refused before a job starts)."""
    listed = None
    if isinstance(manifest.root, Remote):
        names = [str(w)[len(str(manifest.root)) + 1 :] for shards in manifest.splits.values()
                 for s in shards for w in (s.path, s.index) if w is not None]  # fmt: skip
        listed = sizes(manifest.root, names)
    for shards in manifest.splits.values():
        for shard in shards:
            for where in (shard.path, shard.index):
                if where is None:
                    continue
                name = str(where)[len(str(manifest.root)) + 1 :]
                if listed is None:
                    if not where.is_file():  # type: ignore[union-attr]
                        raise UserError(f"{path}: names {name}, but {where} is missing")
                elif name not in listed:
                    raise UserError(f"{path}: names {name}, but {where} is missing")
            if sized and listed is not None and shard.size and listed[shard.name] != shard.size:
                raise UserError(f"{path}: records {shard.size} bytes for {shard.name}, but "
                                f"{shard.path} has {listed[shard.name]}")  # fmt: skip


def verify(root: str | Path | Remote, options: StoreOptions | None = None) -> tuple[int, list[str]]:
    """Check every shard against its manifest entry, size and sha256: (shards checked, one
    line per shard that differs). A store's objects are streamed, not copied."""
    root = locate(root, options)
    read_manifest(root, sized=False)  # a readable manifest whose shards all exist
    doc = json.loads(read_bytes(root / MANIFEST))
    entries = [s for split in doc["splits"].values() for s in split["shards"]]
    listed = sizes(root, [e["name"] for e in entries]) if isinstance(root, Remote) else None
    problems = []
    for entry in entries:
        path = root / entry["name"]
        size = listed[entry["name"]] if listed is not None else path.stat().st_size  # type: ignore[union-attr]
        if size != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
            continue
        sha = hashlib.sha256()
        if isinstance(path, Remote):
            with RangeReader([(path, 0, size)]) as stream:
                while chunk := stream.read(BLOCK):
                    sha.update(chunk)
        else:
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    sha.update(chunk)
        if sha.hexdigest() != entry["sha256"]:
            problems.append(
                f"{path}: sha256 {sha.hexdigest()}, the manifest says {entry['sha256']}"
            )
    return len(entries), problems


TRAINED_ON = "data.json"  # in a run directory: what its shards held (`trained_on`)


def trained_on(manifest: Manifest, normalise: str) -> dict[str, Any]:
    """What a run records of the shards it trained on, so that `predict` and `evaluate` can
    tell whether other data fit it wherever the shards are gone: the values' range in the
    data's units and the normalisation that mapped them for the model, channels, sizes, classes,
    and the training subset, if any (its keys: subset.json)."""
    subset = {}
    if manifest.subset is not None:
        subset = {"subset": {k: v for k, v in manifest.subset.items() if k != "keys"}}
    return {
        "shards": str(manifest.root.absolute()),
        "kind": manifest.kind,
        "channels": list(manifest.channels),
        "hr_min_size": list(manifest.min_size),
        "value_range": list(manifest.value_range) if manifest.value_range else None,
        "normalise": normalise,
        "classes": list(manifest.classes) if manifest.classes else None,
        # a subset's train count: what the run trained on (its step plan is counted from it)
        "count": {split: manifest.count(split) for split in manifest.splits},
        **subset,
    }


def mismatches(manifest: Manifest, channels: int, crop: int, scale: int | None = None) -> list[str]:
    """Why the shards cannot feed a model of `channels` inputs on `crop`-sized images at SR
    factor `scale` (None: any), if so."""
    out = []
    if scale is not None and manifest.scale is not None and manifest.scale != scale:
        out.append(
            f"{manifest.root / MANIFEST}: the shards pair HR with LR at 1/{manifest.scale} of its "
            f"side (scale {manifest.scale}), but data.scale is {scale}: set "
            f"data.scale={manifest.scale}, or shard pairs at that scale"
        )
    if set(manifest.channels) - {channels}:
        out.append(
            f"{manifest.root / MANIFEST}: shards hold {'/'.join(map(str, manifest.channels))}-"
            f"channel images but model.in_chans is {channels}"
        )
    if min(manifest.min_size) < crop:
        h, w = manifest.min_size
        out.append(
            f"{manifest.root / MANIFEST}: the smallest image is {h}x{w}, smaller than "
            f"model.img_size {crop}"
        )
    return out


_BLOCK = 512


class _Member:
    """One regular file of a tar: its name and size; its bytes only when asked for."""

    def __init__(self, stream: BinaryIO, name: str, size: int) -> None:
        self.stream, self.name, self.size, self.taken = stream, name, size, False

    def read(self) -> bytes:
        self.taken = True
        data = self.stream.read(self.size)
        if len(data) < self.size:
            raise EOFError("tar ends inside a member")
        return data


def tar_members(stream: BinaryIO, whole: bool = True) -> Iterator[_Member]:
    """Each regular file of a tar stream; a member whose bytes are not read is skipped with a
    seek, not read (a reader positioned deep into a shard reads only what it uses).

    Python's tarfile parses every header through a general state machine, five times slower than
    this on shards of small files (measured: 0.21 s vs 0.04 s for 2,000 members); the shards are
    plain ustar (with pax or GNU records for long names), which this reads. Truncation raises
    EOFError; a bad header raises ValueError. `whole`: the stream is a whole tar (else a run of
    members, such as one sample's bytes, that ends without the tar's zero blocks)."""
    end = os.fstat(stream.fileno()).st_size if whole and hasattr(stream, "fileno") else None
    long_name: str | None = None
    while True:
        header = stream.read(_BLOCK)
        if not header and not whole:
            return
        if len(header) < _BLOCK:  # every tar ends with zero blocks: a file without is cut short
            raise EOFError("tar ends inside a header" if header else "tar ends before its end")
        if header == bytes(_BLOCK):
            return
        if sum(header[:148]) + sum(header[156:]) + 8 * 32 != int(
            header[148:156].strip(b"\0 ") or 0, 8
        ):
            raise ValueError("tar header checksum mismatch")
        size = int(header[124:136].strip(b"\0 ") or 0, 8)
        kind = header[156:157]
        if kind in (b"L", b"x"):  # a long name for the next member: GNU record or pax header
            data = _Member(stream, "", size).read()
            long_name = data.rstrip(b"\0").decode() if kind == b"L" else _pax_path(data)
        elif kind in (b"0", b"\0"):
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
            entry = _Member(stream, long_name or (f"{prefix}/{name}" if prefix else name), size)
            long_name = None
            yield entry
            if not entry.taken:
                stream.seek(size, 1)
        else:
            long_name = None
            stream.seek(size, 1)
        stream.seek(-size % _BLOCK, 1)
        if end is not None and stream.tell() > end:
            raise EOFError("tar ends inside a member")


def _pax_path(data: bytes) -> str | None:
    for record in data.decode().splitlines():
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[len("path=") :]
    return None


def read_tar(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream."""
    for entry in tar_members(stream):
        yield entry.name, entry.read()


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split: key, then extension


def split_member(name: str) -> tuple[str, str] | None:
    """(sample key, member extension such as "lr.npy") of a tar member's name, as webdataset
    splits it; None for a name without an extension (it belongs to no sample)."""
    m = _KEY.match(name)
    return None if m is None else (m.group(1), m.group(2))


def read_samples(
    stream: BinaryIO, start: int, stop: int, wanted: Callable[[int], bool]
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Samples `start` <= i < `stop` of a shard (a sample: the members sharing a key, as
    webdataset groups them), each as {"__key__", extension: bytes} or None where `wanted(i)`
    says no. Members of samples not wanted, or before `start`, are seeked over, not read."""
    index, key, sample = -1, None, None
    for entry in tar_members(stream):
        split = split_member(entry.name)
        if split is None:
            continue  # a member without an extension belongs to no sample
        name, ext = split
        if name != key:
            if start <= index < stop:
                yield index, sample
            index, key = index + 1, name
            if index >= stop:
                return
            sample = {"__key__": key} if start <= index and wanted(index) else None
        if sample is not None:
            sample[ext] = entry.read()
    if key is not None and start <= index < stop:
        yield index, sample


def sample_keys(stream: BinaryIO, labels: bool) -> Iterator[tuple[str, int | None]]:
    """Each sample's key in shard order (its index is its place here, as `read_samples` counts)
    and, with `labels`, its class index (`cls`; None where a sample has none). Image members
    are seeked over: listing a shard reads its headers and the few bytes of its labels."""
    key: str | None = None
    label: int | None = None
    for entry in tar_members(stream):
        split = split_member(entry.name)
        if split is None:
            continue
        name, ext = split
        if name != key:
            if key is not None:
                yield key, label
            key, label = name, None
        if labels and ext == "cls":
            label = int(entry.read())
    if key is not None:
        yield key, label


def open_shard(shard: Shard) -> BinaryIO | RangeReader:
    """A shard's bytes from its start: a file, or its object streamed (headers and all, as
    listing its members needs them)."""
    if isinstance(shard.path, Remote):
        return RangeReader([(shard.path, 0, shard.size)])
    return open(shard.path, "rb")


def cached(shard: Shard, folder: str) -> Path:
    """A store's shard as a local file in the node-local cache `folder`, fetched whole the first
    time (streamed, hashed on the way) and named by its sha256, so that a copy is used only if
    it is the object the manifest names; an object whose sha256 differs is a StorageError."""
    assert isinstance(shard.path, Remote) and shard.sha256
    path = Path(folder) / f"{shard.sha256}.tar"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    sha = hashlib.sha256()
    try:
        with RangeReader([(shard.path, 0, shard.size)]) as stream, open(tmp, "wb") as f:
            while chunk := stream.read(BLOCK):
                sha.update(chunk)
                f.write(chunk)
        if sha.hexdigest() != shard.sha256:
            raise StorageError(f"{shard.path}: sha256 {sha.hexdigest()}, the manifest says "
                               f"{shard.sha256}: the object changed or is damaged")  # fmt: skip
        os.replace(tmp, path)  # several workers may fetch one shard: the same bytes win
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_index(shard: Shard, data: bytes | None = None) -> list[tuple[int, int, int]]:
    """A shard's sample index (read here, or its bytes as read): each sample's (offset,
    length, CRC-32), checked against the shard's size; a damaged one is a StorageError."""
    where = shard.index
    assert where is not None
    try:
        doc = json.loads(read_bytes(where) if data is None else data)
        samples = [(int(o), int(n), int(c)) for o, n, c in doc["samples"]]
        if doc.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {INDEX_FORMAT!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise StorageError(f"{where}: not a shard index ({type(err).__name__}: {err})") from None
    at = 0
    for offset, length, _ in samples:
        if offset != at or length <= 0:
            raise StorageError(f"{where}: not a shard index (sample spans do not tile the tar)")
        at += length
    if shard.size and at > shard.size:
        raise StorageError(f"{where}: its samples run to byte {at}, past the shard's {shard.size}")
    return samples


def sample_of(data: bytes, where: object) -> dict[str, Any]:
    """One sample from its bytes in a shard (its members), as `read_samples` yields it."""
    import io

    sample: dict[str, Any] = {}
    try:
        for entry in tar_members(io.BytesIO(data), whole=False):
            split = split_member(entry.name)
            if split is None:
                continue
            sample.setdefault("__key__", split[0])
            sample[split[1]] = entry.read()
    except (EOFError, ValueError) as err:
        raise StorageError(f"{where}: a sample does not parse as tar members ({err})") from None
    return sample


def member(sample: dict[str, Any], side: str) -> tuple[bytes, str]:
    for name, value in sample.items():
        if name.startswith(side + "."):
            return value, name[len(side) + 1 :]
    raise ValueError(f"no {side} member")

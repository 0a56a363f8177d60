"""toolkit.data.sharding.shard: tar contents, manifest, splits, workers, bad input, overwrite,
per-sample metadata."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import helpers
from toolkit.core.errors import UserError
from toolkit.data.format import FORMAT, SPLITS, read_manifest, tar_header
from toolkit.data.sharding import shard, split_of

RNG = np.random.default_rng(0)


def make_pairs(root: Path, n: int, hr: int = 8, start: int = 0, nested: bool = True) -> Path:
    """n paired .npy samples (hr x hr and hr/2 x hr/2 float32) under root/hr and root/lr."""
    for i in range(start, start + n):
        rel = Path(f"g{i % 3}" if nested else ".", f"s{i:05d}.npy")
        for side, size in (("hr", hr), ("lr", hr // 2)):
            path = root / side / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, RNG.random((size, size)).astype(np.float32))
    return root


def image_bytes(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def shard_keys(out: Path, manifest: dict, split: str) -> list[str]:
    keys = []
    for s in manifest["splits"][split]["shards"]:
        keys += [name.split(".")[0] for name, _ in read_tar(out / s["name"])[::2]]
    return keys


def all_keys(out: Path, manifest: dict) -> dict[str, str]:
    return {k: split for split in ("train", "val") for k in shard_keys(out, manifest, split)}


def test_members_are_source_bytes_in_pairs(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 12)
    # Sides may differ in format: an hr PNG against an lr .npy.
    (src / "hr" / "g0" / "s00000.npy").unlink()
    png = image_bytes(RNG.integers(0, 256, (8, 8), dtype=np.uint8), "PNG")
    (src / "hr" / "g0" / "s00000.PNG").write_bytes(png)
    out = tmp_path / "out"
    manifest = shard(src, out, shard_size=5, val_fraction=0.25)
    seen = 0
    for split in ("train", "val"):
        for s in manifest["splits"][split]["shards"]:
            members = read_tar(out / s["name"])
            assert len(members) == 2 * s["count"]
            for (hr_name, hr_data), (lr_name, lr_data) in zip(
                members[::2], members[1::2], strict=True
            ):
                key, side, ext = hr_name.split(".")
                assert side == "hr" and lr_name == f"{key}.lr.npy"
                hr_file = src / "hr" / f"{key}.{'PNG' if ext == 'png' else ext}"
                assert hr_data == hr_file.read_bytes()
                assert lr_data == (src / "lr" / f"{key}.npy").read_bytes()
                seen += 1
    assert seen == 12
    assert "g0/s00000" in all_keys(out, manifest)


def test_manifest_describes_the_files(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 30)
    out = tmp_path / "out"
    manifest = shard(src, out, shard_size=7, seed=3)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format"] == FORMAT and manifest["kind"] == "paired"
    assert manifest["source"] == str(src.resolve())
    assert (manifest["seed"], manifest["val_fraction"], manifest["shard_size"]) == (3, 0.1, 7)
    assert manifest["channels"] == [1]
    assert manifest["hr_size"] == {"min": [8, 8], "max": [8, 8]}
    assert manifest["skipped"] == []
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert [s["name"] for s in shards] == [
            f"{split}/shard-{i:06d}.tar" for i in range(len(shards))
        ]
        assert manifest["splits"][split]["count"] == sum(s["count"] for s in shards)
        for s in shards:
            data = (out / s["name"]).read_bytes()
            assert s["bytes"] == len(data)
            assert s["sha256"] == hashlib.sha256(data).hexdigest()
            assert len(read_tar(out / s["name"])) == 2 * s["count"] <= 2 * 7
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 30
    entries = [s for sp in manifest["splits"].values() for s in sp["shards"]]
    assert all(s["index"] == s["name"].replace(".tar", ".idx") for s in entries)
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        ["manifest.json", "train", "val"]
        + [s[k].split("/")[1] for s in entries for k in ("name", "index")]
    )


def test_each_shards_index_gives_its_samples_byte_spans_and_crcs(tmp_path: Path) -> None:
    """Checked against Python's tarfile: a sample starts at its first member's header and
    ends where the next sample's first header starts (the last: where the end blocks do)."""
    src = make_pairs(tmp_path / "src", 20)
    out = tmp_path / "out"
    manifest = shard(src, out, shard_size=6, val_fraction=0.0)
    for entry in manifest["splits"]["train"]["shards"]:
        data = (out / entry["name"]).read_bytes()
        with tarfile.open(out / entry["name"]) as tar:
            members = tar.getmembers()
        keys = [m.name.split(".")[0] for m in members]
        firsts = [m.offset for i, m in enumerate(members) if i == 0 or keys[i] != keys[i - 1]]
        last = members[-1]
        ends = [*firsts[1:], last.offset_data + -(-last.size // 512) * 512]
        index = json.loads((out / entry["index"]).read_text())
        assert index["format"] == "srmae-index/1"
        assert [(o, n) for o, n, _ in index["samples"]] == [
            (a, b - a) for a, b in zip(firsts, ends, strict=True)
        ]
        assert [c for *_, c in index["samples"]] == [
            zlib.crc32(data[a:b]) for a, b in zip(firsts, ends, strict=True)
        ]
        assert len(firsts) == entry["count"]


def test_splits_partition_the_samples_by_the_key_hash(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 40)
    out = tmp_path / "out"
    manifest = shard(src, out, val_fraction=0.3, shard_size=6)
    train, val = shard_keys(out, manifest, "train"), shard_keys(out, manifest, "val")
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(f"g{i % 3}/s{i:05d}" for i in range(40))
    assert all(split_of(k, 0, 0.3) == "val" for k in val)
    assert all(split_of(k, 0, 0.3) == "train" for k in train)
    assert 0 < len(val) < len(train)


def test_same_seed_same_split_other_seed_differs(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 60)
    a = shard(src, tmp_path / "a", val_fraction=0.3)
    b = shard(src, tmp_path / "b", val_fraction=0.3)
    c = shard(src, tmp_path / "c", val_fraction=0.3, seed=1)
    assert a["splits"] == b["splits"]  # same shards, byte for byte
    ka, kc = all_keys(tmp_path / "a", a), all_keys(tmp_path / "c", c)
    assert ka.keys() == kc.keys()
    assert ka != kc


def test_adding_files_does_not_move_existing_samples(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 50)
    before = all_keys(tmp_path / "a", shard(src, tmp_path / "a", val_fraction=0.2))
    make_pairs(src, 50, start=50)
    after = all_keys(tmp_path / "b", shard(src, tmp_path / "b", val_fraction=0.2))
    assert len(after) == 100
    assert {k: after[k] for k in before} == before


def test_val_fraction_within_one_percent_on_1000_samples(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tiny = np.zeros((2, 2), np.uint8)
    for i in range(1000):
        np.save(src / f"s{i:04d}.npy", tiny)
    manifest = shard(src, tmp_path / "out", shard_size=300)
    assert manifest["kind"] == "hr"
    val = manifest["splits"]["val"]["count"]
    assert manifest["splits"]["train"]["count"] + val == 1000
    # Per-sample hashing makes the count binomial (sd 9.5 on 1,000 at 0.1): seed 0 gives 102
    # here, but another seed may land outside 1%. Over many seeds the mean must be on target.
    assert abs(val / 1000 - 0.1) <= 0.01
    keys = [f"s{i:04d}" for i in range(1000)]
    per_seed = [sum(split_of(k, seed, 0.1) == "val" for k in keys) for seed in range(20)]
    assert abs(sum(per_seed) / 20_000 - 0.1) <= 0.005


def test_one_and_two_workers_write_identical_shards(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 45)
    one = shard(src, tmp_path / "w1", shard_size=4, workers=1)
    two = shard(src, tmp_path / "w2", shard_size=4, workers=2)
    assert len(one["splits"]["train"]["shards"]) > 4
    assert one["splits"] == two["splits"]
    assert one["channels"] == two["channels"] and one["hr_size"] == two["hr_size"]


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_files_are_skipped_and_listed(tmp_path: Path, workers: int) -> None:
    src = make_pairs(tmp_path / "src", 20)
    lr = src / "lr" / "g1" / "s00004.npy"
    lr.write_bytes(lr.read_bytes()[:-7])
    hr = src / "hr" / "g2" / "s00005.npy"
    hr.write_bytes(b"not an array")
    out = tmp_path / "out"
    manifest = shard(src, out, workers=workers, shard_size=3)
    assert [e["path"] for e in manifest["skipped"]] == ["hr/g2/s00005.npy", "lr/g1/s00004.npy"]
    assert "truncated" in manifest["skipped"][1]["reason"]
    keys = all_keys(out, manifest)
    assert len(keys) == 18
    assert "g1/s00004" not in keys and "g2/s00005" not in keys


def test_a_shard_left_empty_by_skips_is_dropped_and_names_stay_contiguous(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 10, nested=False)
    for i in (2, 5, 6):
        (src / "hr" / f"s{i:05d}.npy").write_bytes(b"\x93NUMPY broken")
    out = tmp_path / "out"
    manifest = shard(src, out, shard_size=1, val_fraction=0.0)
    shards = manifest["splits"]["train"]["shards"]
    assert [s["name"] for s in shards] == [f"train/shard-{i:06d}.tar" for i in range(7)]
    assert all(s["count"] == 1 for s in shards)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        f"shard-{i:06d}.{ext}" for i in range(7) for ext in ("tar", "idx")
    )
    assert len(manifest["skipped"]) == 3


def test_strict_fails_on_a_corrupt_file_and_changes_nothing(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 20)
    bad = src / "hr" / "g0" / "s00009.npy"
    bad.write_bytes(bad.read_bytes()[:-50])
    fresh = tmp_path / "fresh"
    for workers in (1, 2):
        with pytest.raises(UserError, match=r"hr/g0/s00009\.npy: truncated"):
            shard(src, fresh, strict=True, shard_size=1, workers=workers)
        assert not fresh.exists()

    old = tmp_path / "old"
    make_pairs(tmp_path / "src2", 5)
    shard(tmp_path / "src2", old)
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    for workers in (1, 2):
        with pytest.raises(UserError, match="s00009"):
            shard(src, old, strict=True, overwrite=True, shard_size=2, workers=workers)
        assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


def test_every_file_corrupt_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"nope")
    (src / "b.npy").write_bytes(b"nope")
    with pytest.raises(UserError, match="no sample could be read"):
        shard(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_and_removes_stale_shards(tmp_path: Path) -> None:
    src = make_pairs(tmp_path / "src", 30)
    out = tmp_path / "out"
    first = shard(src, out, shard_size=2)
    assert len(first["splits"]["train"]["shards"]) > 3
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        shard(src, out, shard_size=50)
    second = shard(src, out, shard_size=50, overwrite=True)
    assert len(second["splits"]["train"]["shards"]) == 1
    named = {out / s[k] for sp in second["splits"].values() for s in sp["shards"]
             for k in ("name", "index")}  # fmt: skip
    assert set((out / "train").iterdir()) | set((out / "val").iterdir()) == named
    assert (out / "notes.txt").read_text() == "mine"  # not a shard: left alone
    for s in second["splits"]["train"]["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]


def test_images_with_mixed_channels_and_sizes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "grey.png").write_bytes(image_bytes(np.zeros((10, 12), np.uint8), "PNG"))
    (src / "a" / "rgb.jpg").write_bytes(image_bytes(np.zeros((20, 6, 3), np.uint8), "JPEG"))
    (src / "b.tiff").write_bytes(image_bytes(np.zeros((15, 15), np.uint16), "TIFF"))
    manifest = shard(src, tmp_path / "out", val_fraction=0.0)
    assert manifest["kind"] == "hr"
    assert manifest["channels"] == [1, 3]
    assert manifest["hr_size"] == {"min": [10, 6], "max": [20, 15]}
    names = [n for n, _ in read_tar(tmp_path / "out" / "train" / "shard-000000.tar")]
    assert sorted(names) == ["a/grey.hr.png", "a/rgb.hr.jpg", "b.hr.tiff"]


def test_long_and_non_ascii_keys_survive_the_tar(tmp_path: Path) -> None:
    src = tmp_path / "src"
    deep = src / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    np.save(deep / "ünïcode image.v1.npy", np.zeros((3, 3), np.float32))
    out = tmp_path / "out"
    manifest = shard(src, out, val_fraction=0.0)
    ((name, data),) = read_tar(out / manifest["splits"]["train"]["shards"][0]["name"])
    assert name == f"{'d' * 60}/{'e' * 60}/ünïcode image_v1.hr.npy"
    assert data == (deep / "ünïcode image.v1.npy").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"val_fraction": -0.1}, "--val-fraction"),
        ({"val_fraction": float("nan")}, "--val-fraction"),
        ({"shard_size": 0}, "--shard-size"),
        ({"workers": 0}, "--workers"),
    ],
)
def test_argument_checks(tmp_path: Path, kwargs: dict, flag: str) -> None:
    src = make_pairs(tmp_path / "src", 2)
    with pytest.raises(UserError, match=flag):
        shard(src, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a", "g0/s00001.hr.npy", "x" * 100, "x" * 101, "ü.npy", "a b/c"])
@pytest.mark.parametrize("size", [0, 1, 512, 123_456_789, 8**11 - 1, 8**11])
def test_fast_header_is_what_tarfile_writes(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    assert tar_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("most", [None, 1, 700, 4096])
def test_the_tar_is_tarfiles_bytes_and_its_sha256_however_writev_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most: int | None
) -> None:
    """Members gathered into runs (over TarWriter._FLUSH bytes here) and written with writev:
    the file is what tarfile writes, and the digest is its sha256, even where a writev takes
    only `most` bytes at a time."""
    import os

    from toolkit.data import format as fmt

    if most is not None:
        writev = os.writev

        def short(fd: int, buffers: list) -> int:
            return writev(fd, [memoryview(b"".join(bytes(b) for b in buffers))[:most]])

        monkeypatch.setattr(fmt.os, "writev", short)
    monkeypatch.setattr(fmt.TarWriter, "_FLUSH", 3000)
    members = [(f"k{i}.{ext}", RNG.bytes(n)) for i, n in enumerate([0, 1, 511, 512, 2000, 5000])
               for ext in ("hr.npy", "json")]  # fmt: skip
    path = tmp_path / "t.tar"
    with open(path, "wb", buffering=0) as f, fmt.TarWriter(f) as tar:
        for i in range(0, len(members), 2):
            tar.add(members[i : i + 2])
        digest = tar.close()
    data = path.read_bytes()
    assert data == tarfile_bytes(members) and tar.size == len(data)
    assert digest == hashlib.sha256(data).hexdigest()


def test_files_are_read_and_checked_ahead_in_order() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from toolkit.data.sharding import ahead

    with ThreadPoolExecutor(1) as pool:
        for run, depth in ((1, 0), (3, 1), (8, 2), (100, 1)):
            assert list(ahead(pool, lambda x: x * x, list(range(25)), run, depth)) == [
                x * x for x in range(25)
            ]
        assert list(ahead(pool, str, [], 4, 2)) == []


def test_webdataset_reads_the_shards_as_samples(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    src = make_pairs(tmp_path / "src", 9)
    out = tmp_path / "out"
    manifest = shard(src, out, val_fraction=0.0, shard_size=4)
    urls = [str(out / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 9
    for sample in samples:
        assert sample["hr.npy"] == (src / "hr" / f"{sample['__key__']}.npy").read_bytes()
        assert sample["lr.npy"] == (src / "lr" / f"{sample['__key__']}.npy").read_bytes()


# ---------------------------------------------------------------- per-sample metadata


def pairs_with_meta(root: Path, count: int) -> Path:
    """helpers.make_pairs (keys 0000, 0001, ...) and meta/<key>.json for the samples whose index
    is not a multiple of 3."""
    helpers.make_pairs(root, count, size=8)
    (root / "meta").mkdir()
    for i in range(count):
        if i % 3:
            doc = {"psf": "gaussian", "hr_psf_fwhm": 0.1 + i / 100, "note": f"sample {i}"}
            (root / "meta" / f"{i:04d}.json").write_text(json.dumps(doc, indent=1))
    return root


def test_meta_is_stored_as_each_samples_json_member_and_counted(tmp_path: Path) -> None:
    out = helpers.make_shards(tmp_path, 12, images=pairs_with_meta, val_fraction=0.3, shard_size=5)
    src = tmp_path / "src"
    manifest = json.loads((out / "manifest.json").read_text())
    members: dict[str, list[str]] = {}
    for split in SPLITS:
        stored = 0
        for s in manifest["splits"][split]["shards"]:
            for name, data in read_tar(out / s["name"]):
                key, _, ext = name.partition(".")
                members.setdefault(key, []).append(ext)
                if ext == "json":  # the file's own bytes, under webdataset's name
                    assert data == (src / "meta" / f"{key}.json").read_bytes()
                    stored += 1
        assert manifest["meta"][split] == stored
        assert manifest["splits"][split]["count"] > 0
    assert sum(manifest["meta"].values()) == 8 and manifest["skipped"] == []
    # Every sample, its members together: the images, then its metadata where it has any.
    assert sorted(members) == [f"{i:04d}" for i in range(12)]
    for key, exts in members.items():
        assert exts == ["hr.npy", "lr.npy"] + (["json"] if int(key) % 3 else [])
    assert read_manifest(out).meta == manifest["meta"]


def test_a_manifest_from_before_meta_reads_as_none(tmp_path: Path) -> None:
    out = helpers.make_shards(tmp_path, 4, val_fraction=0.0)
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["meta"] == {"train": 0, "val": 0}  # pairs without meta/
    del doc["meta"]
    (out / "manifest.json").write_text(json.dumps(doc))
    assert read_manifest(out).meta == {} and read_manifest(out).count("train") == 4


def test_webdataset_reads_the_meta_member_as_the_samples_json(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    out = helpers.make_shards(tmp_path, 6, images=pairs_with_meta, val_fraction=0.0)
    urls = [str(s.path) for s in read_manifest(out).splits["train"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(samples) == 6
    for sample in samples:
        i = int(sample["__key__"])
        assert ("json" in sample) == bool(i % 3)
        if i % 3:
            assert sample["json"]["note"] == f"sample {i}"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"psf": "gaussian",', "not readable JSON: Expecting"),
        (b"[0.1, 0.2]", "a JSON list, not an object"),
        (b'{"hr_psf_fwhm": NaN}', "not readable JSON: NaN is not JSON"),
        (b'"gaussian"', "a JSON str, not an object"),
        (b'{"a": "\x80"}', "not readable JSON: 'utf-8' codec can't decode"),
    ],
)
def test_a_bad_meta_file_skips_its_sample_with_the_reason(
    tmp_path: Path, data: bytes, reason: str
) -> None:
    src = pairs_with_meta(tmp_path / "src", 9)
    (src / "meta" / "0004.json").write_bytes(data)
    manifest = shard(src, tmp_path / "out", val_fraction=0.0, shard_size=4)
    [skipped] = manifest["skipped"]
    assert skipped["path"] == "meta/0004.json" and skipped["reason"].startswith(reason), skipped
    keys = [name.split(".")[0] for s in manifest["splits"]["train"]["shards"]
            for name, _ in read_tar(tmp_path / "out" / s["name"])]  # fmt: skip
    assert "0004" not in keys and len(set(keys)) == manifest["splits"]["train"]["count"] == 8
    assert manifest["meta"] == {"train": 5, "val": 0}  # 1, 2, 5, 7, 8: 4 went with its sample
    # --strict: one error naming the file, nothing written; as for a corrupt image.
    for workers in (1, 2):
        with pytest.raises(UserError, match=r"meta/0004\.json: .*\(--strict: nothing was written"):
            shard(src, tmp_path / "strict", strict=True, val_fraction=0.0, shard_size=4,
                  workers=workers)  # fmt: skip
        assert not (tmp_path / "strict").exists()


def test_a_bad_meta_is_listed_beside_a_bad_image_of_its_sample(tmp_path: Path) -> None:
    src = pairs_with_meta(tmp_path / "src", 6)
    (src / "meta" / "0002.json").write_text("nope")
    (src / "lr" / "0002.npy").write_bytes(b"nope")
    manifest = shard(src, tmp_path / "out", val_fraction=0.0)
    assert [e["path"] for e in manifest["skipped"]] == ["lr/0002.npy", "meta/0002.json"]
    assert manifest["splits"]["train"]["count"] == 5 and manifest["meta"]["train"] == 3


# ---------------------------------------------------------------- labelled sources


def class_folders(root: Path, counts: dict[str, int]) -> Path:
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / c / f"{i:03d}.npy", np.full((8, 8), i / 100, np.float32))
    return root


def test_labels_are_the_class_folders_stored_as_cls_and_counted(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    src = class_folders(tmp_path / "src", {"vortex": 40, "cdm": 30, "no_sub": 35})
    manifest = shard(src, tmp_path / "out", val_fraction=0.2, shard_size=16, labels=True)
    assert manifest["classes"] == ["cdm", "no_sub", "vortex"]  # sorted: the label is the index
    counts = manifest["class_counts"]
    assert [a + b for a, b in zip(counts["train"], counts["val"], strict=True)] == [30, 35, 40]
    assert sum(counts["val"]) == manifest["splits"]["val"]["count"] and min(counts["val"]) > 0
    urls = [str(tmp_path / "out" / s["name"]) for split in manifest["splits"].values()
            for s in split["shards"]]  # fmt: skip
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        seen[sample["__key__"]] = int(sample["cls"])  # webdataset's own reading of `cls`
    assert len(seen) == 105
    assert all(manifest["classes"][label] == key.split("/")[0] for key, label in seen.items())


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"cdm": 20}, r"one class folder \(cdm\): expected two or more"),
        ({"cdm": 20, "no_sub": 1}, r"class no_sub has no sample in val at --val-fraction 0.1"),
    ],
)
def test_bad_labelled_sources_are_one_line(tmp_path: Path, layout: dict, message: str) -> None:
    src = class_folders(tmp_path / "src", layout)
    with pytest.raises(UserError, match=message):
        shard(src, tmp_path / "out", labels=True)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_loose_file_or_pairs_cannot_be_labelled(tmp_path: Path) -> None:
    src = class_folders(tmp_path / "src", {"cdm": 5, "vortex": 5})
    np.save(src / "stray.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(UserError, match=r"stray lies in no class folder"):
        shard(src, tmp_path / "out", labels=True)
    with pytest.raises(UserError, match=r"--labels needs class folders of images, not hr/ \+ lr/"):
        shard(make_pairs(tmp_path / "pairs", 4), tmp_path / "out2", labels=True)


@pytest.mark.parametrize("most", [None, 3, 1000])
def test_a_file_is_read_whole_however_much_each_read_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most: int | None
) -> None:
    import os

    from toolkit.data import sharding

    data = RNG.bytes(5000)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    if most is not None:
        read = os.read
        monkeypatch.setattr(sharding.os, "read", lambda fd, n: read(fd, min(n, most)))
    assert sharding._read(tmp_path / "f") == data and sharding._read(tmp_path / "empty") == b""
    with pytest.raises(ValueError, match="unreadable"):
        sharding._read(tmp_path / "missing")


def test_files_are_read_ahead_in_runs_of_a_few_megabytes_at_most(tmp_path: Path) -> None:
    """Small files are read in runs of many samples, large ones one at a time (a count alone
    would hold gigabytes of large files in memory)."""
    from toolkit.data import sharding
    from toolkit.data.sources import Item

    def job(size: int) -> sharding.ShardJob:
        (tmp_path / f"{size}.npy").write_bytes(bytes(size))
        item = Item("k", tmp_path / f"{size}.npy", None)
        return sharding.ShardJob("train", 0, tmp_path, tmp_path, [item], False)

    assert sharding.read_run(job(1000)) == sharding._READ_RUN
    assert sharding.read_run(job(sharding._READ_BYTES // 4)) == 4
    assert sharding.read_run(job(sharding._READ_BYTES * 3)) == 1

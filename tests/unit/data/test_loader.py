"""The streaming loader: rank x worker splits, equal batches, exact resume, crops, bad shards,
each sample's PSFs and normalisation statistics."""

from __future__ import annotations

import collections
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import helpers
from tests.helpers import make_shards
from toolkit.core.errors import UserError
from toolkit.data import loader as L
from toolkit.data import plan as P
from toolkit.data.degrade import degrade
from toolkit.data.normalise import Normalisation
from toolkit.data.sharding import shard
from toolkit.runs.recipe import DataConfig


def make_pairs(root: Path, n: int, size: int = 8, scale: int = 2) -> None:
    """HR images whose pixels encode their index; LR = 2x2 block means, so crops can be checked."""
    (root / "hr").mkdir(parents=True)
    (root / "lr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        hr = rng.random((size, size), dtype=np.float32)
        hr[0, 0] = i / 1000
        lr = hr.reshape(size // scale, scale, size // scale, scale).mean(axis=(1, 3))
        np.save(root / "hr" / f"{i:04d}.npy", hr)
        np.save(root / "lr" / f"{i:04d}.npy", lr.astype(np.float32))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Uneven, small shards: 7 samples each, the last one shorter.
    root = tmp_path_factory.mktemp("data")
    return make_shards(root, 60, images=make_pairs, seed=0, val_fraction=0.2, shard_size=7)


def cfg(shards: Path, **kw: object) -> DataConfig:
    base = {"shards": str(shards), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 5}
    return DataConfig(**{**base, **kw})


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def all_keys(shards: Path, split: str) -> list[str]:
    import tarfile

    m = json.loads((shards / "manifest.json").read_text())
    out = []
    for s in m["splits"][split]["shards"]:
        with tarfile.open(shards / s["name"]) as tar:
            out += sorted({n.name.split(".")[0] for n in tar.getmembers()})
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_disjoint_complete_equal_batches(shards: Path, workers: int) -> None:
    train = all_keys(shards, "train")
    loaders = [
        L.build_loader(
            cfg(shards, num_workers=workers), "train", crop=8, seed=1, rank=r, world_size=2
        )
        for r in range(2)
    ]
    per_rank = [list(ld) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == loaders[0].batches_per_epoch
    seen = collections.Counter(keys_of(per_rank[0]) + keys_of(per_rank[1]))
    assert set(seen) == set(train)  # complete
    assert sum(seen.values()) - len(train) == loaders[0].padding  # only the padding repeats
    assert loaders[0].padding == (-len(train)) % 2
    for b in per_rank[0] + per_rank[1]:
        assert b["hr"].shape[1:] == (1, 8, 8) and b["lr"].shape[1:] == (1, 4, 4)
        assert b["hr"].dtype == torch.float32


def test_workers_split_a_rank_disjointly_and_order_is_deterministic(shards: Path) -> None:
    def run(epoch: int, workers: int) -> list[str]:
        ld = L.build_loader(cfg(shards, num_workers=workers), "train", crop=8, seed=3)
        ld.load_state_dict({"epoch": epoch, "batch": 0})
        return keys_of(list(ld))

    first, again = run(0, 2), run(0, 2)
    assert first == again and len(first) == len(set(first))
    assert sorted(first) == sorted(all_keys(shards, "train"))
    assert run(1, 2) != first  # a new epoch reshuffles


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_cursor_gives_exactly_the_remaining_batches(shards: Path, workers: int) -> None:
    c = cfg(shards, num_workers=workers)
    full = L.build_loader(c, "train", crop=8, seed=5, rank=1, world_size=2)
    epoch0 = list(full)
    epoch1 = list(full)
    for k in (1, 2, len(epoch0) - 1):
        ld = L.build_loader(c, "train", crop=8, seed=5, rank=1, world_size=2)
        it = iter(ld)
        for _ in range(k):
            next(it)
        state = ld.state_dict()
        assert state == {"epoch": 0, "batch": k}
        resumed = L.build_loader(c, "train", crop=8, seed=5, rank=1, world_size=2)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert keys_of(rest) == keys_of(epoch0[k:])
        assert all(torch.equal(a["hr"], b["hr"]) for a, b in zip(rest, epoch0[k:], strict=True))
        assert keys_of(list(resumed)) == keys_of(epoch1)  # and the next epoch continues alike


def test_validation_counts_each_sample_once_across_ranks(shards: Path) -> None:
    val = all_keys(shards, "val")
    assert len(val) % 3  # uneven shares, so the padding path is exercised
    seen, counts = [], set()
    for r in range(3):
        ld = L.build_loader(
            cfg(shards, val_batch_size=3), "val", crop=8, seed=0, rank=r, world_size=3
        )
        assert ld.padding == 0
        batches = list(ld)
        counts.add(len(batches))
        seen += [k for b in batches for k, ok in zip(b["key"], b["valid"], strict=True) if ok]
    assert sorted(seen) == sorted(val)  # each exactly once, counting only valid positions
    assert len(counts) == 1  # every rank runs the same number of batches


def test_paired_crop_takes_lr_at_hr_coordinates(tmp_path: Path) -> None:
    make_pairs(tmp_path / "src", 12, size=16)
    shard(tmp_path / "src", tmp_path / "sh", val_fraction=0.0, shard_size=5)
    for batch in L.build_loader(cfg(tmp_path / "sh"), "train", crop=8, seed=0):
        hr, lr = batch["hr"], batch["lr"]
        assert hr.shape[-1] == 8 and lr.shape[-1] == 4
        blocks = hr.reshape(-1, 1, 4, 2, 4, 2).mean(dim=(3, 5))
        torch.testing.assert_close(lr, blocks)


def test_hr_only_shards_make_lr_by_degradation_and_pretrain_skips_it(tmp_path: Path) -> None:
    make_pairs(tmp_path / "src", 10, size=8)
    shard(tmp_path / "src" / "hr", tmp_path / "sh", val_fraction=0.0, shard_size=4)
    batch = next(iter(L.build_loader(cfg(tmp_path / "sh"), "train", crop=8, seed=0)))
    torch.testing.assert_close(batch["lr"], degrade(batch["hr"], 2))
    pre = next(iter(L.build_loader(cfg(tmp_path / "sh"), "train", crop=8, seed=0, fields=("hr",))))
    assert "lr" not in pre and pre["hr"].shape == (4, 1, 8, 8)


def test_fewer_shards_than_ranks_times_workers(tmp_path: Path) -> None:
    make_pairs(tmp_path / "src", 10)
    shard(tmp_path / "src", tmp_path / "sh", val_fraction=0.0, shard_size=100)
    keys = []
    for r in range(2):
        ld = L.build_loader(
            cfg(tmp_path / "sh", num_workers=2, batch_size=2),
            "train",
            crop=8,
            seed=0,
            rank=r,
            world_size=2,
        )
        keys += keys_of(list(ld))
    assert sorted(keys) == sorted(f"{i:04d}" for i in range(10))


def test_corrupt_shard_is_skipped_with_a_warning_and_batches_stay_equal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_pairs(tmp_path / "src", 20)
    shard(tmp_path / "src", tmp_path / "sh", val_fraction=0.0, shard_size=5)
    good = L.build_loader(cfg(tmp_path / "sh"), "train", crop=8, seed=0)
    expected = good.batches_per_epoch
    victim = tmp_path / "sh" / "train" / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:1500])  # truncated mid-sample
    with caplog.at_level(logging.WARNING):
        batches = list(L.build_loader(cfg(tmp_path / "sh"), "train", crop=8, seed=0))
    assert len(batches) == expected and sum(len(b["key"]) for b in batches) == 20
    warned = [r.getMessage() for r in caplog.records if "shard-000001.tar" in r.getMessage()]
    assert warned and any("lost" in w for w in warned)


def test_samples_lost_in_a_damaged_val_shard_are_not_counted_twice(tmp_path: Path) -> None:
    """A lost sample is replaced by a repeat, which evaluation must skip: each key once."""
    make_pairs(tmp_path / "src", 20)
    shard(tmp_path / "src", tmp_path / "sh", val_fraction=0.9, shard_size=5)
    n = L.read_manifest(tmp_path / "sh").count("val")
    victim = tmp_path / "sh" / "val" / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:1500])
    batches = list(L.build_loader(cfg(tmp_path / "sh"), "val", crop=8, seed=0))
    pairs = [zip(b["key"], b["valid"].tolist(), strict=True) for b in batches]
    keys = [k for batch in pairs for k, ok in batch if ok]
    assert len(keys) == len(set(keys)) and n - 5 <= len(keys) < n
    assert sum(len(b["key"]) for b in batches) == n  # the batches keep their size


def test_missing_shard_is_an_error_before_training(tmp_path: Path) -> None:
    make_pairs(tmp_path / "src", 8)
    shard(tmp_path / "src", tmp_path / "sh", val_fraction=0.0, shard_size=4)
    (tmp_path / "sh" / "train" / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match=r"names train/shard-000001.tar, but .* is missing"):
        L.build_loader(cfg(tmp_path / "sh"), "train", crop=8, seed=0)
    with pytest.raises(UserError, match=r"manifest\.json: not found"):
        L.build_loader(cfg(tmp_path / "nowhere"), "train", crop=8, seed=0)


def test_plan_helpers() -> None:
    assert P.split_even(7, 3) == [3, 2, 2]
    # Round robin over workers with 3, 2 and 2 batches; the next worker after 4 is worker 1.
    assert P.resume_point(4, [3, 2, 2]) == ([2, 1, 1], 1)
    assert P.resume_point(7, [3, 2, 2]) == ([3, 2, 2], 1)
    order = P.buffered_shuffle(np.arange(50), 4, np.random.default_rng(0)).tolist()
    assert sorted(order) == list(range(50)) and order != list(range(50))
    # Nothing is emitted more than `size` items after it was read.
    assert all(pos >= item - 4 for pos, item in enumerate(order))


def test_segments_cover_a_range_with_wraparound_as_an_explicit_listing_would() -> None:
    """Bisection in the cumulative counts against the plain listing of every position."""
    from toolkit.data.format import Shard

    rng = np.random.default_rng(1)
    order = [Shard(f"s{i}", int(c), Path(f"s{i}")) for i, c in enumerate(rng.integers(1, 9, 40))]
    listing = [(s.name, j) for s in order for j in range(s.count)]  # position -> (shard, index)
    total = len(listing)
    for lo, hi in [
        (0, total),
        (5, 6),
        (17, 90),
        (total - 3, total + 10),
        (2 * total + 1, 3 * total),
    ]:
        segs = P.segments(order, lo, hi)
        got = [
            (g.shard.name, g.start + k, g.first + k) for g in segs for k in range(g.stop - g.start)
        ]
        assert got == [(*listing[p % total], p) for p in range(lo, hi)]


def test_workers_live_across_epochs_and_each_epoch_is_a_fresh_one(shards: Path) -> None:
    """Persistent workers: the same processes serve every epoch, and still read each epoch in
    that epoch's order (what a loader made afresh for it reads), from the cursor it resumes."""
    c = cfg(shards, num_workers=2)
    ld = L.build_loader(c, "train", crop=8, seed=3)
    first = keys_of(list(ld))
    pids = {w.pid for w in ld._loader._iterator._workers}
    second = keys_of(list(ld))
    assert {w.pid for w in ld._loader._iterator._workers} == pids  # not forked again
    fresh = L.build_loader(c, "train", crop=8, seed=3)
    fresh.load_state_dict({"epoch": 1, "batch": 0})
    assert second == keys_of(list(fresh)) and second != first
    ld.close()
    fresh.close()
    assert ld._loader is None


class CountingFile:
    """A file that counts the bytes read from it (seeks are free)."""

    def __init__(self, f) -> None:
        self.f, self.read_bytes = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def test_samples_not_wanted_are_seeked_over_not_read(shards: Path) -> None:
    from toolkit.data.format import read_samples, read_tar

    path = next((shards / "train").glob("shard-*.tar"))
    with open(path, "rb") as f:
        members = list(read_tar(f))
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    with open(path, "rb") as f:
        stream = CountingFile(f)
        rows = list(read_samples(stream, 2, 6, lambda i: i % 2 == 0))
    assert [i for i, _ in rows] == [2, 3, 4, 5]
    assert [s and s["__key__"] for _, s in rows] == [keys[2], None, keys[4], None]
    assert set(rows[0][1]) == {"__key__", "hr.npy", "lr.npy"}
    assert rows[0][1]["hr.npy"] == dict(members)[f"{keys[2]}.hr.npy"]
    # the bytes read: the headers of samples 0-5 and of the first member of 6, and the data of
    # samples 2 and 4, nothing else
    wanted = sum(len(d) for n, d in members if n.split(".")[0] in (keys[2], keys[4]))
    assert stream.read_bytes == 512 * (2 * 6 + 1) + wanted < path.stat().st_size


def test_a_truncated_shard_is_found_even_when_seeking(tmp_path: Path, shards: Path) -> None:
    from toolkit.data.format import read_samples

    path = next((shards / "train").glob("shard-*.tar"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with open(cut, "rb") as f, pytest.raises(EOFError, match="tar ends"):
        list(read_samples(f, 0, 100, lambda i: False))  # nothing wanted: all seeks


def keys_by_shard(shards: Path, split: str) -> dict[str, str]:
    """key -> name of the shard holding it."""
    import tarfile

    m = json.loads((shards / "manifest.json").read_text())
    out = {}
    for s in m["splits"][split]["shards"]:
        with tarfile.open(shards / s["name"]) as tar:
            out.update({n.name.split(".")[0]: s["name"] for n in tar.getmembers()})
    return out


def one_epoch(c: DataConfig, epoch: int, crop: int = 8) -> list[dict]:
    ld = L.build_loader(c, "train", crop=crop, seed=3)
    ld.load_state_dict({"epoch": epoch, "batch": 0})
    out = list(ld)
    ld.close()
    return out


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one")
    return make_shards(root, 40, images=make_pairs, seed=0, val_fraction=0.1, shard_size=1000)


def test_the_shard_order_alone_changes_with_the_epoch(shards: Path) -> None:
    """No shuffle buffer, whole images: what changes between epochs is the order of the shards,
    each read through in its own order."""
    c = cfg(shards, shuffle_buffer=0, augment=False)
    where = keys_by_shard(shards, "train")
    runs = []
    for epoch in (0, 1):
        keys = keys_of(one_epoch(c, epoch))
        order = [
            s for i, s in enumerate(where[k] for k in keys) if i == 0 or where[keys[i - 1]] != s
        ]
        assert len(order) == len(set(order))  # each shard read in one run
        runs.append({s: [k for k in keys if where[k] == s] for s in order})
    assert list(runs[0]) != list(runs[1])  # the shards come in another order
    assert runs[0] == runs[1]  # and inside each shard, the same order as before


def test_the_order_inside_a_worker_alone_changes_with_the_epoch(one_shard: Path) -> None:
    """One shard (its order cannot change), whole images: the shuffle buffer's order changes
    with the epoch; without a buffer nothing does."""
    buffered = [keys_of(one_epoch(cfg(one_shard, augment=False), e)) for e in (0, 1)]
    assert sorted(buffered[0]) == sorted(buffered[1]) and buffered[0] != buffered[1]
    plain = [keys_of(one_epoch(cfg(one_shard, shuffle_buffer=0, augment=False), e)) for e in (0, 1)]
    assert plain[0] == plain[1]


def test_the_random_crops_alone_change_with_the_epoch(one_shard: Path) -> None:
    """The same samples in the same order (one shard, no buffer): their crops move."""
    c = cfg(one_shard, shuffle_buffer=0, augment=False)
    a, b = one_epoch(c, 0, crop=4), one_epoch(c, 1, crop=4)
    assert keys_of(a) == keys_of(b)
    hr_a, hr_b = torch.cat([x["hr"] for x in a]), torch.cat([x["hr"] for x in b])
    moved = [not torch.equal(x, y) for x, y in zip(hr_a, hr_b, strict=True)]
    assert sum(moved) > len(moved) // 2  # 9 corners to choose from: most crops move
    assert one_epoch(c, 1, crop=8)[0]["hr"].equal(one_epoch(c, 0, crop=8)[0]["hr"])  # whole: same


# --- each sample's PSFs (meta/<key>.json) and normalisation statistics ---------------------------


def pairs_with_psfs(root: Path, count: int) -> Path:
    """helpers.make_pairs (32x32 HR, x2) with meta/<key>.json as the simulator writes it for
    samples 0, 4, 8, ...; none for 1, 5, ...; a x3 pair's pixel scales for 2, 6, ...; for 3, 7,
    ...: a Moffat PSF, or no LR FWHM."""
    helpers.make_pairs(root, count, size=32, scale=2)
    (root / "meta").mkdir()
    rng = np.random.default_rng(3)
    for i in range(count):
        fwhm = float(rng.uniform(0.1, 0.16))
        doc = {"hr_pixel": 0.03, "lr_pixel": 0.06, "psf": "gaussian", "hr_psf_fwhm": fwhm,
               "lr_psf_fwhm": 2 * fwhm, "noise_rms": 0.005, "sky": 0.03}  # fmt: skip
        if i % 4 == 1:
            continue
        if i % 4 == 2:
            doc["lr_pixel"] = 0.09
        if i % 4 == 3:
            doc.pop("lr_psf_fwhm") if i % 8 == 3 else doc.update(psf="moffat")
        (root / "meta" / f"{i:04d}.json").write_text(json.dumps(doc))
    return root


def expected_psf(meta: Path) -> list[float]:
    """The Gaussian sigmas of a sample's HR and LR PSFs in HR pixels, from its JSON, where it
    describes a Gaussian PSF at this run's scale (2); NaN otherwise."""
    if not meta.exists():
        return [math.nan, math.nan]
    doc = json.loads(meta.read_text())
    if doc["psf"] != "gaussian" or "lr_psf_fwhm" not in doc or doc["lr_pixel"] != 0.06:
        return [math.nan, math.nan]
    sigma = 2 * math.sqrt(2 * math.log(2))  # FWHM / sigma of a Gaussian
    return [
        doc["hr_psf_fwhm"] / sigma / doc["hr_pixel"],
        doc["lr_psf_fwhm"] / sigma / doc["hr_pixel"],
    ]


@pytest.fixture(scope="module")
def psf_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("psf")
    return make_shards(root, 24, images=pairs_with_psfs, val_fraction=0.4, shard_size=5)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_samples_psf_comes_from_its_json(psf_shards: Path, workers: int) -> None:
    meta = psf_shards.parent / "src" / "meta"
    seen = []
    # Training (random crops, rotations and flips) and validation alike.
    train = L.build_loader(cfg(psf_shards, augment=True, num_workers=workers), "train", crop=16,
                           seed=1)  # fmt: skip
    val = L.build_loader(cfg(psf_shards, num_workers=workers), "val", crop=16, seed=1)
    for batch in [*train, *val]:
        psf = batch["psf"]
        assert psf.dtype == torch.float32 and psf.shape == (len(batch["key"]), 2)
        expected = torch.tensor([expected_psf(meta / f"{k}.json") for k in batch["key"]])
        torch.testing.assert_close(psf, expected.float(), equal_nan=True)
        seen += batch["key"]
    assert sorted(seen) == [f"{i:04d}" for i in range(24)]
    # The data hold both: known PSFs (sigmas of 1.4 to 2.3 HR pixels in HR) and unknown ones.
    known = [k for k in seen if not math.isnan(expected_psf(meta / f"{k}.json")[0])]
    assert 0 < len(known) < len(seen)
    assert all(1.4 < expected_psf(meta / f"{k}.json")[0] < 2.3 for k in known)


def test_psf_sigmas_by_hand_and_what_leaves_them_unknown() -> None:
    doc = {"psf": "gaussian", "hr_pixel": 0.5, "lr_pixel": 1.5, "hr_psf_fwhm": 2.3548200450309493,
           "lr_psf_fwhm": 4.709640090061899}  # fmt: skip
    torch.testing.assert_close(L.psf_sigmas(json.dumps(doc).encode(), 3), torch.tensor([2.0, 4.0]))
    for bad in (None, b"{oops", b"[]", json.dumps({**doc, "hr_pixel": 0}).encode(),
                json.dumps({**doc, "hr_psf_fwhm": "wide"}).encode()):  # fmt: skip
        assert L.psf_sigmas(bad, 3).isnan().all()
    assert L.psf_sigmas(json.dumps(doc).encode(), 2).isnan().all()  # lr_pixel / hr_pixel is 3


def test_no_psf_without_lr(psf_shards: Path) -> None:
    batch = next(iter(L.build_loader(cfg(psf_shards), "train", crop=16, seed=0, fields=("hr",))))
    assert "psf" not in batch and "lr" not in batch


def test_per_image_statistics_come_with_the_batch_and_invert_it(psf_shards: Path) -> None:
    src = psf_shards.parent / "src"
    norm = Normalisation("percentile", (0.5, 99.5))
    count = 0
    for batch in L.build_loader(cfg(psf_shards, normalise="percentile"), "val", crop=16, seed=0):
        stats = batch["norm"]
        n = len(batch["key"])
        assert stats.dtype == torch.float32 and stats.shape == (n, 2, 1, 1, 1)
        for i, key in enumerate(batch["key"]):
            hr, lr = np.load(src / "hr" / f"{key}.npy"), np.load(src / "lr" / f"{key}.npy")
            # Fitted on the whole LR image (the model's input); the val crop is the centre one:
            # HR 16x16 from (8, 8), LR 8x8 from (4, 4).
            low, high = np.percentile(lr.astype(np.float64), [0.5, 99.5])
            torch.testing.assert_close(stats[i].flatten(), torch.tensor([low, high]).float())
            for name, crop in (("hr", hr[8:24, 8:24]), ("lr", lr[4:12, 4:12])):
                back = norm.invert(batch[name][i], stats[i])  # clipped at the percentiles
                torch.testing.assert_close(
                    back[0], torch.from_numpy(crop.clip(low, high).astype(np.float32))
                )
            count += 1
        # A whole batch at once: the statistics' axis first, as `fit` makes them for a batch.
        torch.testing.assert_close(
            norm.invert(batch["hr"], stats.movedim(1, 0)),
            torch.stack([norm.invert(batch["hr"][i], stats[i]) for i in range(n)]),
        )
    assert count == json.loads((psf_shards / "manifest.json").read_text())["splits"]["val"]["count"]
    unit = next(iter(L.build_loader(cfg(psf_shards, normalise="unit"), "val", crop=16, seed=0)))
    assert "norm" not in unit and set(unit) == {"key", "hr", "lr", "psf", "valid"}

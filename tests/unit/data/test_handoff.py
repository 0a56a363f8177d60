"""Batches in reused shared-memory slots: the same batches as default_collate's, a slot reused
only once nothing holds its batch, and the ordinary way when every slot is held."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from tests.helpers import make_shards
from toolkit.data import handoff as H
from toolkit.data import loader as L
from toolkit.runs.recipe import DataConfig


def make_pairs(root: Path, n: int, size: int = 8, scale: int = 2) -> None:
    (root / "hr").mkdir(parents=True)
    (root / "lr").mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        np.save(root / "hr" / f"{i:04d}.npy", rng.random((size, size), dtype=np.float32))
        np.save(root / "lr" / f"{i:04d}.npy", rng.random((size // scale,) * 2, dtype=np.float32))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return make_shards(root, 48, images=make_pairs, seed=0, val_fraction=0.0, shard_size=10)


def epoch(shards: Path, workers: int, keep: bool) -> list[dict]:
    """One epoch's batches: all of them held (`keep`), or each cloned and let go at once."""
    c = DataConfig(shards=str(shards), batch_size=4, num_workers=workers, shuffle_buffer=5)
    ld = L.build_loader(c, "train", crop=8, seed=0)
    if keep:
        out = list(ld)
    else:
        out = [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in ld]
    ld.close()
    return out


def items(n: int) -> list[dict]:
    return [{"key": f"k{i}", "hr": torch.full((1, 3, 3), float(i)), "label": torch.tensor(i),
             "valid": i % 2 == 0} for i in range(n)]  # fmt: skip


def test_a_slot_batch_is_what_default_collate_makes() -> None:
    pool = H.SlotPool(1, 2, 4096)
    batch = H.collate(items(5), pool, 0)
    assert isinstance(batch, H.SlotBatch)
    got, want = batch.tensors(), default_collate(items(5))
    assert list(got) == list(want) and got["key"] == want["key"]
    for name in ("hr", "label", "valid"):
        assert got[name].dtype == want[name].dtype and got[name].is_contiguous()
        assert torch.equal(got[name], want[name])


def test_a_slot_is_free_again_only_when_nothing_of_its_batch_is_left() -> None:
    pool = H.SlotPool(1, 1, 4096)
    hr = H.collate(items(3), pool, 0).tensors()["hr"]
    view = hr[1:]  # a view keeps the slot as much as the batch does
    del hr
    gc.collect()
    assert pool.flags[0] == 1
    assert isinstance(H.collate(items(3), pool, 0), dict)  # the only slot is held
    del view
    gc.collect()
    assert pool.flags[0] == 0
    assert isinstance(H.collate(items(3), pool, 0), H.SlotBatch)


def test_a_batch_too_big_for_a_slot_or_not_stackable_is_collated_the_ordinary_way() -> None:
    pool = H.SlotPool(1, 2, 64)
    assert isinstance(H.collate(items(5), pool, 0), dict)
    pool = H.SlotPool(1, 2, 4096)
    odd = items(2)
    odd[1]["hr"] = torch.zeros(1, 2, 2)
    with pytest.raises(RuntimeError):  # default_collate's own word on it
        H.collate(odd, pool, 0)
    assert not pool.flags.any()


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_held_for_a_whole_epoch_are_never_written_over(shards: Path, workers: int) -> None:
    kept, cloned = epoch(shards, workers, keep=True), epoch(shards, workers, keep=False)
    assert len(kept) == len(cloned) > 2 * L.SLOTS
    for a, b in zip(kept, cloned, strict=True):
        assert a["key"] == b["key"]
        for name in ("hr", "lr", "psf", "valid"):
            assert torch.equal(a[name], b[name]) or (name == "psf" and a[name].isnan().all())


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_let_go_come_back_in_slots(shards: Path, workers: int, monkeypatch) -> None:
    """A loop that lets each batch go never needs the ordinary way (a fresh segment per
    tensor); nor does the next epoch."""

    def refuse(batch: list) -> None:
        raise AssertionError("collated the ordinary way")

    monkeypatch.setattr(H, "default_collate", refuse)
    c = DataConfig(shards=str(shards), batch_size=4, num_workers=workers, shuffle_buffer=5)
    ld = L.build_loader(c, "train", crop=8, seed=0)
    for _ in range(2):
        assert sum(len(b["key"]) for b in ld) == 48
    ld.close()
    assert not ld.stream.pool.flags.any()


def test_pinned_copies_free_the_slot_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DataLoader that pins memory calls `pin_memory()` on what a worker hands over: the
    batch dict comes back as pinned copies (clones here, without a GPU), and the slot is free."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: self.clone())
    pool = H.SlotPool(1, 1, 4096)
    pinned = H.collate(items(3), pool, 0).pin_memory()
    gc.collect()
    assert pool.flags[0] == 0
    want = default_collate(items(3))
    assert pinned["key"] == want["key"] and torch.equal(pinned["hr"], want["hr"])


def test_a_pool_does_not_cross_to_a_spawned_worker() -> None:
    """Only a forked worker shares the mapping: pickled (as for a spawned worker) a pool is
    None there, and that worker collates the ordinary way."""
    import pickle

    assert pickle.loads(pickle.dumps(H.SlotPool(2, 2, 4096))) is None

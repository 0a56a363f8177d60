"""Training subsets (`data.limit`, `data.per_class`): exact counts, the same samples whatever
train.seed, nested as N grows, validation untouched, and the loader's guarantees (rank x worker
split, equal batches, exact resume) kept on a subset smaller than batch x world."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_shards
from toolkit.core.errors import UserError
from toolkit.data import loader as L
from toolkit.data import subset
from toolkit.data.format import read_manifest
from toolkit.data.sharding import shard
from toolkit.engine.steps import StepPlan
from toolkit.runs.recipe import DataConfig

CLASSES = ("a", "b", "c")


def class_images(src: Path, per_class: tuple[int, ...]) -> None:
    """Three class folders of tiny images, `per_class` of each (uneven class sizes)."""
    rng = np.random.default_rng(0)
    for c, n in zip(CLASSES, per_class, strict=True):
        (src / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(src / c / f"{i:03d}.npy", rng.random((8, 8), dtype=np.float32))


def labelled(root: Path, per_class: tuple[int, ...] = (12, 10, 14), shard_size: int = 5) -> Path:
    """class_images sharded with --labels into small shards, so a subset spans several of them."""
    return make_shards(root, per_class, images=class_images, out=f"shards-{shard_size}",
                       val_fraction=0.25, shard_size=shard_size, seed=0, labels=True)  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return labelled(tmp_path_factory.mktemp("subset"))


def cfg(shards: Path, **kw: object) -> DataConfig:
    base = {"shards": str(shards), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 5}
    return DataConfig(**{**base, **kw})


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def epoch(c: DataConfig, seed: int = 0, split: str = "train", **kw: object) -> list[str]:
    ld = L.build_loader(c, split, crop=8, seed=seed, fields=("hr", "label"), **kw)  # type: ignore[arg-type]
    return keys_of(list(ld))


def test_per_class_trains_on_n_of_each_class_the_same_whatever_the_seed_and_nested(
    shards: Path,
) -> None:
    five = epoch(cfg(shards, per_class=5), seed=0)
    assert len(five) == len(set(five)) == 15  # each once: exactly 15 samples per epoch
    assert collections.Counter(k.split("/")[0] for k in five) == {c: 5 for c in CLASSES}
    assert set(epoch(cfg(shards, per_class=5), seed=1)) == set(five)  # train.seed: order only
    two = epoch(cfg(shards, per_class=2), seed=0)
    assert len(two) == 6 and set(two) < set(five)  # nested
    # the subset's own seed is what chooses: another one chooses other samples
    assert set(epoch(cfg(shards, per_class=5, subset_seed=1))) != set(five)
    # validation is never cut
    val = epoch(cfg(shards), split="val")
    assert sorted(epoch(cfg(shards, per_class=2), split="val")) == sorted(val)
    # ... and evaluating the train split reads all of it
    whole = epoch(cfg(shards), split="train")
    assert len(epoch(cfg(shards, per_class=2), split="train", evaluation=True)) == len(whole)


def test_limit_is_exact_nested_and_independent_of_the_seed_and_of_the_shard_sizes(
    shards: Path, tmp_path: Path
) -> None:
    four = epoch(cfg(shards, limit=4))
    ten = epoch(cfg(shards, limit=10), seed=7)
    assert len(four) == 4 and len(ten) == len(set(ten)) == 10
    assert set(four) < set(ten)
    assert set(epoch(cfg(shards, limit=10), seed=3)) == set(ten)
    # the ranking is by key, not by place: the same files in shards of another size
    other = labelled(tmp_path, shard_size=3)
    assert set(epoch(cfg(other, limit=10))) == set(ten)
    # the record: what subset.json and data.json say
    m = subset.restrict(read_manifest(shards), cfg(shards, limit=10))
    assert m.subset is not None and m.subset["keys"] == sorted(ten) and m.count("train") == 10
    assert m.count("val") == read_manifest(shards).count("val")


def test_the_step_plan_counts_the_subset(shards: Path) -> None:
    from toolkit.runs import recipe

    r = recipe.load(
        Path(__file__).resolve().parents[3] / "recipes" / "debug.yaml",
        [
            f"data.shards={shards}",
            "data.batch_size=4",
            "data.per_class=5",
            "train.epochs=2",
            "train.max_steps=null",
        ],
    )
    manifest = read_manifest(shards)
    n = subset.size(manifest, r.data)
    assert n == 15 == subset.restrict(manifest, r.data).count("train")
    assert StepPlan.of(r, n, 1).total == 2 * 4  # ceil(15 / 4) batches per epoch
    from toolkit.runs.directory import _sample_counts

    assert _sample_counts(r)["train"] == 15 and _sample_counts(r)["val"] == manifest.count("val")


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_on_a_subset_smaller_than_batch_times_world(shards: Path, workers: int) -> None:
    """3 samples, batch 4, 2 ranks: each rank gets one batch of 2 (one sample repeated), every
    subset sample is read, nothing outside the subset is; a resumed epoch is the rest of it."""
    c = cfg(shards, limit=3, num_workers=workers)
    chosen = set(subset.restrict(read_manifest(shards), c).subset["keys"])  # type: ignore[index]
    loaders = [
        L.build_loader(c, "train", crop=8, seed=1, rank=r, world_size=2, fields=("hr", "label"))
        for r in range(2)
    ]
    per_rank = [list(ld) for ld in loaders]
    assert [len(b) for b in per_rank] == [1, 1] == [ld.batches_per_epoch for ld in loaders]
    seen = keys_of(per_rank[0]) + keys_of(per_rank[1])
    assert len(seen) == 4 and set(seen) == chosen and loaders[0].padding == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_a_subset_epoch_gives_exactly_the_remaining_batches(
    shards: Path, workers: int
) -> None:
    c = cfg(shards, per_class=5, num_workers=workers, batch_size=2, shuffle_buffer=3)

    def fresh() -> L.Loader:
        return L.build_loader(c, "train", crop=8, seed=5, rank=1, world_size=2,
                              fields=("hr", "label"))  # fmt: skip

    full = fresh()
    epoch0, epoch1 = list(full), list(full)
    assert len(epoch0) == 4  # 15 samples, 8 per rank, batches of 2
    for k in (1, 3):
        ld = fresh()
        it = iter(ld)
        for _ in range(k):
            next(it)
        resumed = fresh()
        resumed.load_state_dict(ld.state_dict())
        rest = list(resumed)
        assert keys_of(rest) == keys_of(epoch0[k:])
        assert all(torch.equal(a["hr"], b["hr"]) for a, b in zip(rest, epoch0[k:], strict=True))
        assert keys_of(list(resumed)) == keys_of(epoch1)


def test_what_cannot_be_cut_is_refused_in_one_line(shards: Path, tmp_path: Path) -> None:
    m = read_manifest(shards)
    n = m.count("train")
    assert subset.problems(m, cfg(shards, limit=n)) == []
    [line] = subset.problems(m, cfg(shards, limit=n + 1))
    assert line.startswith("data.limit: ") and "manifest.json" in line and f"at most {n}" in line
    smallest = min(m.class_counts["train"])  # type: ignore[index]
    assert subset.problems(m, cfg(shards, per_class=smallest)) == []
    [line] = subset.problems(m, cfg(shards, per_class=smallest + 1))
    assert line.startswith("data.per_class: ") and f"at most {smallest}" in line
    with pytest.raises(UserError, match=r"^data\.per_class: .* at most"):
        L.build_loader(cfg(shards, per_class=smallest + 1), "train", crop=8, seed=0)
    # shards without labels
    rng = np.random.default_rng(0)
    (tmp_path / "flat").mkdir()
    for i in range(6):
        np.save(tmp_path / "flat" / f"{i}.npy", rng.random((8, 8), dtype=np.float32))
    shard(tmp_path / "flat", tmp_path / "flat-shards", val_fraction=0.0)
    [line] = subset.problems(read_manifest(tmp_path / "flat-shards"), cfg(shards, per_class=1))
    assert line.startswith("data.per_class: ") and "no class labels" in line


def test_a_holdout_is_evaluated_in_place_of_val_and_never_trained_on(shards: Path) -> None:
    """data.holdout: part of the train split, the same whatever train.seed and nested as the
    fraction grows, is what the val split reads; training reads the rest (and a subset is cut
    from the rest); the shards' own val split is read by nobody."""
    whole = set(epoch(cfg(shards), evaluation=True))
    val = set(epoch(cfg(shards), split="val"))
    c = cfg(shards, holdout=0.3)
    trained, held = epoch(c), epoch(c, split="val")
    assert len(held) == len(set(held)) > 0 and len(trained) == len(set(trained))
    assert set(held) | set(trained) == whole and not set(held) & set(trained)
    assert not set(held) & val  # the val split is not among what it evaluates
    assert epoch(c, seed=1, split="val") == held and set(epoch(c, seed=1)) == set(trained)
    assert set(epoch(cfg(shards, holdout=0.6), split="val")) > set(held)  # nested
    two = epoch(cfg(shards, holdout=0.3, per_class=2))
    assert len(two) == 6 and set(two) < set(trained)
    # eval.json names the split it read
    assert (
        subset.eval_split(c, "val") == "holdout" and subset.eval_split(cfg(shards), "val") == "val"
    )
    # the step plan and a run's counts are the holdout's
    assert subset.size(read_manifest(shards), c) == len(trained)


def test_a_holdout_that_leaves_too_little_is_refused_in_one_line(shards: Path) -> None:
    m = read_manifest(shards)
    left = len(epoch(cfg(shards, holdout=0.3)))
    assert subset.restrict(m, cfg(shards, holdout=0.3, limit=left)).count("train") == left
    with pytest.raises(UserError, match=rf"^data\.limit: {left + 1} .* data\.holdout 0\.3 "):
        subset.restrict(m, cfg(shards, holdout=0.3, limit=left + 1))
    with pytest.raises(UserError, match=r"^data\.holdout: 0\.001 of the \d+ train samples .* 0"):
        subset.restrict(m, cfg(shards, holdout=0.001))

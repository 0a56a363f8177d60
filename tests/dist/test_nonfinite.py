"""A non-finite loss on one rank of two stops every rank at the same step: the stop decision
reads the loss summed over ranks, so the rank whose own loss is finite stops too, and no
checkpoint or export holds the step."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import DEBUG_RECIPE, make_pairs, run_cli, tiny
from toolkit.runs import recipe
from toolkit.data.format import read_manifest
from toolkit.data.loader import build_loader
from toolkit.data.sharding import shard

pytestmark = pytest.mark.slow

WORLD = 2
BAD_STEP = 3  # after the checkpoints of steps 1 and 2


def batches_by_rank(shards: Path, run_dir: Path) -> dict[int, list[list[str]]]:
    """The sample keys of each training step of the first epoch, per rank of 2, as the run's
    own loader reads them (the epoch plan of the recipe's seed, shuffle and batch size)."""
    r = recipe.load(DEBUG_RECIPE, tiny(shards, run_dir))
    out = {}
    for rank in range(WORLD):
        loader = build_loader(r.data, "train", crop=r.model.img_size, seed=r.train.seed,
                              rank=rank, world_size=WORLD, fields=("hr", "lr"))  # fmt: skip
        try:
            out[rank] = [list(batch["key"]) for batch in loader]
        finally:
            loader.close()
    return out


def steps_reading(plan: dict[int, list[list[str]]], key: str) -> list[tuple[int, int]]:
    """(rank, step) of every read of `key` in the epoch."""
    return [(rank, step) for rank, steps in plan.items()
            for step, keys in enumerate(steps, start=1) if key in keys]  # fmt: skip


def test_a_non_finite_loss_on_one_rank_stops_both_at_that_step(tmp_path: Path) -> None:
    """One training sample's HR holds 3e38 (finite in float32, so `shard` takes it and, the
    values being beyond [0, 1], records normalisation `none`); its L1 loss sums 1024 such
    differences and overflows to inf. Only rank 1 reads it, at step 3. Both ranks must stop
    with the error line of step 3 (rank 0's own loss there is finite), exit status 1, the
    checkpoints of steps 1 and 2 and nothing after, and no exported weights."""
    src = make_pairs(tmp_path / "src", 40)
    shard(src, tmp_path / "clean", val_fraction=0.2, shard_size=8)
    plan = batches_by_rank(tmp_path / "clean", tmp_path / "unused")
    # A sample of rank 1's batch at BAD_STEP that no rank reads at any other step (the padding
    # that evens out the ranks repeats samples).
    bad = next(k for k in plan[1][BAD_STEP - 1] if steps_reading(plan, k) == [(1, BAD_STEP)])
    hr = np.load(src / "hr" / f"{bad}.npy")
    np.save(src / "hr" / f"{bad}.npy", np.full_like(hr, 3e38))
    shards = tmp_path / "shards"
    shard(src, shards, val_fraction=0.2, shard_size=8)
    manifest = read_manifest(shards)
    assert manifest.normalise == "none" and manifest.value_range[1] == pytest.approx(3e38)
    assert batches_by_rank(shards, tmp_path / "unused") == plan  # values do not move samples

    run = tmp_path / "run"
    overrides = tiny(shards, run, "train.max_steps=8", "train.checkpoint_every=1")
    # torchrun's own knobs (PET_*): prefix each worker's stderr lines with its local rank
    # ("[default1]:"), and check on the workers every 5 s instead of every 0.1 s, so that a
    # rank is not terminated by torchrun, once the other has exited, before it has stopped on
    # its own: what is tested is each rank's decision, not torchrun's.
    proc = run_cli("toolkit.launch", str(DEBUG_RECIPE), "--local", "--procs", str(WORLD),
                   *overrides, PET_TEE="2", PET_MONITOR_INTERVAL="5")  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300)  # a rank that went on alone could hang
    except subprocess.TimeoutExpired:
        proc.kill()  # torchrun and its workers die with it
        out, _ = proc.communicate()
        pytest.fail(f"the ranks did not stop together:\n{out[-4000:]}")
    assert proc.returncode == 1, out[-4000:]
    for rank in range(WORLD):
        mine = [x.split(":", 1)[1] for x in out.splitlines() if x.startswith(f"[default{rank}]:")]
        errors = [x for x in mine if x.startswith("error:")]
        # each rank stops by itself, with the step whose loss only rank 1 saw as inf
        assert len(errors) == 1 and not any("Traceback" in x for x in mine), (rank, out[-4000:])
        assert re.match(rf"error: loss is inf at step {BAD_STEP}; stopping\. ", errors[0]), errors
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000001", "step-00000002"]
    assert all((ckpts / f"step-0000000{s}" / "COMPLETE").is_file() for s in (1, 2))
    assert not (run / "model.safetensors").exists() and not (run / "eval.json").exists()

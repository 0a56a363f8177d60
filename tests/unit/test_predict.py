"""predict's plan: every file in exactly one process's share, the bytes balanced; the tiles a
model can take."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import DEBUG_RECIPE, EDSR_RECIPE, SR, TINY_EDSR
from toolkit.core.errors import UserError
from toolkit.predict import share, tiling_for
from toolkit.prediction.inputs import Job
from toolkit.prediction.tiles import Tiling
from toolkit.runs import recipe


def test_every_file_is_in_exactly_one_share_and_the_bytes_are_balanced() -> None:
    sizes = [5, 90, 7, 7, 300, 12, 1, 64, 64, 8, 150, 2, 33]
    jobs = [Job(f"{i:02d}.npy", Path(f"{i:02d}.npy"), size, ".npy") for i, size in enumerate(sizes)]
    for procs in (1, 2, 3, 5):
        shares = [share(jobs, rank, procs) for rank in range(procs)]
        names = sorted(j.name for s in shares for j in s)
        assert names == [j.name for j in jobs]  # each once, none lost
        loads = [sum(j.size for j in s) for s in shares]
        assert max(loads) - min(loads) <= max(sizes)  # greedy: within one file of even
        for s in shares:
            assert [j.name for j in s] == sorted(j.name for j in s)  # in listing order
    assert [j.name for j in share(jobs, 0, 2)] != [j.name for j in share(jobs, 1, 2)]


def test_srmae_takes_tiles_of_its_size_only_and_fcn_whole_images_by_default() -> None:
    srmae = recipe.load(DEBUG_RECIPE, list(SR))  # img_size 32, scale 2: LR tiles of 16
    default = tiling_for(srmae, None, None)
    assert (default.tile, default.fixed, default.shifts) == (16, True, 2)
    assert tiling_for(srmae, 16, 4).overlap == 4
    with pytest.raises(UserError, match=r"--tile 12: SR-MAE takes LR tiles of exactly 16 pixels"):
        tiling_for(srmae, 12, None)
    edsr = recipe.load(EDSR_RECIPE, list(TINY_EDSR))
    assert tiling_for(edsr, None, None) == Tiling(0, 0, False, 1)  # whole images
    assert tiling_for(edsr, 64, None, 3).shifts == 3
    with pytest.raises(UserError, match=r"--shifts 2: expected 1 or more, and more than 1 only"):
        tiling_for(edsr, None, None, 2)
    assert tiling_for(edsr, 64, None).overlap == 16
    with pytest.raises(UserError, match=r"--overlap 64: expected 0 <= overlap < the tile side 64"):
        tiling_for(edsr, 64, 64)
    with pytest.raises(UserError, match=r"--tile -1"):
        tiling_for(edsr, -1, None)

"""`python -m toolkit.predict`: outputs in the input's format and units (normalisation
inverted, FITS WCS scaled), tiles that do not show, resumable after a kill, the same files from
two processes as from one, and each bad input one line with exit status 2."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from astropy.io import fits
from PIL import Image
from torch import Tensor, nn

from tests.helpers import (
    DEBUG_RECIPE,
    EDSR_RECIPE,
    ROOT,
    SR,
    TINY_EDSR,
    make_pairs,
    make_run,
    one_error_line,
    run_cli,
    tiny,
    tree_digest,
)
from toolkit import predict
from toolkit.data.format import read_manifest
from toolkit.data.sharding import shard
from toolkit.models import MODELS, ModelSpec, register_model
from toolkit.runs.hold import acquire
from toolkit.runs.recipe import ModelBase
from toolkit.train import main as train_main

RNG = np.random.default_rng(11)


@dataclass
class NearestConfig(ModelBase):
    """No settings: the model is nearest-neighbour upsampling (times a gain of 1)."""


class Nearest(nn.Module):
    """A model whose output is known without the code under test: each LR pixel repeated."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, lr: Tensor) -> Tensor:
        return F.interpolate(lr, scale_factor=self.scale, mode="nearest") * self.gain


@pytest.fixture
def nearest_run(tmp_path: Path):
    """A run of the nearest model for `channels` bands and normalisation `normalise`."""
    register_model(ModelSpec("nearest", NearestConfig, lambda cfg, scale=2: Nearest(scale),
                             tasks=("sr",), title="nearest"))  # fmt: skip

    def make(channels: int, normalise: str) -> Path:
        recipe = tmp_path / f"nearest-{channels}-{normalise.replace(':', '_')}.yaml"
        recipe.write_text(
            f"extends: {ROOT / 'recipes' / '_base.yaml'}\nname: nearest\ntask: sr\n"
            f"data: {{normalise: '{normalise}'}}\noptim: {{groups: []}}\n"
            f"model: {{arch: nearest, in_chans: {channels}, img_size: 32}}\n"
        )
        return make_run(tmp_path / recipe.stem, base=recipe)

    yield make
    MODELS.unregister("nearest")


def up(a: np.ndarray, axes: tuple[int, int], s: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(a, s, axis=axes[0]), s, axis=axes[1])


def npy(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, a)
    return path


def main(*args: object) -> int:
    return predict.main([str(a) for a in args])


# ---------------------------------------------------------------- values and formats


@pytest.mark.parametrize("normalise", ["asinh:0.1", "minmax", "none"])
def test_five_float_bands_come_back_in_their_units(nearest_run, tmp_path: Path, normalise) -> None:
    """Sky-subtracted 5-band stacks (negatives, a bright core, a NaN hole): the output is the
    nearest-upsampled input in the input's own units, layout and dtype; the hole stays one."""
    run = nearest_run(5, normalise)
    stack = (RNG.standard_normal((40, 36, 5)) * 0.05).astype(np.float32)  # (H, W, bands)
    stack[18:22, 16:20] += 80.0  # the lens galaxy, four orders of magnitude above the noise
    stack[3, 4, 2] = np.nan
    npy(tmp_path / "in" / "a.npy", stack)
    assert main(run, tmp_path / "in", "--out", tmp_path / "out") == 0
    out = np.load(tmp_path / "out" / "a.npy")
    assert out.dtype == np.float32 and out.shape == (80, 72, 5)
    expect = up(stack, (0, 1))
    assert np.isnan(out[6:8, 8:10, 2]).all() and np.isnan(out).sum() == 4
    finite = ~np.isnan(expect)
    np.testing.assert_allclose(out[finite], expect[finite], rtol=1e-5, atol=1e-6)


def test_percentile_outputs_stay_within_the_input_percentiles(nearest_run, tmp_path) -> None:
    run = nearest_run(1, "percentile:1,99")
    image = RNG.standard_normal((30, 30)).astype(np.float32) * 10
    npy(tmp_path / "in" / "p.npy", image)
    assert main(run, tmp_path / "in" / "p.npy", "--out", tmp_path / "out") == 0
    lo, hi = np.percentile(image, [1, 99])
    out = np.load(tmp_path / "out" / "p.npy")
    np.testing.assert_allclose(out, up(np.clip(image, lo, hi), (0, 1)), rtol=1e-5, atol=1e-5)


def test_a_fits_output_keeps_its_header_and_maps_the_sky_to_the_same_place(
    nearest_run, tmp_path: Path
) -> None:
    from astropy.wcs import WCS

    run = nearest_run(1, "asinh:1")
    header = fits.Header()
    header["OBJECT"], header["BUNIT"] = "J0946+1006", "e-/s"
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"], header["CRPIX1"], header["CRPIX2"] = 146.7, 10.1, 9.5, 12.0
    header["CDELT1"], header["CDELT2"] = -1e-5, 1e-5
    image = RNG.standard_normal((20, 24)).astype(np.float32)
    primary = fits.PrimaryHDU()
    (tmp_path / "in").mkdir()
    fits.HDUList([primary, fits.ImageHDU(image, header, name="SCI")]).writeto(
        tmp_path / "in" / "lens.fits"
    )
    assert main(run, tmp_path / "in", "--out", tmp_path / "out", "--hdu", "SCI") == 0
    with fits.open(tmp_path / "out" / "lens.fits") as hdul:
        sci = hdul["SCI"]
        np.testing.assert_allclose(sci.data, up(image, (0, 1)), rtol=1e-5, atol=1e-6)
        assert sci.header["OBJECT"] == "J0946+1006" and sci.header["BUNIT"] == "e-/s"
        w_in, w_out = WCS(header), WCS(sci.header)
    i, j = np.mgrid[0:20:3, 0:24:5]
    x, y = w_out.world_to_pixel_values(*w_in.pixel_to_world_values(j.ravel(), i.ravel()))
    np.testing.assert_allclose(x, 2 * j.ravel() + 0.5, atol=1e-6)
    np.testing.assert_allclose(y, 2 * i.ravel() + 0.5, atol=1e-6)


def test_photographs_come_back_as_photographs_of_their_depth(nearest_run, tmp_path) -> None:
    run = nearest_run(1, "unit")
    grey8 = RNG.integers(0, 255, (12, 10), dtype=np.uint8)
    grey16 = RNG.integers(0, 65535, (12, 10)).astype(np.uint16)
    (tmp_path / "in").mkdir()
    Image.fromarray(grey8).save(tmp_path / "in" / "a.png")
    Image.fromarray(grey16).save(tmp_path / "in" / "b.tif")
    Image.fromarray(grey8).save(tmp_path / "in" / "c.jpg", quality=95)
    assert main(run, tmp_path / "in", "--out", tmp_path / "out") == 0
    assert shown(tmp_path / "out") == ["a.png", "b.tif", "c.png"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "a.png")), up(grey8, (0, 1))
    )
    b = np.asarray(Image.open(tmp_path / "out" / "b.tif"))
    np.testing.assert_array_equal(b.astype(np.uint16), up(grey16, (0, 1)))


# ---------------------------------------------------------------- tiles


def test_tiled_equals_whole_image_for_a_fully_convolutional_model(tmp_path: Path) -> None:
    run = make_run(tmp_path / "edsr", *TINY_EDSR, "data.normalise=none", base=EDSR_RECIPE)
    npy(tmp_path / "in" / "big.npy", RNG.standard_normal((600, 450)).astype(np.float32))
    assert main(run, tmp_path / "in", "--out", tmp_path / "whole") == 0
    assert main(run, tmp_path / "in", "--out", tmp_path / "tiled", "--tile", 128,
                "--overlap", 24) == 0  # fmt: skip
    whole, tiled = (np.load(tmp_path / d / "big.npy") for d in ("whole", "tiled"))
    assert whole.shape == (1200, 900)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)


def test_srmae_runs_on_images_of_any_size(tmp_path: Path) -> None:
    """SR-MAE takes 16x16 LR inputs only (img_size 32, scale 2): images of 9x13 and 50x37 go
    through in tiles of that size; a tile it cannot take is refused up front."""
    run = make_run(tmp_path / "srmae", *SR, "data.normalise=unit")
    npy(tmp_path / "in" / "small.npy", RNG.uniform(size=(9, 13)).astype(np.float32))
    npy(tmp_path / "in" / "large.npy", RNG.uniform(size=(50, 37)).astype(np.float32))
    assert main(run, tmp_path / "in", "--out", tmp_path / "out") == 0
    assert np.load(tmp_path / "out" / "small.npy").shape == (18, 26)
    large = np.load(tmp_path / "out" / "large.npy")
    assert large.shape == (100, 74) and large.min() >= 0 and large.max() <= 1


def test_bf16_runs_the_model_in_bf16_and_writes_float32(tmp_path: Path) -> None:
    run = make_run(tmp_path / "edsr", *TINY_EDSR, "data.normalise=none", base=EDSR_RECIPE)
    npy(tmp_path / "in" / "a.npy", RNG.standard_normal((40, 30)).astype(np.float32))
    assert main(run, tmp_path / "in", "--out", tmp_path / "fp32") == 0
    assert main(run, tmp_path / "in", "--out", tmp_path / "bf16", "--precision", "bf16") == 0
    fp32, bf16 = (np.load(tmp_path / d / "a.npy") for d in ("fp32", "bf16"))
    assert bf16.dtype == np.float32
    rel = np.abs(bf16 - fp32).max() / fp32.std()
    assert 1e-4 < rel < 0.05  # bf16's 8-bit mantissa: visibly rounded, not a different model


# ---------------------------------------------------------------- shards


def test_a_shard_directory_gives_what_its_source_files_give(tmp_path: Path) -> None:
    run = make_run(tmp_path / "srmae", *SR)
    make_pairs(tmp_path / "raw", 6, size=32)
    shard(tmp_path / "raw", tmp_path / "shards", val_fraction=0.5, seed=0)
    assert main(run, tmp_path / "shards", "--out", tmp_path / "from-shards") == 0
    assert main(run, tmp_path / "raw" / "lr", "--out", tmp_path / "from-files") == 0
    names = sorted(p.name for p in (tmp_path / "from-shards").glob("*.npy"))
    assert names == [f"{i:04d}.npy" for i in range(6)]
    for name in names:
        a, b = (np.load(tmp_path / d / name) for d in ("from-shards", "from-files"))
        np.testing.assert_array_equal(a, b)
    assert main(run, tmp_path / "shards", "--split", "val", "--out", tmp_path / "val") == 0
    val = read_manifest(tmp_path / "shards").count("val")
    assert 0 < val < 6 and len(list((tmp_path / "val").glob("*.npy"))) == val


def test_hr_only_shards_give_the_output_of_their_degraded_hr(tmp_path: Path) -> None:
    """Shards without LR: the input is the HR degraded as the loader makes it (`degrade`, tested
    against an independent bicubic of its own), not a subsample or the HR itself."""
    from toolkit.data.degrade import degrade

    run = make_run(tmp_path / "srmae", *SR)
    make_pairs(tmp_path / "raw", 4, size=32)
    shard(tmp_path / "raw" / "hr", tmp_path / "shards", val_fraction=0.0, seed=0)
    assert main(run, tmp_path / "shards", "--out", tmp_path / "from-shards") == 0
    for i in range(4):
        hr = torch.from_numpy(np.load(tmp_path / "raw" / "hr" / f"{i:04d}.npy"))[None]
        npy(tmp_path / "lr" / f"{i:04d}.npy", degrade(hr, 2, clamp=True)[0].numpy())
    assert main(run, tmp_path / "lr", "--out", tmp_path / "from-lr") == 0
    for i in range(4):
        a, b = (np.load(tmp_path / d / f"{i:04d}.npy") for d in ("from-shards", "from-lr"))
        assert a.shape == (32, 32)
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- resume and processes


def folder(root: Path, count: int, size: int = 120) -> Path:
    for i in range(count):
        npy(root / f"{i // 10}" / f"{i:03d}.npy", RNG.uniform(size=(size, size)).astype(np.float32))
    return root


def shown(folder: Path) -> list[str]:
    """The names in a folder, but hidden ones (the hold, the prediction's record)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def outputs(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_killed_halfway_and_rerun_gives_every_output_once_as_one_run_would(tmp_path) -> None:
    """SIGKILL once at least 5 of 30 outputs are written: the process really died of it, with
    5 to 29 outputs (mid-run: not before any, not after the last), each of them whole under its
    own name (a half-written one only under a hidden temporary name) and the hold of a dead
    holder left; a rerun writes exactly the missing ones and leaves what one run would."""
    run = make_run(tmp_path / "edsr", "model.n_feats=48", "model.n_resblocks=6",
                   "model.img_size=32", base=EDSR_RECIPE)  # fmt: skip
    src = folder(tmp_path / "in", 30)
    out = tmp_path / "killed"
    proc = run_cli("toolkit.predict", str(run), str(src), "--out", str(out))
    deadline = time.monotonic() + 120
    while len(list(out.rglob("[!.]*.npy"))) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # the kill landed: it had not finished or failed
    left = outputs(out)
    visible = {k: v for k, v in left.items() if not Path(k).name.startswith(".")}
    before = len(visible)
    assert 5 <= before < 30 and all(k.endswith(".npy") for k in visible)
    assert ".hold" in left  # the dead holder's, taken over by the rerun
    rerun = run_cli("toolkit.predict", str(run), str(src), "--out", str(out))
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, log
    assert f"{30 - before} of 30 files written to" in log and f"({before} before)" in log
    whole = run_cli("toolkit.predict", str(run), str(src), "--out", str(tmp_path / "whole"))
    assert whole.wait(timeout=600) == 0
    killed, clean = outputs(out), outputs(tmp_path / "whole")
    # no temporaries, no hold, the same bytes; and the record of what the outputs come from
    assert len(clean) == 31 and predict.RECORD in clean and killed == clean
    assert all(clean[k] == v for k, v in visible.items())  # those written before: whole


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one_each_once(tmp_path: Path) -> None:
    run = make_run(tmp_path / "edsr", *TINY_EDSR, base=EDSR_RECIPE)
    src = folder(tmp_path / "in", 25, size=40)
    logs = {}
    for procs in (1, 2):
        out = tmp_path / f"out{procs}"
        proc = run_cli("toolkit.predict", str(run), str(src), "--out", str(out), "--local",
                       "--procs", str(procs), SRMAE_LOG_LEVEL="DEBUG")  # fmt: skip
        logs[procs], _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, logs[procs][-3000:]
    wrote = re.findall(r"rank (\d) wrote (\S+)", logs[2])
    assert sorted(f for _, f in wrote) == sorted(str(p) for p in (tmp_path / "out2").rglob("*.npy"))
    assert {r for r, _ in wrote} == {"0", "1"}  # each file once, by one of the two
    assert outputs(tmp_path / "out1") == outputs(tmp_path / "out2")
    assert "on 2 process(es)" in logs[2]


# ---------------------------------------------------------------- bad input


def test_a_bad_file_mid_folder_is_named_and_the_others_are_written(
    tmp_path: Path, capsys, caplog
) -> None:
    """A file that cannot be read is damaged, not a misfit: it is named, the others are
    written, and a rerun retries it."""
    run = make_run(tmp_path / "edsr", *TINY_EDSR, base=EDSR_RECIPE)
    for name in ("a", "c", "e"):
        npy(tmp_path / "in" / f"{name}.npy", RNG.uniform(size=(20, 20)).astype(np.float32))
    (tmp_path / "in" / "b.npy").write_bytes(b"\x93NUMPY broken")
    assert main(run, tmp_path / "in", "--out", tmp_path / "out") == 2
    assert re.search(r"in/b\.npy: not a readable \.npy", caplog.text)
    assert capsys.readouterr().err.startswith("error: 1 of 4 files failed")
    assert shown(tmp_path / "out") == ["a.npy", "c.npy", "e.npy"]
    assert main(run, tmp_path / "in", "--out", tmp_path / "out") == 2  # a rerun retries those
    # Outputs written inside the input folder are not taken for inputs by the next run.
    assert main(run, tmp_path / "in" / "a.npy", "--out", tmp_path / "in" / "sr") == 0
    assert main(run, tmp_path / "in", "--out", tmp_path / "in" / "sr") == 2
    assert shown(tmp_path / "in" / "sr") == ["a.npy", "c.npy", "e.npy"]


def test_an_output_folder_of_another_prediction_is_refused(tmp_path: Path, capsys) -> None:
    """A rerun into a folder skips what is written; into a folder written by another model
    (or with other settings) it counted the old outputs as done and wrote nothing. Now the
    folder's predict.json says what its outputs come from, and another prediction is refused."""
    first = make_run(tmp_path / "a", *TINY_EDSR, base=EDSR_RECIPE, seed=0)
    other = make_run(tmp_path / "b", *TINY_EDSR, base=EDSR_RECIPE, seed=1)
    for name in ("x", "y"):
        npy(tmp_path / "in" / f"{name}.npy", RNG.uniform(size=(20, 20)).astype(np.float32))
    out = tmp_path / "out"
    assert main(first, tmp_path / "in" / "x.npy", "--out", out) == 0
    before = tree_digest(out)
    for args, said in (((other,), "(weights;"), ((first, "--precision", "bf16"),
                                                  "(precision fp32, here bf16;")):  # fmt: skip
        line = refused(capsys, *args, tmp_path / "in", "--out", out)
        assert f"{out}: holds the outputs of another prediction {said}" in line
        assert f"came from {first}" in line and tree_digest(out) == before
    assert main(first, tmp_path / "in", "--out", out) == 0  # the same prediction: goes on
    assert shown(out) == ["x.npy", "y.npy"] and (out / predict.RECORD).is_file()


def test_an_input_that_would_be_its_own_output_is_refused(tmp_path: Path, capsys) -> None:
    """An input inside --out, at the path its output would take, was counted as its own output
    ("0 of 1 files written (1 before)"); a folder that is --out said it had no usable files."""
    run = make_run(tmp_path / "edsr", *TINY_EDSR, base=EDSR_RECIPE)
    image = npy(tmp_path / "same" / "a.npy", RNG.uniform(size=(20, 20)).astype(np.float32))
    line = refused(capsys, run, image, "--out", tmp_path / "same")
    assert f"{image}: its output would be written over it: give another --out" in line
    line = refused(capsys, run, tmp_path / "same", "--out", tmp_path / "same")
    assert "every file in it lies under --out" in line
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["a.npy"]


# ---------------------------------------------------------------- inputs that do not fit the run


def refused(capsys, *args: object) -> str:
    """Run predict, which must refuse: exit 2, one line, no traceback; that line."""
    assert main(*args) == 2
    return one_error_line(capsys.readouterr().err)


def record_training(run: Path, value_range: tuple[float, float], normalise: str) -> None:
    """The run's data.json as a training on shards of `value_range` writes it."""
    doc = {"shards": "/elsewhere/shards", "kind": "paired", "channels": [1],
           "hr_min_size": [64, 64], "value_range": list(value_range), "normalise": normalise,
           "classes": None, "count": {"train": 90, "val": 10}}  # fmt: skip
    (run / "data.json").write_text(json.dumps(doc))


@pytest.mark.slow
def test_a_physical_units_image_is_refused_by_a_run_trained_on_unit_data(tmp_path, capsys) -> None:
    """What a user met: a model trained on [0, 1] images, given a FITS image in counts (82 to
    4171), wrote an output of 1.0 almost everywhere. Now it is refused in one line saying what
    was seen, what the run expects and what maps one to the other; nothing is written. With
    that map, the output comes back in the image's own units."""
    make_pairs(tmp_path / "src", 12)
    shard(tmp_path / "src", tmp_path / "shards", val_fraction=0.25, shard_size=8)
    run = tmp_path / "run"
    code = train_main([str(DEBUG_RECIPE), *tiny(tmp_path / "shards", run, "train.max_steps=2")])
    assert code == 0 and json.loads((run / "data.json").read_text())["value_range"][1] <= 1
    counts = np.linspace(82, 4171, 24 * 24, dtype=np.float32).reshape(24, 24)
    (tmp_path / "in").mkdir()
    fits.PrimaryHDU(counts).writeto(tmp_path / "in" / "lens.fits")
    before = tree_digest(run)
    line = refused(capsys, run, tmp_path / "in", "--out", tmp_path / "out")
    assert "in/lens.fits: values 82 to 4171" in line and f"{run} was trained on values" in line
    assert "normalisation unit: 0 to 1 for the model" in line and "--normalise minmax" in line
    assert not (tmp_path / "out").exists() and tree_digest(run) == before
    assert main(run, tmp_path / "in", "--out", tmp_path / "out", "--normalise", "minmax") == 0
    with fits.open(tmp_path / "out" / "lens.fits") as hdul:
        out = hdul[0].data
    # SR-MAE adds its layers' output to a bicubic skip, so two steps from its initialisation
    # it maps [0, 1] to about [0, 1]: mapped back, the output lies about in the image's range.
    assert out.shape == (48, 48) and np.median(out) > 0 and 50 < out.mean() < 5000


def test_an_input_far_outside_a_runs_training_range_is_refused(nearest_run, tmp_path, capsys):
    """A run trained on sky-subtracted fluxes (-5 to 35, normalisation none) takes images in
    about that range and refuses one in another unit; the line names the range, the run's and
    the remedy (no per-image map puts fluxes where another unit was: retrain)."""
    run = nearest_run(1, "none")
    record_training(run, (-5.0, 35.0), "none")
    npy(tmp_path / "ok" / "a.npy", RNG.uniform(-6, 38, size=(20, 20)).astype(np.float32))
    assert main(run, tmp_path / "ok", "--out", tmp_path / "out-ok") == 0  # within 10% of 40
    npy(tmp_path / "far" / "b.npy", RNG.uniform(0, 4000, size=(20, 20)).astype(np.float32))
    line = refused(capsys, run, tmp_path / "far", "--out", tmp_path / "out")
    assert "far/b.npy: values" in line and "trained on values -5 to 35" in line
    assert "normalisation none: -5 to 35 for the model" in line and "retrain" in line
    assert "--normalise minmax" not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("procs", [1, 2])
def test_inputs_that_do_not_fit_stop_the_whole_prediction_before_anything_is_written(
    tmp_path: Path, capsys, procs: int
) -> None:
    """A folder with good images and misfits (3 bands for a 1-band model, a cutout smaller
    than half SR-MAE's tile, values beyond the training range): one line naming the first and
    counting the others, exit 2, no output folder; on 2 processes too, before they start."""
    run = make_run(tmp_path / "srmae", *SR)  # 16x16 LR tiles: at least 8 pixels a side
    record_training(run, (0.0, 1.0), "unit")
    for name in ("a", "c"):
        npy(tmp_path / "in" / f"{name}.npy", RNG.uniform(size=(20, 20)).astype(np.float32))
    npy(tmp_path / "in" / "b.npy", RNG.uniform(size=(3, 20, 20)).astype(np.float32))
    npy(tmp_path / "in" / "d.npy", RNG.uniform(size=(7, 30)).astype(np.float32))
    npy(tmp_path / "in" / "e.npy", np.linspace(0, 2, 400, dtype=np.float32).reshape(20, 20))
    before = tree_digest(run)
    local = ["--local", "--procs", "2"] if procs == 2 else []
    line = refused(capsys, run, tmp_path / "in", "--out", tmp_path / "out", *local)
    assert "in/b.npy: 3 channel(s), but" in line and "takes 1 (model.in_chans)" in line
    assert "(2 more input(s) do not fit either)" in line
    assert not (tmp_path / "out").exists() and tree_digest(run) == before
    for name, why in (("d", "7x30 pixels, smaller than 8 on a side"), ("e", "values 0 to 2,")):
        line = refused(capsys, run, tmp_path / "in" / f"{name}.npy", "--out", tmp_path / "out")
        assert why in line and "more input" not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tile", "12"], r"--tile 12: SR-MAE takes LR tiles of exactly 16 pixels"),
        (["--overlap", "16"], r"--overlap 16: expected 0 <= overlap < the tile side 16"),
        (["--batch", "0"], r"--batch 0: expected 1 or more"),
        (["--procs", "2"], r"--procs P needs --local"),
    ],
)
def test_a_setting_the_model_cannot_use_stops_before_any_work(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    run = make_run(tmp_path / "srmae", *SR)
    npy(tmp_path / "in" / "a.npy", np.zeros((20, 20), np.float32))
    assert main(run, tmp_path / "in", "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_input_mae_run_and_held_output_are_one_line_each(tmp_path, capsys) -> None:
    srmae = make_run(tmp_path / "srmae", *SR)
    assert main(srmae, tmp_path / "nowhere", "--out", tmp_path / "out") == 2
    assert "nowhere: no such file, folder or shard directory" in capsys.readouterr().err
    mae = make_run(tmp_path / "mae")
    npy(tmp_path / "in" / "a.npy", np.zeros((20, 20), np.float32))
    assert main(mae, tmp_path / "in", "--out", tmp_path / "out") == 2
    assert "a mae run; predict needs an sr run" in capsys.readouterr().err
    hold = acquire(tmp_path / "held", "another predict")
    try:
        assert main(srmae, tmp_path / "in", "--out", tmp_path / "held") == 2
        err = capsys.readouterr().err
        assert f"in use by another predict (pid {os.getpid()}" in err
        assert not list((tmp_path / "held").glob("*.npy"))
    finally:
        hold.release()

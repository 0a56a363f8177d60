"""FITS in: the primary HDU or a named extension, a cube as channels, BSCALE/BZERO applied,
through shard and loader; the bad FITS inputs, each one line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits

from toolkit.data.loader import build_loader
from toolkit.data.sources import decode, probe
from toolkit.errors import UserError
from toolkit.recipe import DataConfig
from toolkit.shard import shard

RNG = np.random.default_rng(3)


def to_bytes(hdul) -> bytes:
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def scaled_primary(raw: np.ndarray, bscale: float, bzero: float) -> bytes:
    """A primary HDU of 16-bit integers with BSCALE/BZERO: physical = bzero + bscale * raw."""
    hdu = fits.PrimaryHDU(raw.astype(np.int16))
    hdu.header["BSCALE"], hdu.header["BZERO"] = bscale, bzero
    return to_bytes(fits.HDUList([hdu]))


def mef(cube: np.ndarray, name: str = "SCI") -> bytes:
    """An empty primary HDU, then the image in a named extension (HST/JWST style)."""
    err = fits.ImageHDU(np.zeros((2, 2), np.float32), name="ERR")
    return to_bytes(fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(cube, name=name), err]))


def test_bscale_and_bzero_are_applied_not_the_integer_scaling() -> None:
    raw = RNG.integers(-3000, 3000, (6, 8))
    out = decode(scaled_primary(raw, 0.5, 100.0), "fits")
    assert out.shape == (1, 6, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], (100.0 + 0.5 * raw).astype(np.float32))
    assert probe(scaled_primary(raw, 0.5, 100.0), "fits") == (1, 6, 8)


def test_a_cube_in_a_named_extension_is_its_channels() -> None:
    cube = RNG.standard_normal((4, 10, 12)).astype(np.float32) * 1e3
    data = mef(cube)
    np.testing.assert_array_equal(decode(data, "fits", hdu="SCI"), cube)
    np.testing.assert_array_equal(decode(data, "fits"), cube)  # the first HDU with an image
    np.testing.assert_array_equal(decode(data, "fits", hdu="1"), cube)  # or its index
    assert probe(data, "fits", hdu="SCI") == (4, 10, 12)
    np.testing.assert_array_equal(decode(data, "fits", hdu="ERR"), np.zeros((1, 2, 2)))


@pytest.mark.parametrize(
    ("data", "hdu", "words"),
    [
        (b"SIMPLE  =" + b" " * 100, None, "not a readable FITS"),
        (to_bytes(fits.HDUList([fits.PrimaryHDU()])), None, "no HDU holds an image"),
        (mef(np.zeros((3, 3), np.float32)), "DQ", "no HDU 'DQ' (it has: PRIMARY, SCI, ERR)"),
        (mef(np.zeros((2, 3, 3, 3), np.float32)), "SCI", "4 axes"),
    ],
)
def test_bad_fits_inputs(data: bytes, hdu: str | None, words: str) -> None:
    with pytest.raises(ValueError) as err:
        decode(data, "fits", hdu=hdu)
    assert words in str(err.value)


def test_fits_pairs_shard_and_load_back_in_their_physical_values(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for side in ("hr", "lr"):
        (src / side).mkdir(parents=True)
    cubes = {}
    for i in range(8):
        hr = (RNG.standard_normal((3, 16, 16)) * 20 - 4).astype(np.float32)
        lr = hr.reshape(3, 8, 2, 8, 2).mean(axis=(2, 4))
        (src / "hr" / f"t{i}.fits").write_bytes(mef(hr))
        (src / "lr" / f"t{i}.fits").write_bytes(mef(lr))
        cubes[f"t{i}"] = hr
    doc = shard(src, tmp_path / "out", val_fraction=0.25, hdu="SCI")
    assert doc["channels"] == [3] and doc["fits_hdu"] == "SCI" and doc["normalise"] == "none"
    data = DataConfig(shards=str(tmp_path / "out"), batch_size=4, num_workers=0)
    seen = 0
    for split in ("train", "val"):
        ld = build_loader(data, split, crop=16, seed=0, evaluation=True)
        for batch in ld:
            for key, got in zip(batch["key"], batch["hr"], strict=True):
                assert torch.equal(got, torch.from_numpy(cubes[key]))
                seen += 1
        ld.close()
    assert seen == 8
    assert json.loads((tmp_path / "out/manifest.json").read_text())["skipped"] == []


def test_a_missing_extension_is_named_per_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"t{i}.fits").write_bytes(mef(np.ones((8, 8), np.float32)))
    expected = r"t0\.fits: no HDU 'SCIENCE' \(it has: PRIMARY, SCI, ERR\)"
    with pytest.raises(UserError, match=expected):
        shard(src, tmp_path / "out", val_fraction=0.34, hdu="SCIENCE", strict=True)

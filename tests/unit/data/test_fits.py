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

from toolkit.core.errors import UserError
from toolkit.data.fits import encode_fits, read_fits
from toolkit.data.loader import build_loader
from toolkit.data.sharding import shard
from toolkit.data.sources import decode, probe
from toolkit.runs.recipe import DataConfig

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


# ---------------------------------------------------------------- FITS out: the WCS scaled


def wcs_header(sip: bool = False) -> fits.Header:
    """A TAN WCS with a rotated CD matrix (SIP distortion if asked), an alternate WCS "A" with
    CDELT and PC, and cards that are not the WCS's."""
    h = fits.Header()
    h["OBJECT"], h["BUNIT"], h["EXPTIME"] = "lens candidate", "e-/s", 1200.0
    h["CTYPE1"], h["CTYPE2"] = ("RA---TAN-SIP", "DEC--TAN-SIP") if sip else ("RA---TAN", "DEC--TAN")
    h["CRVAL1"], h["CRVAL2"] = 150.1, 2.2
    h["CRPIX1"], h["CRPIX2"] = 20.3, 11.7
    pix = 0.05 / 3600  # 0.05 arcsec pixels, rotated by 30 degrees
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -pix * c, pix * s, pix * s, pix * c
    if sip:
        h["A_ORDER"], h["B_ORDER"] = 2, 2
        h["A_2_0"], h["A_0_2"], h["A_1_1"] = 2e-4, -1e-4, 3e-5
        h["B_2_0"], h["B_0_2"], h["B_1_1"] = -5e-5, 1e-4, 2e-5
    h["WCSNAMEA"], h["CTYPE1A"], h["CTYPE2A"] = "detector", "LINEAR", "LINEAR"
    h["CRPIX1A"], h["CRPIX2A"], h["CRVAL1A"], h["CRVAL2A"] = 1.0, 1.0, 101.0, 51.0
    h["CDELT1A"], h["CDELT2A"], h["PC1_2A"] = 1.0, 1.0, 0.0
    h["BSCALE"], h["BZERO"] = 2.0, 10.0  # of the stored input: not of float outputs
    return h


@pytest.mark.parametrize("sip", [False, True])
@pytest.mark.parametrize("scale", [2, 3])
def test_an_output_pixel_centre_maps_to_the_sky_of_its_input_pixel(sip: bool, scale: int) -> None:
    from astropy.wcs import WCS

    header = wcs_header(sip)
    data = to_bytes(fits.HDUList([fits.PrimaryHDU(np.zeros((24, 40), np.int16), header)]))
    _, like = read_fits(data)
    out = fits.open(io.BytesIO(encode_fits(np.ones((1, 24 * scale, 40 * scale), np.float32),
                                           like, scale)))  # fmt: skip
    written = out[0].header
    assert out[0].data.shape == (24 * scale, 40 * scale)
    for key in ("OBJECT", "BUNIT", "EXPTIME", "CRVAL1", "CTYPE2", "WCSNAMEA"):
        assert written[key] == header[key]  # the input's cards are kept
    assert "BSCALE" not in written and "BZERO" not in written  # the floats are the values
    i, j = np.meshgrid(np.arange(0, 24, 5.0), np.arange(0, 40, 7.0), indexing="ij")
    for key in (" ", "A"):  # the primary WCS and the alternate one
        w_in, w_out = WCS(header, key=key), WCS(written, key=key)
        sky = w_in.pixel_to_world_values(j.ravel(), i.ravel())  # (x = column, y = row), 0-based
        x, y = w_out.world_to_pixel_values(*sky)
        centre = scale * (np.stack([j.ravel(), i.ravel()]) + 0.5) - 0.5  # 2i+0.5 at scale 2
        np.testing.assert_allclose(np.stack([x, y]), centre, rtol=0, atol=1e-6)


def test_an_extension_is_written_as_itself_behind_the_input_primary_header() -> None:
    cube = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    primary = fits.PrimaryHDU()
    primary.header["TELESCOP"] = "HST"
    sci = fits.ImageHDU(cube, wcs_header(), name="SCI")
    err = fits.ImageHDU(np.zeros((6, 8), np.float32), name="ERR")
    values, like = read_fits(to_bytes(fits.HDUList([primary, sci, err])), "SCI")
    np.testing.assert_array_equal(values, cube)
    up = np.repeat(np.repeat(values, 2, axis=1), 2, axis=2)
    out = fits.open(io.BytesIO(encode_fits(up, like, 2)))
    assert [h.name for h in out] == ["PRIMARY", "SCI"]  # the ERR plane is of the input's size
    assert out[0].header["TELESCOP"] == "HST" and out[1].header["OBJECT"] == "lens candidate"
    np.testing.assert_array_equal(out["SCI"].data, up)  # a cube stays a cube
    assert out[1].header["CRPIX1"] == pytest.approx(2 * (20.3 - 0.5) + 0.5)


def unit_pixel_header() -> fits.Header:
    """WCSs with neither CD nor CDELT cards, where FITS takes CDELT = 1: a TAN WCS whose PC
    matrix carries the pixel scale and rotation (as some pipelines write it), and an alternate
    "A" with CRPIX, CRVAL and CTYPE alone (one unit per pixel, e.g. detector coordinates)."""
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = 150.1, 2.2
    h["CRPIX1"], h["CRPIX2"] = 20.3, 11.7
    pix = 0.05 / 3600
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    h["PC1_1"], h["PC1_2"], h["PC2_1"], h["PC2_2"] = -pix * c, pix * s, pix * s, pix * c
    h["CTYPE1A"], h["CTYPE2A"] = "LINEAR", "LINEAR"
    h["CRPIX1A"], h["CRPIX2A"], h["CRVAL1A"], h["CRVAL2A"] = 1.0, 1.0, 101.0, 51.0
    return h


@pytest.mark.parametrize("scale", [2, 3])
def test_unit_pixels_without_cd_or_cdelt_shrink_too(scale: int) -> None:
    """With neither CD nor CDELT the pixels are 1 (FITS's CDELT default), and they too must
    become `scale` times smaller: output pixel centre scale * (i + 0.5) - 0.5 lies on the sky
    of input pixel i, for the primary WCS and an alternate one."""
    from astropy.wcs import WCS

    header = unit_pixel_header()
    assert not [k for k in header if k.startswith(("CD", "CDELT"))]  # the branch under test
    data = to_bytes(fits.HDUList([fits.PrimaryHDU(np.zeros((24, 40), np.float32), header)]))
    _, like = read_fits(data)
    up = np.ones((1, 24 * scale, 40 * scale), np.float32)
    written = fits.open(io.BytesIO(encode_fits(up, like, scale)))[0].header
    i, j = np.meshgrid(np.arange(0, 24, 5.0), np.arange(0, 40, 7.0), indexing="ij")
    for key in (" ", "A"):
        w_in, w_out = WCS(header, key=key), WCS(written, key=key)
        sky = w_in.pixel_to_world_values(j.ravel(), i.ravel())  # (x = column, y = row), 0-based
        x, y = w_out.world_to_pixel_values(*sky)
        centre = scale * (np.stack([j.ravel(), i.ravel()]) + 0.5) - 0.5
        # Unscaled pixels would be off by (scale - 1) * (p - CRPIX) pixels, tens of them here;
        # 1e-6 pixel is the round trip through the TAN projection in float64.
        np.testing.assert_allclose(np.stack([x, y]), centre, rtol=0, atol=1e-6)

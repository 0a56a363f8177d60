"""Tests of the lensing generator: files, metadata, determinism, independent LR/HR, calibration,
CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import cli
from toolkit import simulate
from toolkit.data.sim import lensing, write


@pytest.fixture
def lenstronomy():
    return pytest.importorskip("lenstronomy")


def _pair(seed: int, index: int, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    return lensing.simulate_pair(np.random.default_rng([seed, index]), noise=noise)


def _bicubic(lr: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(lr)[None, None]
    up = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    return up.clamp(0, 1)[0, 0].numpy().astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_generate_writes_pairs_of_the_right_shape(lenstronomy, tmp_path):
    assert write.generate(tmp_path / "out", 3, seed=5) == 3
    for side, size in (("hr", 150), ("lr", 75)):
        files = sorted((tmp_path / "out" / side).iterdir())
        assert [f.name for f in files] == ["000000.npy", "000001.npy", "000002.npy"]
        for f in files:
            a = np.load(f)
            assert a.shape == (size, size) and a.dtype == np.float32
            assert a.min() >= 0.0 and a.max() <= 1.0
            assert a.max() > 0.5  # normalised by a robust max: the arcs are bright
    # The files hold exactly what simulate_pair gives for (seed, index).
    lr, hr = _pair(5, 2)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "hr" / "000002.npy"), hr)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "lr" / "000002.npy"), lr)


def test_meta_records_the_degradation_the_system_was_drawn_with(lenstronomy, tmp_path):
    out = tmp_path / "out"
    write.generate(out, 3, seed=5)
    assert sorted(p.name for p in (out / "meta").iterdir()) == [f"{i:06d}.json" for i in range(3)]
    fwhms = []
    for index in range(3):
        # What the Generator of (seed, index) draws first: the system, its PSF and noise.
        _, fwhm, _, rms = lensing._draw_system(np.random.default_rng([5, index]))
        meta = json.loads((out / "meta" / f"{index:06d}.json").read_text())
        assert meta == {
            "hr_pixel": 0.03,
            "lr_pixel": 0.06,
            "psf": "gaussian",
            "hr_psf_fwhm": fwhm,
            "lr_psf_fwhm": 2 * fwhm,
            "noise_rms": rms,
            "sky": 0.03,
        }
        assert tuple(meta) == lensing.META_KEYS
        assert lensing.PSF_FWHM[0] <= fwhm <= lensing.PSF_FWHM[1]
        fwhms.append(fwhm)
        # simulate_system gives the same record with the pair the files hold.
        lr, hr, again = lensing.simulate_system(np.random.default_rng([5, index]))
        assert again == meta
        np.testing.assert_array_equal(np.load(out / "hr" / f"{index:06d}.npy"), hr)
        np.testing.assert_array_equal(np.load(out / "lr" / f"{index:06d}.npy"), lr)
    assert len(set(fwhms)) == 3  # drawn per system
    # The noiseless pair of a system says so; its PSFs are the same.
    _, _, clean = lensing.simulate_system(np.random.default_rng([5, 0]), noise=False)
    assert clean["noise_rms"] == 0.0 and clean["hr_psf_fwhm"] == fwhms[0]


def test_same_output_whatever_the_workers(lenstronomy, tmp_path):
    write.generate(tmp_path / "one", 4, seed=3, workers=1)
    write.generate(tmp_path / "two", 4, seed=3, workers=2)
    names = sorted(
        p.relative_to(tmp_path / "one")
        for p in (tmp_path / "one").rglob("*")
        if p.suffix in (".npy", ".json")
    )
    assert len(names) == 12
    other = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))
    assert [n for n in other if n.suffix in (".npy", ".json")] == names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not list((tmp_path / "two").rglob(".*.tmp-*"))  # no temporaries left behind


def test_seeds_and_indices_differ(lenstronomy):
    lr, hr = _pair(0, 0)
    for other in (_pair(1, 0), _pair(0, 1)):
        assert not np.array_equal(hr, other[1])
        assert not np.array_equal(lr, other[0])


def test_lr_is_its_own_observation_not_a_resize(lenstronomy):
    lr, hr = _pair(7, 0)
    lr_clean, hr_clean = _pair(7, 0, noise=False)
    hr_noise = hr.astype(np.float64) - hr_clean
    lr_noise = lr.astype(np.float64) - lr_clean
    # Noise visible in both, at most 0.01 rms in HR (a perfect model could reach ~40 dB).
    assert 0.002 < hr_noise.std() <= 0.01
    assert 0.002 < lr_noise.std() <= 0.01
    # Independent draws: the LR noise is not the HR noise binned 2x2.
    binned = hr_noise.reshape(75, 2, 75, 2).mean(axis=(1, 3))
    assert abs(np.corrcoef(binned.ravel(), lr_noise.ravel())[0, 1]) < 0.1
    # Half the resolution (coarser pixels and PSF), so even without noise something is lost
    # that bicubic upscaling does not bring back ...
    assert _psnr(_bicubic(lr_clean), hr_clean) < 40
    # ... and LR is not HR binned 2x2 either: its PSF is twice as wide.
    hr_binned = hr_clean.astype(np.float64).reshape(75, 2, 75, 2).mean(axis=(1, 3))
    assert np.abs(hr_binned - lr_clean).max() > 0.02
    # Yet it is the same system: same geometry and the same brightness scale.
    assert np.corrcoef(hr_binned.ravel(), lr_clean.ravel())[0, 1] > 0.95
    assert abs(hr_binned.mean() - lr_clean.mean()) < 0.01


def test_bicubic_psnr_is_in_the_calibrated_band(lenstronomy):
    # The docstring's calibration: 30.3 dB mean over 500 pairs (per pair 24.6 .. 35.9). A loose
    # band on 8 pairs still catches a regression to a trivial task (56 dB) or to a broken one.
    scores = [_psnr(_bicubic(lr), hr) for lr, hr in (_pair(0, i) for i in range(8))]
    assert 25 < np.mean(scores) < 34, scores


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--count", "0"], "--count: expected a positive integer"),
        (["--count", "x"], "--count"),
        (["--count", "2", "--workers", "0"], "--workers: expected a positive integer"),
        ([], "--count"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, args, expected):
    result = cli("toolkit.simulate", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = cli("toolkit.simulate", str(tmp_path), "--count", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--overwrite" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_cli_without_lenstronomy_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lenstronomy", None)  # makes `import lenstronomy` fail
    assert simulate.main([str(tmp_path / "out"), "--count", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "lenstronomy is not installed: pip install 'srmae-toolkit[lensing]'" in err


def test_cli_writes_pairs_and_overwrites_on_request(lenstronomy, tmp_path):
    out = tmp_path / "out"
    assert cli("toolkit.simulate", str(out), "--count", "2", "--seed", "4").returncode == 0
    first = (out / "hr" / "000001.npy").read_bytes()
    (out / "hr" / "000001.npy").write_bytes(b"stale")
    result = cli("toolkit.simulate", str(out), "--count", "2", "--seed", "4", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "wrote 2 LR/HR pairs" in result.stderr  # the summary goes through logging
    assert (out / "hr" / "000001.npy").read_bytes() == first

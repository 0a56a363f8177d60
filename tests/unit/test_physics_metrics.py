"""The physics-aware metrics as a task computes them (`toolkit.core.metrics`: an output and the
batch it answers): cases with a known answer, against sums and astropy's background taken here,
and the forward-model consistency that must fall when the output moves by one pixel."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from astropy.stats import sigma_clipped_stats
from scipy.ndimage import gaussian_filter

from toolkit.core.metrics import image_metrics
from toolkit.core.seen import Seen, Truth
from toolkit.data.degrade import degrade
from toolkit.tasks.sr import PHYSICS

SCALE = 2
SIDE = 48
HR_SIGMA, LR_SIGMA = 1.2, 2.6  # PSF sigmas in HR pixels: the LR camera's is wider


def arcs(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 1, SIDE, SIDE] float64: a faint sky with noise and an arc-like ring of light of a
    random radius and a bright knot: signal well above the background, as lensing images."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[:SIDE, :SIDE] - (SIDE - 1) / 2
    out = []
    for _ in range(n):
        r = g.uniform(8, 14)
        ring = (
            0.6 * np.exp(-0.5 * ((np.hypot(x, y) - r) / 1.5) ** 2) * (1 + np.cos(np.arctan2(y, x)))
        )
        knot = 0.8 * np.exp(-0.5 * ((x - g.uniform(-5, 5)) ** 2 + (y - 3) ** 2) / 2.0**2)
        image = gaussian_filter(0.03 + 0.3 * ring + knot, HR_SIGMA) + g.normal(0, 0.004, x.shape)
        out.append(image)
    return torch.from_numpy(np.stack(out)[:, None])


def observed(hr: torch.Tensor, physical: bool, seed: int = 1) -> torch.Tensor:
    """The LR input of `hr`: blurred to the LR PSF and averaged over LR pixels (scipy and numpy,
    not the code under test), or the run's degradation; plus fresh noise."""
    if physical:
        extra = math.sqrt(LR_SIGMA**2 - HR_SIGMA**2)
        blurred = np.stack([gaussian_filter(h[0], extra, mode="reflect", truncate=4.0)
                            for h in hr.numpy()])[:, None]  # fmt: skip
        lr = blurred.reshape(len(hr), 1, SIDE // SCALE, SCALE, SIDE // SCALE, SCALE).mean((3, 5))
        lr = torch.from_numpy(lr)
    else:
        lr = degrade(hr, SCALE, clamp=False)
    noise = torch.from_numpy(np.random.default_rng(seed).normal(0, 0.002, lr.shape))
    return lr + noise


def truth(hr: torch.Tensor, physical: bool, **kw) -> Truth:
    n = len(hr)
    psf = torch.tensor([[HR_SIGMA, LR_SIGMA]] * n) if physical else torch.full((n, 2), math.nan)
    return Truth(hr, observed(hr, physical), psf, degrade=lambda x: degrade(x, SCALE, clamp=False),
                 scale=SCALE, **kw)  # fmt: skip


def test_a_perfect_prediction_scores_zero_flux_error_power_one_and_the_psnr_cap() -> None:
    hr = arcs(3)
    got = image_metrics(PHYSICS, Seen(hr.clone(), truth(hr, physical=True)))
    assert got["flux_err"].tolist() == [0.0] * 3
    assert got["arc_flux_err"].tolist() == [0.0] * 3
    for band in ("power_low", "power_mid", "power_high"):
        assert got[band].tolist() == [1.0] * 3
    assert got["arc_psnr"].tolist() == [100.0] * 3  # the cap: MSE floored at 1e-10
    assert got["arc_ssim"].tolist() == pytest.approx([1.0] * 3, abs=1e-12)


@pytest.mark.parametrize("physical", [True, False])
def test_the_forward_model_consistency_falls_when_the_output_moves_one_pixel(
    physical: bool,
) -> None:
    """Re-degraded to the LR grid, the true HR lands on its input to within the input's noise
    (rms 0.002: 54 dB); the same image one pixel off does not, by either forward model."""
    hr = arcs(4, seed=2)
    t = truth(hr, physical)
    assert t.physical.tolist() == [physical] * 4
    right = image_metrics(("lr_psnr",), Seen(hr, t))["lr_psnr"]
    shifted = image_metrics(("lr_psnr",), Seen(torch.roll(hr, 1, dims=-1), t))["lr_psnr"]
    noise_psnr = 10 * math.log10(1 / 0.002**2)
    assert (right > noise_psnr - 1.0).all()  # within the noise: not a mismatch of models
    assert (shifted < right - 3.0).all()


def test_the_other_forward_model_is_a_mismatch_the_consistency_sees() -> None:
    """An input degraded by the PSFs but judged by the run's bicubic degradation (the samples
    carry no PSFs) scores lower than by the right physics: the metric follows each sample's own
    degradation."""
    hr = arcs(2, seed=3)
    t = truth(hr, physical=True)
    own = image_metrics(("lr_psnr",), Seen(hr, t))["lr_psnr"]
    unknown = Truth(hr, t.input, torch.full((2, 2), math.nan), degrade=t.degrade, scale=SCALE)
    assert not unknown.physical.any()
    other = image_metrics(("lr_psnr",), Seen(hr, unknown))["lr_psnr"]
    assert (other < own - 3.0).all()


def test_flux_is_measured_in_the_data_units_above_astropys_background() -> None:
    """Under an asinh stretch (a nonlinear normalisation) the flux errors are those of the
    data's own units: sums taken here, after sinh, above astropy's sigma-clipped median."""
    soft = 0.1
    data = arcs(2, seed=4)
    hr = torch.asinh(data / soft)  # what the model sees
    out = hr * 1.05  # 5% brighter in the stretched values: not 5% in flux
    t = truth(hr, physical=False, to_data=lambda y: torch.sinh(y) * soft,
              from_data=lambda x: torch.asinh(x / soft))  # fmt: skip
    got = image_metrics(("flux_err", "arc_flux_err"), Seen(out, t))
    sr_data = (np.sinh(out.numpy()) * soft)[:, 0]
    hr_data = (np.sinh(hr.numpy()) * soft)[:, 0]
    for i in range(2):
        _, median, std = sigma_clipped_stats(hr_data[i], sigma=3, maxiters=5)
        arc = hr_data[i] > median + 3 * std
        for name, where in (("flux_err", np.ones_like(arc)), ("arc_flux_err", arc)):
            expected = abs((sr_data[i] - hr_data[i])[where].sum()) / abs(
                (hr_data[i] - median)[where].sum()
            )
            assert got[name][i].item() == pytest.approx(expected, rel=1e-9)
        assert got["flux_err"][i].item() > 0.06  # far from the 5% of the stretched values


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_simulators_noiseless_hr_re_degraded_lands_on_its_lr_within_the_noise(
    index: int,
) -> None:
    """A simulated system (lenstronomy renders LR on its own grid with its own PSF, not by
    degrading HR): its noiseless HR, taken to the LR grid with the PSFs the simulator recorded,
    differs from the noisy LR input by the input's noise alone, so the consistency is the
    noise's PSNR, 10 log10(1 / rms^2), to within the scatter of a noise estimate over ~3,000
    pixels (about 0.1 dB); the run's bicubic degradation is a model mismatch, several dB off."""
    pytest.importorskip("lenstronomy")
    from toolkit.data.loader import psf_sigmas
    from toolkit.data.sim.lensing import simulate_system

    lr, _, meta = simulate_system(np.random.default_rng([0, index]))
    _, clean, _ = simulate_system(np.random.default_rng([0, index]), noise=False)
    hr = torch.from_numpy(clean.astype(np.float64))[None, None]
    psf = psf_sigmas(json.dumps(meta).encode(), SCALE)[None].double()
    t = Truth(hr, torch.from_numpy(lr.astype(np.float64))[None, None], psf,
              degrade=lambda x: degrade(x, SCALE, clamp=False), scale=SCALE,
              saturated=hr >= 1)  # fmt: skip
    assert t.physical.all() and (hr >= 1).any()  # the lens core saturates: left out
    got = image_metrics(("lr_psnr",), Seen(hr, t))["lr_psnr"].item()
    noise = 10 * math.log10(1 / meta["noise_rms"] ** 2)
    assert got == pytest.approx(noise, abs=0.3)
    unknown = Truth(hr, t.input, torch.full((1, 2), math.nan), degrade=t.degrade, scale=SCALE,
                    saturated=hr >= 1)  # fmt: skip
    assert image_metrics(("lr_psnr",), Seen(hr, unknown))["lr_psnr"].item() < noise - 3

"""toolkit.core.physics against independent computations: the sigma-clipped background against
astropy, the blur against scipy.ndimage, SSIM's map against scikit-image, and the masks, flux,
binning and power spectra against numpy written out here.

Where a tolerance is 1e-12 relative, both sides are float64 and differ only in the order of their
sums (torch's and numpy's reductions, a convolution against scipy's correlate1d)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from astropy.stats import SigmaClip
from astropy.stats import sigma_clipped_stats as astropy_stats
from astropy.utils.exceptions import AstropyUserWarning
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from tests.helpers import SKIMAGE_SSIM
from toolkit.core import physics

REL = 1e-12  # float64 on both sides, sums in another order


def sky(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A noisy sky (about 0.1, sigma 0.02) with a bright arc, a compact source and hot and cold
    pixels: what sigma clipping is for."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    x = 0.1 + 0.02 * rng.standard_normal((n, c, h, w))
    for i in range(n):
        cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
        radius = np.hypot(yy - cy, xx - cx)
        arc = np.exp(-0.5 * ((radius - min(h, w) / 4) / 1.2) ** 2) * (xx > cx - 2)
        blob = np.exp(-0.5 * (radius / 1.5) ** 2)
        x[i] += 0.5 * arc + 0.3 * blob
        hot = rng.integers(0, h * w, size=max(2, h * w // 100))
        x[i].reshape(c, -1)[:, hot] += rng.choice([-0.5, 0.8], size=hot.size)
    return x


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# --- sigma_clipped_stats -------------------------------------------------------------------------

SHAPES = [(2, 3, 32, 32), (3, 2, 17, 23), (1, 1, 16, 10), (2, 2, 12, 20)]


@pytest.mark.parametrize("shape", SHAPES)
def test_sigma_clipped_stats_matches_astropy(shape: tuple[int, int, int, int]) -> None:
    x = sky(*shape, seed=sum(shape))
    mean, median, std = physics.sigma_clipped_stats(t(x))
    assert mean.shape == median.shape == std.shape == shape[:2]
    assert mean.dtype == torch.float64
    for i in range(shape[0]):
        for c in range(shape[1]):
            ref = astropy_stats(x[i, c], sigma=3, maxiters=5)
            got = (mean[i, c].item(), median[i, c].item(), std[i, c].item())
            assert got == pytest.approx(ref, rel=REL), (i, c)


def test_sigma_clipped_stats_even_count_median_is_the_mean_of_the_middle_two() -> None:
    # 0..3 clips nothing (3 std = 3.35), so the median is of four values: 1.5, not torch's 1.
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    _, median, _ = physics.sigma_clipped_stats(x)
    assert median.item() == 1.5 == astropy_stats(x.numpy()[0, 0])[1]
    # Clipped to an even count: 64 sky values after the one outlier goes.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((1, 1, 5, 13))
    a[0, 0, 0, 0] = 100.0
    _, median, _ = physics.sigma_clipped_stats(t(a))
    kept = np.sort(a.ravel())[:-1]
    assert kept.size % 2 == 0
    assert median.item() == pytest.approx(astropy_stats(a[0, 0])[1], rel=REL)
    assert median.item() == pytest.approx(np.median(kept), rel=REL)


def test_sigma_clipped_stats_stops_at_maxiters_and_takes_other_settings() -> None:
    # A heavy tail: every pass clips a few more, so astropy stops at maxiters, not convergence.
    rng = np.random.default_rng(7)
    x = rng.lognormal(0.0, 1.0, size=(2, 2, 24, 24))
    clip = SigmaClip(sigma=3, maxiters=5)
    clip(x[0, 0], axis=None, masked=False)
    assert clip._niterations == 5
    assert (
        clip(x[0, 0], axis=None, masked=False).size
        != SigmaClip(sigma=3, maxiters=6)(x[0, 0], axis=None, masked=False).size
    )
    for sigma, maxiters in ((3.0, 5), (2.5, 10), (2.0, 1)):
        got = physics.sigma_clipped_stats(t(x), sigma=sigma, maxiters=maxiters)
        for i in range(2):
            for c in range(2):
                ref = astropy_stats(x[i, c], sigma=sigma, maxiters=maxiters)
                assert [g[i, c].item() for g in got] == pytest.approx(ref, rel=REL)


def test_sigma_clipped_stats_never_brings_a_clipped_value_back() -> None:
    # Three clumps of values and a narrow clip (1.5 sigma): the bounds can widen between passes
    # until they hold a value an earlier pass clipped. astropy's stats keep it out (the kept set
    # only shrinks); its sigma_clip(masked=True) mask, the last bounds applied to all the data,
    # lets it back in, which is how this test knows the case occurs.
    rng = np.random.default_rng(4)
    x = np.empty((8, 36))
    for i in range(8):
        centres = rng.uniform(-10, 10, 3)
        x[i] = centres[rng.integers(0, 3, 36)] + rng.uniform(0, 1, 36) * rng.standard_normal(36)
    x = x.reshape(8, 1, 6, 6)
    got = physics.sigma_clipped_stats(t(x), sigma=1.5)
    returns = 0
    for i in range(8):
        kept = SigmaClip(sigma=1.5)(x[i, 0], axis=None, masked=False).size
        returns += SigmaClip(sigma=1.5)(x[i, 0], axis=None, masked=True).count() != kept
        ref = astropy_stats(x[i, 0], sigma=1.5, maxiters=5)
        assert [g[i, 0].item() for g in got] == pytest.approx(ref, rel=REL), i
    assert returns > 0


def test_sigma_clipped_stats_bounds_are_inclusive() -> None:
    # -1, 1 and sixteen 0s: median 0, std exactly 1/3, so the bounds fall on -1 and 1 themselves.
    v = np.array([-1.0, 1.0] + [0.0] * 16)
    assert 3 * v.std() == 1.0
    _, _, std = physics.sigma_clipped_stats(t(v.reshape(1, 1, 3, 6)))
    assert std.item() == astropy_stats(v)[2] == v.std()  # nothing clipped


def test_sigma_clipped_stats_leaves_out_non_finite_pixels() -> None:
    x = sky(2, 2, 12, 12, seed=15)
    x[0, 0, 2, 3], x[0, 1, 5, 5], x[1, 0, 0, 0], x[1, 0, 7, 1] = np.nan, np.inf, -np.inf, np.nan
    got = physics.sigma_clipped_stats(t(x))
    for i in range(2):
        for c in range(2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyUserWarning)  # "automatically clipped"
                ref = astropy_stats(x[i, c], sigma=3, maxiters=5)
            assert [g[i, c].item() for g in got] == pytest.approx(ref, rel=REL), (i, c)


def test_sigma_clipped_stats_of_a_flat_image_and_of_float32() -> None:
    mean, median, std = physics.sigma_clipped_stats(torch.full((2, 1, 8, 8), 0.25))
    assert mean.tolist() == median.tolist() == [[0.25], [0.25]]
    assert std.tolist() == [[0.0], [0.0]]
    x = sky(1, 2, 16, 16, seed=3).astype(np.float32)
    _, median, _ = physics.sigma_clipped_stats(t(x))
    assert median.dtype == torch.float64
    # float32 pixels, float64 arithmetic, as astropy's on a float64 copy.
    ref = astropy_stats(x[0, 1].astype(np.float64))[1]
    assert median[0, 1].item() == pytest.approx(ref, rel=REL)


# --- signal_mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_signal_mask_matches_astropy_threshold(shape: tuple[int, int, int, int]) -> None:
    x = sky(*shape, seed=11)
    got = physics.signal_mask(t(x)).numpy()
    assert got.dtype == np.bool_ and got.shape == shape
    for i in range(shape[0]):
        for c in range(shape[1]):
            _, med, std = astropy_stats(x[i, c], sigma=3, maxiters=5)
            ref = (x[i, c] > med + 3 * std) | (x[i, c] == x[i, c].max())
            np.testing.assert_array_equal(got[i, c], ref)
            assert 0 < ref.sum() < ref.size / 2  # the arc, not the sky


def test_signal_mask_is_never_empty() -> None:
    # Flat: nothing above the background, every pixel the brightest.
    assert physics.signal_mask(torch.full((1, 2, 6, 6), 0.3)).all()
    # Uniform noise: median + 3 std (0.5 + 0.87) is above every pixel; only the brightest is in.
    x = torch.from_numpy(np.random.default_rng(2).random((3, 2, 16, 16)))
    mask = physics.signal_mask(x)
    assert mask.sum(dim=(2, 3)).eq(1).all()
    brightest = x.flatten(2).argmax(dim=2)
    assert mask.flatten(2).gather(2, brightest.unsqueeze(2)).all()


# --- masked PSNR and SSIM ------------------------------------------------------------------------


def noisy_pair(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hr = np.clip(sky(*shape, seed=seed), 0, 1)
    sr = np.clip(hr + 0.05 * rng.standard_normal(hr.shape), 0, 1)
    mask = rng.random(hr.shape) < 0.3
    return sr, hr, mask


def test_masked_psnr_matches_numpy() -> None:
    sr, hr, mask = noisy_pair((3, 2, 20, 24), seed=1)
    got = physics.masked_psnr(t(sr), t(hr), t(mask))
    assert got.shape == (3,)
    for i in range(3):
        mse = np.mean((sr[i] - hr[i])[mask[i]] ** 2)
        assert got[i].item() == pytest.approx(10 * math.log10(1 / mse), rel=REL)
    assert physics.masked_psnr(t(hr), t(hr), t(mask)).tolist() == [100.0] * 3
    with pytest.raises(ValueError, match="at least one"):
        physics.masked_psnr(t(sr), t(hr), t(np.zeros_like(mask)))


def skimage_map(sr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """scikit-image's SSIM map of one channel, cropped to the valid region."""
    _, full = structural_similarity(sr, hr, full=True, **SKIMAGE_SSIM)
    return full[5:-5, 5:-5]


def test_masked_ssim_matches_scikit_image() -> None:
    sr, hr, mask = noisy_pair((3, 2, 24, 30), seed=2)
    mask[2] = False
    mask[2, 1, :4, :] = True  # only in the border the map does not cover: the whole map's mean
    got = physics.masked_ssim(t(sr), t(hr), t(mask))
    for i in range(3):
        maps = np.stack([skimage_map(sr[i, c], hr[i, c]) for c in range(2)])
        inner = mask[i][:, 5:-5, 5:-5]
        ref = maps[inner].mean() if inner.any() else maps.mean()
        # Looser: SSIM's variances are differences of filtered moments, which cancel.
        assert got[i].item() == pytest.approx(ref, rel=1e-10)
    assert physics.masked_ssim(t(hr), t(hr), t(mask)).tolist() == [1.0] * 3


# --- flux ----------------------------------------------------------------------------------------


def background(hr: np.ndarray) -> np.ndarray:
    n, c = hr.shape[:2]
    med = [[astropy_stats(hr[i, j], sigma=3, maxiters=5)[1] for j in range(c)] for i in range(n)]
    return np.array(med)[..., None, None]


def test_flux_error_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    hr = 1000 * sky(3, 2, 20, 20, seed=3)  # counts, not [0, 1]
    sr = hr * rng.uniform(0.9, 1.2, size=hr.shape)
    b = background(hr)
    mask = rng.random(hr.shape) < 0.4
    got = physics.flux_error(t(sr), t(hr))
    got_masked = physics.flux_error(t(sr), t(hr), t(mask))
    for i in range(3):
        # Looser: the error is a difference of two nearly equal sums.
        fs, fh = (sr[i] - b[i]).sum(), (hr[i] - b[i]).sum()
        assert got[i].item() == pytest.approx(abs(fs - fh) / abs(fh), rel=1e-10)
        fs, fh = (sr[i] - b[i])[mask[i]].sum(), (hr[i] - b[i])[mask[i]].sum()
        assert got_masked[i].item() == pytest.approx(abs(fs - fh) / abs(fh), rel=1e-10)


def test_flux_error_known_values() -> None:
    hr = 1000 * sky(2, 3, 20, 20, seed=4)
    assert physics.flux_error(t(hr), t(hr)).tolist() == [0.0, 0.0]
    b = background(hr)
    # 10% more flux above the background everywhere, or only in the signal.
    brighter = b + 1.1 * (hr - b)
    assert physics.flux_error(t(brighter), t(hr)).tolist() == pytest.approx([0.1, 0.1], rel=1e-9)
    mask = physics.signal_mask(t(hr)).numpy()
    brighter = np.where(mask, b + 1.1 * (hr - b), hr)
    got = physics.flux_error(t(brighter), t(hr), t(mask))
    assert got.tolist() == pytest.approx([0.1, 0.1], rel=1e-9)


# --- the forward model ---------------------------------------------------------------------------


def test_gaussian_blur_matches_scipy() -> None:
    x = sky(6, 2, 14, 19, seed=5)
    # 0 and negative: unchanged; 0.1: a radius of 0; 6.0: a radius of 24, wider than the image,
    # so the reflection repeats.
    sigma = torch.tensor([0.0, 0.1, 0.8, 1.7, 6.0, -1.0])
    got = physics.gaussian_blur(t(x), sigma)
    assert got.dtype == torch.float64 and got.shape == x.shape
    for i in range(6):
        for c in range(2):
            ref = gaussian_filter(x[i, c], max(sigma[i].item(), 0.0), mode="reflect", truncate=4.0)
            np.testing.assert_allclose(got[i, c].numpy(), ref, rtol=REL, atol=1e-15)
    assert torch.equal(got[0], t(x[0])) and torch.equal(got[5], t(x[5]))
    assert torch.equal(physics.gaussian_blur(t(x), torch.zeros(6)), t(x))
    # Unchanged means unchanged: a bad (NaN) pixel of an unblurred image stays one pixel, even
    # though a neighbour in the batch is blurred with a wide kernel.
    bad = x[:2].copy()
    bad[0, 0, 3, 4] = np.nan
    got = physics.gaussian_blur(t(bad), torch.tensor([0.0, 2.0])).numpy()
    np.testing.assert_array_equal(got[0], bad[0])


def block_mean(x: np.ndarray, f: int) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5))


def test_bin_mean_matches_numpy() -> None:
    x = sky(2, 3, 12, 18, seed=6)
    for f in (1, 2, 3, 6):
        np.testing.assert_allclose(physics.bin_mean(t(x), f).numpy(), block_mean(x, f), rtol=REL)
    with pytest.raises(ValueError, match="divisor"):
        physics.bin_mean(t(x), 4)


def test_redegrade_is_scipy_blur_then_block_mean() -> None:
    x = sky(3, 2, 24, 24, seed=7)
    hr_sigma = torch.tensor([0.5, 1.0, 2.0])
    lr_sigma = torch.tensor([2.0, 1.0, 1.5])  # the last is sharper than HR: no blur, only binning
    got = physics.redegrade(t(x), hr_sigma, lr_sigma, 4)
    assert got.shape == (3, 2, 6, 6)
    for i in range(3):
        s = math.sqrt(max(lr_sigma[i].item() ** 2 - hr_sigma[i].item() ** 2, 0.0))
        blurred = np.stack([gaussian_filter(x[i, c], s, mode="reflect") for c in range(2)])
        ref = block_mean(blurred[None], 4)[0]
        np.testing.assert_allclose(got[i].numpy(), ref, rtol=REL, atol=1e-15)


# --- power spectra -------------------------------------------------------------------------------


def numpy_power(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the 2-D power summed over channels [N, H, W], and |f| [H, W]."""
    h, w = x.shape[-2:]
    x = x - x.mean(axis=(2, 3), keepdims=True)
    p = (np.abs(np.fft.fft2(x)) ** 2).sum(axis=1) / (h * w)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    return p, np.sqrt(fy**2 + fx**2)


def numpy_radial(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, f = numpy_power(x)
    s = min(x.shape[-2:])
    k = s // 2
    ring = np.floor(s * f + 0.5).astype(int).ravel()
    keep = (ring >= 1) & (ring <= k)
    counts = np.bincount(ring[keep], minlength=k + 1)[1:]
    sums = [np.bincount(ring[keep], weights=pi.ravel()[keep], minlength=k + 1)[1:] for pi in p]
    power = np.stack(sums)
    return np.arange(1, k + 1) / s, power / counts / x.shape[1]


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (3, 1, 33, 33), (2, 2, 24, 40), (1, 2, 30, 20)])
def test_radial_power_matches_numpy(shape: tuple[int, int, int, int]) -> None:
    x = sky(*shape, seed=9)
    freqs, power = physics.radial_power(t(x))
    ref_f, ref_p = numpy_radial(x)
    assert power.shape == (shape[0], min(shape[2:]) // 2)
    np.testing.assert_allclose(freqs.numpy(), ref_f, rtol=0)
    # Looser: two FFT implementations, not one sum in two orders.
    np.testing.assert_allclose(power.numpy(), ref_p, rtol=1e-10)


def test_radial_power_of_white_noise_is_flat() -> None:
    # Unit-variance white noise has expected power 1 at every frequency. A bin of m frequencies
    # holds about m / 2 independent values (a real image's spectrum is conjugate-symmetric), each
    # exponential with std 1, so its mean over n images and c channels scatters by
    # 1 / sqrt(m / 2 * n * c); 5 of those is a bound a fixed seed passes and a slope does not.
    n, c, size = 8, 2, 48
    x = np.random.default_rng(10).standard_normal((n, c, size, size))
    _, power = physics.radial_power(t(x))
    _, f = numpy_power(x)
    ring = np.floor(size * f + 0.5).astype(int).ravel()
    m = np.bincount(ring, minlength=size // 2 + 1)[1 : size // 2 + 1]
    scatter = 1 / np.sqrt(m / 2 * n * c)
    mean = power.mean(dim=0).numpy()
    assert np.all(np.abs(mean - 1) < 5 * scatter)
    # Flat: the upper half of the bins averages what the lower half does, within 5 of that
    # difference's standard deviations (the bins' scatters added in quadrature).
    half = size // 4
    spread = np.sqrt((scatter[:half] ** 2).sum() / half**2 + (scatter[half:] ** 2).sum() / half**2)
    assert abs(mean[half:].mean() - mean[:half].mean()) < 5 * spread


def test_band_power_ratio_matches_numpy() -> None:
    sr, hr, _ = noisy_pair((3, 2, 30, 36), seed=12)
    got = physics.band_power_ratio(t(sr), t(hr))
    assert got.shape == (3, 3)
    ps, f = numpy_power(sr)
    ph, _ = numpy_power(hr)
    edges = [(0, 1 / 6), (1 / 6, 1 / 3), (1 / 3, 1 / 2)]
    for i in range(3):
        bands = [(f > lo) & (f <= hi) for lo, hi in edges]
        ref = [ps[i][band].sum() / ph[i][band].sum() for band in bands]
        np.testing.assert_allclose(got[i].numpy(), ref, rtol=1e-10)


def test_band_power_ratio_known_directions() -> None:
    hr = sky(2, 2, 32, 32, seed=13)
    assert torch.equal(
        physics.band_power_ratio(t(hr), t(hr)), torch.ones(2, 3, dtype=torch.float64)
    )
    blurred = physics.gaussian_blur(t(hr), torch.tensor([1.0, 1.5]))
    low, mid, high = physics.band_power_ratio(blurred, t(hr)).unbind(dim=1)
    assert (high < 1).all() and (high < mid).all() and (mid < low).all()
    noisy = t(hr + 0.05 * np.random.default_rng(14).standard_normal(hr.shape))
    assert (physics.band_power_ratio(noisy, t(hr))[:, 2] > 1).all()  # noise adds high power

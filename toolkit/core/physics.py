"""Physics-aware measures of super-resolved sky images, per image: background, arc mask, flux, PSF.

The building blocks of the physics metrics, as pure tensor functions with no knowledge of the
metric table or of tasks:

- ``sigma_clipped_stats``: the sky background, matching ``astropy.stats.sigma_clipped_stats``;
  ``signal_mask``: the pixels above it (the lensed arcs and the lens), never empty.
- ``masked_psnr``, ``masked_ssim``, ``flux_error``: the comparisons restricted to that signal,
  where a good score cannot be bought with an empty, easy sky.
- ``gaussian_blur``, ``bin_mean``, ``redegrade``: the forward model from the HR grid back to the
  LR grid (a Gaussian PSF, then pixel binning), to see whether a prediction, degraded again,
  reproduces its input; the blur matches ``scipy.ndimage.gaussian_filter``.
- ``radial_power``, ``band_power_ratio``: power spectra, i.e. which spatial frequencies a
  prediction restores, invents or loses.

Conventions as in `toolkit.core.images`: images are ``[N, C, H, W]``, everything is computed in
float64 whatever the input dtype, and results are per image (``[N]``) unless stated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.core.images import SSIM_WINDOW, pair, psnr_from_mse, ssim_map

# astropy's defaults, so that a background here is the one an astronomer gets from
# sigma_clipped_stats: 3 sigma keeps a Gaussian sky's pixels (0.27% lost) and rejects sources;
# 5 iterations are enough for the kept set to settle on the images we see.
CLIP_SIGMA = 3.0
CLIP_MAXITERS = 5
# A pixel is signal when it is brighter than the background by 3 of its standard deviations:
# the usual detection threshold, where sky noise alone passes 0.13% of pixels.
SIGNAL_NSIGMA = 3.0
# scipy.ndimage.gaussian_filter's default truncation: the taps beyond 4 sigma hold < 1e-4 of the
# kernel's weight, and matching scipy lets the tests compare against it exactly.
BLUR_TRUNCATE = 4.0
# Thirds of the Nyquist frequency (0.5 cycles per pixel): low, mid and high spatial frequencies.
# The corners of the 2-D spectrum beyond 0.5 are left out, so each band is a full annulus.
BANDS: tuple[tuple[float, float], ...] = ((0.0, 1 / 6), (1 / 6, 1 / 3), (1 / 3, 1 / 2))
# The SSIM map covers the valid region only: its pixel (i, j) is centred on image pixel
# (i + 5, j + 5).
SSIM_BORDER = SSIM_WINDOW // 2


def _image(x: Tensor) -> Tensor:
    if x.ndim != 4:
        raise ValueError(f"expected an image batch [N, C, H, W], got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _mask(mask: Tensor, like: Tensor) -> Tensor:
    try:
        return mask.detach().to(like.device, torch.bool).expand_as(like)
    except RuntimeError as e:
        raise ValueError(
            f"a mask of shape {tuple(mask.shape)} does not fit images {tuple(like.shape)}"
        ) from e


# --- the background and the signal ---------------------------------------------------------------


def sigma_clipped_stats(
    x: Tensor, sigma: float = CLIP_SIGMA, maxiters: int = CLIP_MAXITERS
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, median, std), each ``[N, C]``, of each image-channel's pixels after iterative sigma
    clipping, as ``astropy.stats.sigma_clipped_stats(a, sigma=sigma, maxiters=maxiters)`` gives
    them (median centre, population std; non-finite pixels are left out, as there).

    Each iteration keeps the still-kept values within ``median +- sigma * std`` of the kept
    values (inclusive; a clipped value never returns) and stops when nothing is clipped.
    """
    x = _image(x)
    n, c = x.shape[:2]
    # Clipping keeps an interval of values, so in sorted order the kept values are always one
    # contiguous run: one sort serves every iteration, and the median is read off by position.
    s, _ = x.reshape(n, c, -1).sort(dim=-1)
    keep = torch.isfinite(s)  # -inf sorts first, +inf and NaN last: still one run

    def stats(keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        count = keep.sum(dim=-1)
        first = (keep.cumsum(dim=-1) == 0).sum(dim=-1)  # values clipped below the run
        last = s.shape[-1] - 1
        # An even count's median is the mean of the two middle values, as numpy's (and unlike
        # torch.nanmedian, which returns the lower one).
        lo = (first + (count - 1).div(2, rounding_mode="floor")).clamp(0, last)
        hi = (first + count.div(2, rounding_mode="floor")).clamp(0, last)
        median = (s.gather(-1, lo.unsqueeze(-1)) + s.gather(-1, hi.unsqueeze(-1))).squeeze(-1) / 2
        kept = torch.where(keep, s, 0.0)
        mean = kept.sum(dim=-1) / count
        dev = torch.where(keep, s - mean.unsqueeze(-1), 0.0)
        std = (dev.square().sum(dim=-1) / count).sqrt()
        median = torch.where(count > 0, median, math.nan)
        return mean, median, std

    for _ in range(maxiters):
        _, median, std = stats(keep)
        lower = (median - std * sigma).unsqueeze(-1)
        upper = (median + std * sigma).unsqueeze(-1)
        clipped = keep & ((s < lower) | (s > upper))
        # An image-channel that clips nothing has converged: later passes see the same set and
        # clip nothing either, so running on until all have converged changes none of them.
        if not clipped.any():
            break
        keep = keep & ~clipped
    return stats(keep)


def signal_mask(
    hr: Tensor,
    nsigma: float = SIGNAL_NSIGMA,
    background: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Bool ``[N, C, H, W]``: True where ``hr`` exceeds its image-channel's sigma-clipped
    background median by ``nsigma`` clipped standard deviations. The brightest pixels of each
    image-channel are always in (all of them where several tie), so no mask is empty: a blank or
    flat image is all brightest pixels, and its masked measures become the whole image's."""
    hr = _image(hr)
    # (median, std) [N, C] where the caller has them already
    median, std = sigma_clipped_stats(hr)[1:] if background is None else background
    threshold = (median + nsigma * std)[..., None, None]
    brightest = hr == hr.amax(dim=(2, 3), keepdim=True)
    return (hr > threshold) | brightest


# --- comparisons on the signal -------------------------------------------------------------------


def masked_psnr(sr: Tensor, hr: Tensor, mask: Tensor) -> Tensor:
    """PSNR in dB (data range 1) of the mean squared error over the pixels of ``mask`` (all
    channels together): ``[N]``; identical images give 100 dB, as `toolkit.core.images.psnr`."""
    sr, hr = pair(sr, hr)
    m = _mask(mask, sr)
    count = m.sum(dim=(1, 2, 3))
    if bool((count == 0).any()):
        raise ValueError("masked_psnr needs at least one masked pixel per image")
    err = torch.where(m, (sr - hr).square(), 0.0).sum(dim=(1, 2, 3)) / count
    return psnr_from_mse(err)


def masked_ssim(sr: Tensor, hr: Tensor, mask: Tensor, smap: Tensor | None = None) -> Tensor:
    """SSIM (`toolkit.core.images.ssim_map`) averaged over the pixels of ``mask`` within the map's
    valid region (all channels): ``[N]``. An image whose mask lies wholly in the 5-pixel border
    the map does not cover gets the mean of the whole map, as `toolkit.core.images.ssim`.
    ``smap``: the map of ``sr`` and ``hr`` where the caller has it already."""
    sr, hr = pair(sr, hr)
    smap = ssim_map(sr, hr) if smap is None else smap
    b = SSIM_BORDER
    m = _mask(mask, sr)[..., b:-b, b:-b]
    count = m.sum(dim=(1, 2, 3))
    inside = torch.where(m, smap, 0.0).sum(dim=(1, 2, 3)) / count.clamp_min(1)
    return torch.where(count > 0, inside, smap.mean(dim=(1, 2, 3)))


def flux_error(
    sr: Tensor, hr: Tensor, mask: Tensor | None = None, background: Tensor | None = None
) -> Tensor:
    """Relative error of the total flux above the background, ``[N]``:
    ``|sum(sr - b) - sum(hr - b)| / |sum(hr - b)|``, with ``b`` the sigma-clipped median of ``hr``
    per image-channel and the sums over channels and pixels (those of ``mask`` when given).

    Flux is only meaningful in the data's own units (counts, not a normalised or stretched
    copy), so pass those. An ``hr`` with no flux above its background gives inf (or NaN).
    ``background``: that median ``[N, C]`` where the caller has it already."""
    sr, hr = pair(sr, hr)
    b = sigma_clipped_stats(hr)[1] if background is None else background
    b = b[..., None, None]
    ds, dh = sr - b, hr - b
    if mask is not None:
        m = _mask(mask, sr)
        ds, dh = torch.where(m, ds, 0.0), torch.where(m, dh, 0.0)
    fs, fh = ds.sum(dim=(1, 2, 3)), dh.sum(dim=(1, 2, 3))
    return (fs - fh).abs() / fh.abs()


# --- the forward model: PSF and pixels -----------------------------------------------------------


def _reflect_index(n: int, pad: int, device: torch.device) -> Tensor:
    # scipy.ndimage's "reflect" (half-sample symmetric: d c b a | a b c d | d c b a), repeating
    # with period 2n where the pad is wider than the image. torch's F.pad "reflect" is scipy's
    # "mirror" (d c b | a b c d) and refuses pads as wide as the image, hence indices by hand.
    i = torch.arange(-pad, n + pad, device=device).remainder(2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Each image blurred by a Gaussian of its own ``sigma`` (``[N]``, in pixels), ``[N, C, H, W]``
    float64: separable, radius ``int(4 * sigma + 0.5)``, taps normalised to sum 1, boundaries
    reflected (half-sample symmetric); as ``scipy.ndimage.gaussian_filter(a, sigma,
    mode="reflect", truncate=4.0)`` per image-channel. A sigma <= 0 leaves its image unchanged."""
    x = _image(x)
    n, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
    if sigma.numel() != n:
        raise ValueError(f"expected one sigma per image ({n}), got {sigma.numel()}")
    blur = sigma > 0
    if not bool(blur.any()):
        return x.clone()
    s = torch.where(blur, sigma, 1.0)  # a harmless sigma for the identity images' unused taps
    radius = torch.where(blur, (BLUR_TRUNCATE * s + 0.5).floor(), 0.0)
    r = int(radius.max().item())
    # One kernel width for the whole batch: each image's taps beyond its own radius are zero, so
    # every image is filtered with exactly its own kernel, in one grouped convolution.
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=x.device)
    taps = torch.exp(-0.5 * (t / s[:, None]) ** 2) * (t.abs() <= radius[:, None])
    taps = taps / taps.sum(dim=1, keepdim=True)
    weight = taps.repeat_interleave(c, dim=0)  # [N*C, 2r+1]
    y = x.reshape(1, n * c, h, w)
    y = y[:, :, _reflect_index(h, r, x.device)]
    y = F.conv2d(y, weight.view(n * c, 1, -1, 1), groups=n * c)
    y = y[:, :, :, _reflect_index(w, r, x.device)]
    y = F.conv2d(y, weight.view(n * c, 1, 1, -1), groups=n * c)
    return torch.where(blur[:, None, None, None], y.reshape(n, c, h, w), x)


def bin_mean(x: Tensor, factor: int) -> Tensor:
    """The mean of each ``factor`` x ``factor`` block: ``[N, C, H / factor, W / factor]``, float64.
    H and W must be multiples of ``factor``."""
    x = _image(x)
    n, c, h, w = x.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"cannot bin {h}x{w} images by {factor}: not a divisor of both sides")
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


def redegrade(sr: Tensor, hr_sigma: Tensor, lr_sigma: Tensor, factor: int) -> Tensor:
    """The forward model from the HR grid to the LR grid: ``[N, C, H / factor, W / factor]``.

    ``sr`` already carries the HR PSF, so it is blurred only by what the LR PSF adds,
    ``sqrt(max(lr_sigma^2 - hr_sigma^2, 0))`` (Gaussians add in quadrature; ``hr_sigma`` and
    ``lr_sigma`` are ``[N]`` PSF sigmas in HR pixels), then binned: an LR pixel is the mean
    surface brightness of the HR pixels it covers."""
    sr = _image(sr)
    hs = torch.as_tensor(hr_sigma, dtype=torch.float64, device=sr.device)
    ls = torch.as_tensor(lr_sigma, dtype=torch.float64, device=sr.device)
    extra = (ls.square() - hs.square()).clamp_min(0.0).sqrt()
    return bin_mean(gaussian_blur(sr, extra), factor)


# --- power spectra -------------------------------------------------------------------------------


def _power(x: Tensor) -> tuple[Tensor, Tensor]:
    """The 2-D power ``|fft2(x - mean)|^2 / (H W)`` summed over channels, ``[N, H, W]``, and the
    radial frequency ``|f|`` in cycles per pixel of each element, ``[H, W]``."""
    x = _image(x)
    h, w = x.shape[-2:]
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().square().sum(dim=1) / (h * w)
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=x.device)
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=x.device)
    return power, (fy[:, None].square() + fx[None, :].square()).sqrt()


def radial_power(x: Tensor) -> tuple[Tensor, Tensor]:
    """(frequencies ``[K]`` in cycles per pixel, power ``[N, K]``): the azimuthally averaged power
    spectrum ``|fft2(x - mean(x))|^2 / (H W)`` per image, averaged over channels.

    With ``S = min(H, W)`` and ``K = S // 2``, bin ``k`` (1..K, frequency ``k / S``) averages the
    2-D frequencies with ``k - 0.5 <= S |f| < k + 0.5``; the mean (k = 0) and the corners beyond
    the last bin are left out. White noise of variance v has a flat spectrum at v."""
    power, f = _power(x)
    n, c = x.shape[:2]
    s = min(x.shape[-2:])
    k = s // 2
    if k < 1:
        raise ValueError(f"radial_power needs images of at least 2x2, got {tuple(x.shape)}")
    bins = torch.floor(s * f + 0.5).long().reshape(-1)  # k - 0.5 <= S |f| < k + 0.5
    inside = (bins >= 1) & (bins <= k)
    onehot = F.one_hot(bins[inside] - 1, k).to(torch.float64)  # [pixels, K]
    counts = onehot.sum(dim=0)
    totals = power.reshape(n, -1)[:, inside] @ onehot
    freqs = torch.arange(1, k + 1, dtype=torch.float64, device=power.device) / s
    return freqs, totals / counts.clamp_min(1) / c


def band_power_ratio(sr: Tensor, hr: Tensor) -> Tensor:
    """``[N, 3]``: for the low, mid and high bands (``|f|`` in (0, 1/6], (1/6, 1/3], (1/3, 1/2]
    cycles per pixel), the total 2-D power of ``sr`` (mean subtracted, all channels) over that of
    ``hr``. Below 1 the prediction lost power there (blur), above 1 it added some (noise,
    artefacts); a perfect prediction gives exactly 1. A band where ``hr`` has no power gives inf
    or NaN."""
    sr, hr = pair(sr, hr)
    ps, f = _power(sr)
    ph, _ = _power(hr)
    out = []
    for lo, hi in BANDS:
        band = (f > lo) & (f <= hi)
        out.append(ps[:, band].sum(dim=1) / ph[:, band].sum(dim=1))
    return torch.stack(out, dim=1)

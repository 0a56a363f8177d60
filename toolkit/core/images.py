"""Image comparisons per image: MSE, PSNR and SSIM (and SSIM's map), the conventions every
metric of images shares.

- Images are ``[N, C, H, W]`` tensors in [0, 1]; the data range is 1.0. Everything is computed in
  float64, whatever the input dtype or device, and each metric is a value *per image*.
- MSE: mean over C, H, W.
- PSNR: ``10 * log10(1 / mse)`` per image, with mse clamped to at least 1e-10, so identical
  images score 100 dB rather than infinity.
- SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population
  (co)variances, averaged over the valid region only (no padding: the map is ``H - 10`` by
  ``W - 10``), then over channels. This matches scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1.0)`` (which filters with reflection and then crops the 5-pixel border); it does not
  match torchmetrics as shipped, which also averages the reflect-padded border.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 1.0
PSNR_MSE_FLOOR = 1e-10  # -> at most 100 dB
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def pair(sr: Tensor, hr: Tensor) -> tuple[Tensor, Tensor]:
    """Two image batches of one shape [N, C, H, W] as float64 on `sr`'s device."""
    if sr.shape != hr.shape or sr.ndim != 4:
        raise ValueError(
            f"expected sr and hr of one shape [N, C, H, W], got {tuple(sr.shape)} and "
            f"{tuple(hr.shape)}"
        )
    return sr.detach().to(torch.float64), hr.detach().to(sr.device, torch.float64)


def mse(sr: Tensor, hr: Tensor) -> Tensor:
    """Mean squared error per image: ``[N]``, float64."""
    sr, hr = pair(sr, hr)
    return (sr - hr).square().mean(dim=(1, 2, 3))


def psnr(sr: Tensor, hr: Tensor) -> Tensor:
    """PSNR in dB per image: ``[N]``, float64; identical images give 100 dB."""
    return psnr_from_mse(mse(sr, hr))


def psnr_from_mse(err: Tensor) -> Tensor:
    """PSNR in dB (data range 1) of mean squared errors, floored: at most 100 dB."""
    return 10.0 * torch.log10(DATA_RANGE**2 / err.clamp_min(PSNR_MSE_FLOOR))


def _gaussian_taps(device: torch.device) -> Tensor:
    # The same 11 taps as scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5).
    r = SSIM_WINDOW // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def ssim(sr: Tensor, hr: Tensor) -> Tensor:
    """SSIM per image (valid region, mean over channels): ``[N]``, float64."""
    return ssim_map(sr, hr).mean(dim=(1, 2, 3))


def ssim_map(sr: Tensor, hr: Tensor) -> Tensor:
    """SSIM at each pixel of the valid region: ``[N, C, H - 10, W - 10]``, float64."""
    sr, hr = pair(sr, hr)
    _, c, h, w = sr.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    # Filter the five moment maps in one separable, depthwise, unpadded ("valid") convolution.
    maps = torch.cat([sr, hr, sr * sr, hr * hr, sr * hr], dim=1)  # [N, 5C, H, W]
    taps = _gaussian_taps(sr.device)
    k = 5 * c
    maps = F.conv2d(maps, taps.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    maps = F.conv2d(maps, taps.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    ux, uy, uxx, uyy, uxy = maps.split(c, dim=1)  # each [N, C, H-10, W-10]
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s

"""Simulate DeepLense-like strong-lensing LR/HR image pairs with lenstronomy.

Usage::

    python -m toolkit.simulate OUT --count N [--seed S] [--workers W] [--overwrite]

writes ``OUT/hr/<key>.npy`` (150x150) and ``OUT/lr/<key>.npy`` (75x75), float32 in [0, 1],
keys ``000000`` ..., and ``OUT/meta/<key>.json``, the pair's degradation as drawn (angles in
arcsec)::

    {"hr_pixel": 0.03, "lr_pixel": 0.06, "psf": "gaussian", "hr_psf_fwhm": f,
     "lr_psf_fwhm": 2f, "noise_rms": rms, "sky": 0.03}

(``toolkit.shard`` stores it as the sample's ``.json`` member; the loader turns the PSF widths
into the batch's ``psf``, so evaluation can degrade a super-resolved image as this pair was.)
Each system is an SIE lens with external shear, an elliptical Sersic source and elliptical
Sersic lens light, all drawn at random per system from a Generator seeded with
``(seed, index)``, so the output is the same whatever the number of workers.

HR: 150x150 pixels of 0.03 arcsec, Gaussian PSF of FWHM f. LR: the same system rendered
again on 75x75 pixels of 0.06 arcsec with a PSF of FWHM 2f (the same instrument at half the
resolution: pixels and optics both twice as coarse), not a resize of the HR image. The two
pixel grids are centred alike, so LR pixel (i, j) covers HR pixels (2i..2i+1, 2j..2j+1),
which is what bicubic ``align_corners=False`` assumes. Both images are in surface-brightness
units and share one normalisation: ``sky + (1 - 2 sky) * image / s`` with ``s`` the 99.5th
percentile of the noiseless HR image (a robust max: the brightest arc knots and the lens
core saturate, about 0.5% of HR pixels, so the arcs rather than one cusp set the contrast)
and ``sky`` = 0.03, a pedestal that keeps the background noise from being clipped at zero.
Then each image gets its own Gaussian noise draw with the same rms, 0.004 to 0.008 per
system, and is clipped to [0, 1].

Calibration (lenstronomy 1.14.2): bicubic x2 of LR (torch ``interpolate``,
``align_corners=False``, clamped to [0, 1]) against HR, per image then mean; SSIM by skimage
with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``.
"Perfect" is the noiseless HR against HR: the ceiling the noise leaves a model.

    samples                               bicubic PSNR (per image)    SSIM    perfect PSNR / SSIM
    seed 0, keys 000000..000499 (500)     30.30 dB (24.6 .. 35.9)     0.9240  44.63 dB / 0.9682
    seed 0, 2400 keys, val split (223)    30.40 dB (24.9 .. 36.4)     0.9248  44.66 dB / 0.9682

The val split is ``python -m toolkit.shard OUT SHARDS --val-fraction 0.1`` (seed 0). HR
noise rms 0.0060 on average, 0.0080 at most; about 0.45% of HR pixels saturate. Speed: 18
ms a pair on one worker of an idle core (25 under load). For comparison, the workload's
models reached 30.4 to 33.7 dB and SSIM 0.952 to 0.968 on its data; a naive setting (faint
noise, normalised by the lens core) gave bicubic 56 dB, a task with nothing to learn.
The knobs, from the strongest: PSF width, source size and Sersic index, the percentile.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.atomic import save_npy, write_atomic

logger = logging.getLogger(__name__)

MISSING = "lenstronomy is not installed: pip install 'srmae-toolkit[lensing]'"

HR_SIZE, LR_SIZE = 150, 75
HR_PIXEL = 0.03  # arcsec
LR_PIXEL = 2 * HR_PIXEL  # LR pixels are twice as wide
# The LR grid is evaluated on the same 0.03" sub-pixels as the HR one, so the two images
# integrate the same light; twice these factors moved the bicubic PSNR by about 0.01 dB.
HR_SUPERSAMPLING, LR_SUPERSAMPLING = 1, 2

# Ranges drawn uniformly per system (angles in arcsec). Calibrated together (see the module
# docstring): wider PSFs (the LR one loses more), smaller and cuspier sources and a lower
# percentile make the task harder; the noise mostly sets the ceiling a perfect model reaches,
# kept low enough that this ceiling's SSIM (0.968) is not below the workload's best (0.968).
THETA_E = (0.8, 1.6)  # Einstein radius: rings of 27..53 HR pixels radius
LENS_Q = (0.6, 0.95)  # SIE axis ratio
LENS_OFFSET = 0.1  # lens centre within +-0.1" of the image centre
SHEAR = (0.0, 0.08)
SOURCE_R = (0.05, 0.2)  # Sersic half-light radius
SOURCE_N = (1.0, 3.0)
SOURCE_Q = (0.5, 1.0)
SOURCE_OFFSET = 0.35  # source centre within this radius of the lens centre: arcs and rings
LIGHT_R = (0.4, 1.2)  # lens light half-light radius
LIGHT_N = (1.5, 4.0)
LIGHT_TO_SOURCE = (0.1, 0.9)  # peak of the lens light over peak of the lensed source (HR)
PSF_FWHM = (0.1, 0.16)  # HR; the LR PSF is twice as wide
NOISE_RMS = (0.004, 0.008)  # per pixel, after normalisation, same for HR and LR
SCALE_PERCENTILE = 99.5
SKY = 0.03
# OUT/meta/<key>.json: what the pair was drawn with (`simulate_system`)
META_KEYS = ("hr_pixel", "lr_pixel", "psf", "hr_psf_fwhm", "lr_psf_fwhm", "noise_rms", "sky")


def require_lenstronomy() -> None:
    # Imports what _render needs too, so that forked workers inherit it instead of each
    # importing it again (seconds).
    try:
        import lenstronomy.ImSim.image_model  # noqa: F401
    except ImportError as exc:
        raise ImportError(MISSING) from exc


def _render(
    size: int,
    pixel: float,
    fwhm: float,
    supersampling: int,
    kwargs: dict,
    source: bool = True,
    lens_light: bool = True,
    lens_models: tuple[str, ...] = ("SIE", "SHEAR"),
) -> np.ndarray:
    """Noiseless PSF-convolved image in surface-brightness units (flux per arcsec^2)."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import util

    _, _, ra0, dec0, _, _, pix2angle, _ = util.make_grid_with_coordtransform(size, pixel)
    data = ImageData(
        image_data=np.zeros((size, size)),
        ra_at_xy_0=ra0,
        dec_at_xy_0=dec0,
        transform_pix2angle=pix2angle,
    )
    model = ImageModel(
        data,
        PSF(psf_type="GAUSSIAN", fwhm=fwhm, truncation=5),
        LensModel(list(lens_models)),
        LightModel(["SERSIC_ELLIPSE"]),
        LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": supersampling},
    )
    image = model.image(**kwargs, source_add=source, lens_light_add=lens_light)
    # lenstronomy returns flux per pixel; per arcsec^2 makes HR and LR directly comparable.
    return image / pixel**2


def _draw_system(rng: np.random.Generator) -> tuple[dict, float, float, float]:
    """Lens, source and lens-light kwargs (amplitudes 1), PSF FWHM, light ratio, noise rms."""
    from lenstronomy.Util.param_util import phi_q2_ellipticity, shear_polar2cartesian

    u = rng.uniform
    lx, ly = u(-LENS_OFFSET, LENS_OFFSET, size=2)
    phi, q = u(0, np.pi), u(*LENS_Q)
    e1, e2 = phi_q2_ellipticity(phi, q)
    g1, g2 = shear_polar2cartesian(u(0, np.pi), u(*SHEAR))
    lens = [
        {"theta_E": u(*THETA_E), "e1": e1, "e2": e2, "center_x": lx, "center_y": ly},
        {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0},
    ]
    r, angle = SOURCE_OFFSET * np.sqrt(u()), u(0, 2 * np.pi)  # uniform over the disc
    se1, se2 = phi_q2_ellipticity(u(0, np.pi), u(*SOURCE_Q))
    source = {"R_sersic": u(*SOURCE_R), "n_sersic": u(*SOURCE_N), "e1": se1, "e2": se2}
    source |= {"amp": 1.0, "center_x": lx + r * np.cos(angle), "center_y": ly + r * np.sin(angle)}
    # The lens galaxy's light roughly follows its mass: similar orientation, rounder.
    le1, le2 = phi_q2_ellipticity(phi + u(-0.2, 0.2), min(1.0, q + u(0, 0.15)))
    light = {"R_sersic": u(*LIGHT_R), "n_sersic": u(*LIGHT_N), "e1": le1, "e2": le2}
    light |= {"amp": 1.0, "center_x": lx, "center_y": ly}
    kwargs = {"kwargs_lens": lens, "kwargs_source": [source], "kwargs_lens_light": [light]}
    return kwargs, u(*PSF_FWHM), u(*LIGHT_TO_SOURCE), u(*NOISE_RMS)


def simulate_system(
    rng: np.random.Generator, noise: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One system as ``(lr, hr, meta)``: float32 arrays of 75x75 and 150x150 in [0, 1], and the
    pair's forward model as ``OUT/meta/<key>.json`` holds it (`META_KEYS`; angles in arcsec,
    ``noise_rms`` 0 for ``noise=False``).

    ``noise=False`` gives the noiseless pair of the same system for a Generator in the same
    state (the noise is drawn last).
    """
    require_lenstronomy()
    kwargs, fwhm, light_to_source, rms = _draw_system(rng)
    hr_args = (HR_SIZE, HR_PIXEL, fwhm, HR_SUPERSAMPLING, kwargs)
    hr_source = _render(*hr_args, lens_light=False)
    hr_light = _render(*hr_args, source=False)
    # Set the amplitudes by the peaks seen in HR, then render LR with the same physical ones.
    kwargs["kwargs_source"][0]["amp"] = 1.0 / hr_source.max()
    kwargs["kwargs_lens_light"][0]["amp"] = light_to_source / hr_light.max()
    hr = hr_source / hr_source.max() + light_to_source * hr_light / hr_light.max()
    lr = _render(LR_SIZE, LR_PIXEL, 2 * fwhm, LR_SUPERSAMPLING, kwargs)

    gain = (1 - 2 * SKY) / np.percentile(hr, SCALE_PERCENTILE)
    hr, lr = SKY + gain * hr, SKY + gain * lr
    if noise:  # independent draws: the two images are two observations
        hr = hr + rng.normal(0.0, rms, hr.shape)
        lr = lr + rng.normal(0.0, rms, lr.shape)
    meta = {
        "hr_pixel": HR_PIXEL,
        "lr_pixel": LR_PIXEL,
        "psf": "gaussian",
        "hr_psf_fwhm": float(fwhm),
        "lr_psf_fwhm": float(2 * fwhm),
        "noise_rms": float(rms) if noise else 0.0,
        "sky": SKY,
    }
    return np.clip(lr, 0, 1).astype(np.float32), np.clip(hr, 0, 1).astype(np.float32), meta


def simulate_pair(rng: np.random.Generator, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One system as ``(lr, hr)``: `simulate_system` without its metadata."""
    lr, hr, _ = simulate_system(rng, noise)
    return lr, hr


def write_range(out: Path, seed: int, start: int, stop: int) -> int:
    """Pairs start..stop-1 into out/hr, out/lr and out/meta (the `write.generate` worker)."""
    for index in range(start, stop):
        lr, hr, meta = simulate_system(np.random.default_rng([seed, index]))
        key = f"{index:06d}"
        save_npy(out / "hr" / f"{key}.npy", hr)
        save_npy(out / "lr" / f"{key}.npy", lr)
        write_atomic(out / "meta" / f"{key}.json", json.dumps(meta) + "\n")
    return stop - start

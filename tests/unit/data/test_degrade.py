"""The degradation and the bicubic baseline against implementations that are not ours: Keys'
cubic convolution written out here from its definition, and Pillow's resampler.

Conventions checked (README, "Metrics"): `degrade` is an antialiased bicubic reduction with
Keys' a = -0.5, the filter stretched by the scale factor and renormalised at the borders, as
Pillow and MATLAB's imresize reduce; `upscale_bicubic` (the table's bicubic row) is plain
bicubic interpolation with a = -0.75 on half-pixel centres, borders replicated, as torch and
OpenCV upscale.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.data.degrade import degrade, upscale_bicubic


def keys(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel (1981) with free parameter a."""
    x = np.abs(x)
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def upscale_matrix(n: int, s: int, a: float = -0.75) -> np.ndarray:
    """[n*s, n] weights of interpolation on half-pixel centres, edge samples replicated."""
    m = np.zeros((n * s, n))
    for o in range(n * s):
        src = (o + 0.5) / s - 0.5
        i0 = math.floor(src)
        for i in range(i0 - 1, i0 + 3):
            m[o, min(max(i, 0), n - 1)] += keys(np.array(src - i), a)
    return m


def reduce_matrix(n: int, s: int, a: float = -0.5) -> np.ndarray:
    """[n/s, n] weights of an antialiased reduction: the kernel stretched by s, truncated at the
    image's edges and renormalised to sum 1."""
    m = np.zeros((n // s, n))
    for o in range(n // s):
        centre = (o + 0.5) * s
        lo, hi = max(math.floor(centre - 2 * s + 0.5), 0), min(math.floor(centre + 2 * s + 0.5), n)
        j = np.arange(lo, hi)
        w = keys((j - centre + 0.5) / s, a)
        m[o, lo:hi] = w / w.sum()
    return m


def separable(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return rows @ img @ cols.T


@pytest.fixture
def image() -> np.ndarray:
    """Smooth structure plus noise, kept inside (0.2, 0.8) so that no clamp to [0, 1] acts."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:24, 0:36] / 12
    img = 0.5 + 0.15 * np.sin(3 * x + 1) * np.cos(2 * y) + 0.1 * rng.uniform(-1, 1, (24, 36))
    return img.astype(np.float32)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_upscale_is_keys_bicubic_with_a_minus_075(image: np.ndarray, scale: int) -> None:
    lr = image[:12, :18]
    ours = upscale_bicubic(torch.from_numpy(lr)[None], scale)[0].numpy()
    h, w = lr.shape
    ref = separable(lr.astype(np.float64), upscale_matrix(h, scale), upscale_matrix(w, scale))
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    # and not the other convention: a = -0.5 differs by far more than the tolerance
    other = separable(lr.astype(np.float64), upscale_matrix(h, scale, -0.5),
                      upscale_matrix(w, scale, -0.5))  # fmt: skip
    assert np.abs(other - ref).max() > 1e-3


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_degrade_is_antialiased_keys_bicubic_with_a_minus_05(image: np.ndarray, scale: int) -> None:
    hr = image[: 24 // scale * scale, : 36 // scale * scale]
    ours = degrade(torch.from_numpy(np.ascontiguousarray(hr))[None], scale)[0].numpy()
    h, w = hr.shape
    ref = separable(hr.astype(np.float64), reduce_matrix(h, scale), reduce_matrix(w, scale))
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    # Pillow's own resampler (C code, float mode) reduces the same way
    pil = Image.fromarray(np.ascontiguousarray(hr), mode="F").resize(
        (w // scale, h // scale), Image.Resampling.BICUBIC
    )
    np.testing.assert_allclose(ours, np.asarray(pil), atol=2e-6)


def test_the_clamp_to_the_unit_range_is_what_differs_at_the_extremes() -> None:
    """On an image that touches 0 and 1 the overshoot of the cubic kernel is clamped away."""
    step = np.zeros((8, 8), dtype=np.float32)
    step[:, 4:] = 1.0
    up = upscale_bicubic(torch.from_numpy(step)[None], 2)[0].numpy()
    ref = separable(step.astype(np.float64), upscale_matrix(8, 2), upscale_matrix(8, 2))
    assert ref.min() < -0.05 and ref.max() > 1.05  # ringing at the edge
    np.testing.assert_allclose(up, ref.clip(0, 1), atol=2e-6)

"""FITS images (astropy, the `fits` extra): one HDU's image as float32 [C, H, W] in its physical
units.

Which HDU: the one `hdu` names (an EXTNAME such as SCI, or an index), else the first HDU holding
an image (the primary one, or the first extension of an empty-primary file as HST and JWST
write them). A 2-D image is one channel; a 3-D cube (NAXIS3 planes) is its channels. BSCALE and
BZERO are applied (physical = BZERO + BSCALE x stored), and integer data are counts, taken as
they are: no division by the type's maximum as for photographs. Rows stay in the file's order
(FITS row 1, the bottom of the sky image, is row 0), so pixel (i, j) is FITS pixel (j+1, i+1)
for a WCS.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

FITS_EXTS = (".fits", ".fit", ".fts")


def _astropy() -> Any:
    try:
        from astropy.io import fits
    except ImportError:
        raise ValueError("reading FITS needs astropy: pip install 'srmae-toolkit[fits]'") from None
    return fits


def _pick(hdul: Any, hdu: str | None) -> Any:
    names = ", ".join(h.name or str(i) for i, h in enumerate(hdul))
    if hdu is None:
        for h in hdul:
            if h.is_image and h.header.get("NAXIS", 0) >= 2:
                return h
        raise ValueError(f"no HDU holds an image (it has: {names})")
    key: str | int = int(hdu) if hdu.isdigit() else hdu
    try:
        return hdul[key]
    except (KeyError, IndexError):
        raise ValueError(f"no HDU {hdu!r} (it has: {names})") from None


def _shape(h: Any) -> tuple[int, int, int]:
    naxis = int(h.header.get("NAXIS", 0))
    axes = [int(h.header[f"NAXIS{n}"]) for n in range(naxis, 0, -1)]  # numpy order
    if naxis == 2:
        return 1, axes[0], axes[1]
    if naxis == 3:
        return axes[0], axes[1], axes[2]
    raise ValueError(f"HDU {h.name or '?'} has {naxis} axes: expected an image (2) or a cube (3)")


def _open(data: bytes) -> Any:
    fits = _astropy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy warns on fixable header cards
            return fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
    except Exception as err:  # astropy raises OSError, ValueError, TypeError... on bad bytes
        raise ValueError(f"not a readable FITS: {' '.join(str(err).split())}") from err


def probe_fits(data: bytes, hdu: str | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of the chosen HDU, with its data read (a truncated file fails
    here, not in training)."""
    c, h, w = decode_fits(data, hdu).shape
    return c, h, w


def decode_fits(data: bytes, hdu: str | None = None) -> np.ndarray:
    with _open(data) as hdul:
        chosen = _pick(hdul, hdu)
        c, h, w = _shape(chosen)
        try:
            values = chosen.data  # scaled by BSCALE/BZERO
        except Exception as err:  # a truncated data unit
            raise ValueError(f"not a readable FITS: {' '.join(str(err).split())}") from err
        if values is None or values.size != c * h * w:
            raise ValueError(f"not a readable FITS: HDU {chosen.name} holds no complete image")
        return np.ascontiguousarray(values.reshape(c, h, w), dtype=np.float32)

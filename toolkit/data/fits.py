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
import re
import warnings
from dataclasses import dataclass
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


def _image(chosen: Any) -> np.ndarray:
    c, h, w = _shape(chosen)
    try:
        values = chosen.data  # scaled by BSCALE/BZERO
    except Exception as err:  # a truncated data unit
        raise ValueError(f"not a readable FITS: {' '.join(str(err).split())}") from err
    if values is None or values.size != c * h * w:
        raise ValueError(f"not a readable FITS: HDU {chosen.name} holds no complete image")
    return np.ascontiguousarray(values.reshape(c, h, w), dtype=np.float32)


def decode_fits(data: bytes, hdu: str | None = None) -> np.ndarray:
    with _open(data) as hdul:
        return _image(_pick(hdul, hdu))


@dataclass(frozen=True)
class FitsLike:
    """What a FITS output keeps of its input: the primary header, and the header of the image
    HDU read (None when that was the primary one), and whether the image was 2-D."""

    primary: Any  # astropy.io.fits.Header
    extension: Any | None
    planar: bool


def read_fits(data: bytes, hdu: str | None = None) -> tuple[np.ndarray, FitsLike]:
    """`decode_fits`, and the headers an output written like it keeps."""
    with _open(data) as hdul:
        chosen = _pick(hdul, hdu)
        values = _image(chosen)
        planar = int(chosen.header.get("NAXIS", 0)) == 2
        extension = None if chosen is hdul[0] else chosen.header.copy()
        return values, FitsLike(hdul[0].header.copy(), extension, planar)


# Cards that describe the stored values, not the image: stale once float32 data is written.
_STORAGE = ("BSCALE", "BZERO", "BLANK", "DATAMIN", "DATAMAX", "CHECKSUM", "DATASUM")
# Pixel-coordinate cards of the primary (suffix "") and alternate (A-Z) WCS descriptions.
_CRPIX = re.compile(r"^CRPIX([12])([A-Z]?)$")
_CDELT = re.compile(r"^CDELT([12])([A-Z]?)$")
_CD = re.compile(r"^CD([12])_([12])([A-Z]?)$")
_SIP = re.compile(r"^(A|B|AP|BP)_(\d)_(\d)$")


def _cdelt_in_use(key: str, has_cd: set[str]) -> bool:
    """A CDELT card of a WCS without CD cards (where CD is given, CDELT is ignored)."""
    m = _CDELT.match(key)
    return m is not None and m.group(2) not in has_cd


def scale_wcs(header: Any, scale: int) -> Any:
    """A copy of `header` for an image `scale` times finer on both image axes, so that every
    sky position keeps its place: the centre of input pixel p (0-based) lies at
    q = scale * (p + 0.5) - 0.5 of the output, so CRPIX' = scale * (CRPIX - 0.5) + 0.5 (FITS
    pixels are 1-based); CDELT or CD divided by the scale (PC is unitless, kept); SIP distortion
    coefficients of order p+q, in pixel units about CRPIX, multiplied by scale^(1-p-q). Axes
    past the second (a cube's planes) are left as they are."""
    out = header.copy()
    for key in _STORAGE:
        out.remove(key, ignore_missing=True, remove_all=True)
    has_cd = {m.group(3) for k in out if (m := _CD.match(k))}
    suffixes = {m.group(2) for k in out if (m := _CRPIX.match(k))}
    for key in list(out.keys()):
        if _CRPIX.match(key):
            out[key] = scale * (float(out[key]) - 0.5) + 0.5
        elif _CD.match(key) or _cdelt_in_use(key, has_cd):
            out[key] = float(out[key]) / scale
        elif m := _SIP.match(key):  # forward (A, B) and inverse (AP, BP) alike
            out[key] = float(out[key]) * scale ** (1 - int(m.group(2)) - int(m.group(3)))
    # A WCS with neither CD nor CDELT has unit pixels (CDELT = 1): they shrink too.
    for suffix in suffixes - has_cd:
        for axis in ("1", "2"):
            if f"CDELT{axis}{suffix}" not in out:
                out[f"CDELT{axis}{suffix}"] = 1.0 / scale
    out.add_history(f"srmae-toolkit predict: super-resolved x{scale}, WCS scaled to match")
    return out


def encode_fits(values: np.ndarray, like: FitsLike, scale: int) -> bytes:
    """[C, H, W] float32 as a FITS file like the input: its primary header, and its image HDU
    (the primary one, or the extension read, with EXTNAME) holding `values` with the WCS scaled
    by `scale`; other extensions (error, mask planes of the input's size) are not written."""
    fits = _astropy()
    data = np.ascontiguousarray(values[0] if like.planar else values, dtype=np.float32)
    if like.extension is None:
        hdus = [fits.PrimaryHDU(data=data, header=scale_wcs(like.primary, scale))]
    else:
        primary = like.primary.copy()
        primary.remove("EXTEND", ignore_missing=True)
        hdus = [fits.PrimaryHDU(header=primary),
                fits.ImageHDU(data=data, header=scale_wcs(like.extension, scale))]  # fmt: skip
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns on fixable header cards
        fits.HDUList(hdus).writeto(buf, output_verify="silentfix")
    return buf.getvalue()

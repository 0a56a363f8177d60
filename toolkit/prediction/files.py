"""One image file as `predict` reads and writes it: its values as training decodes them
(float32 [C, H, W], `sources.decode`), and what an output in the same format and units needs.

An output is written as its input was: a .npy in the input's dtype and axis order (integers
scaled back by their type's maximum, rounded and saturated), a PNG or TIFF in its bit depth
(8 or 16 bit, or float TIFF), a FITS with the input's headers and its WCS scaled
(`fits.encode_fits`). JPEG inputs give PNG outputs: a second lossy encoding would blur what
the model restored.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from toolkit.data.fits import FITS_EXTS, FitsLike, encode_fits, read_fits
from toolkit.data.sources import (
    ARRAY_EXTS,
    IMAGE_EXTS,
    array_layout,
    image_values,
    integer_scale,
    load_npy,
    npy_values,
    open_image,
)

_JPEG = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Like:
    """How to write an output like its input."""

    ext: str  # the output's extension, with its dot
    dtype: str  # of the values stored: a numpy dtype name ("float32" for FITS)
    layout: str = "chw"  # .npy axis order: "hw", "hwc" or "chw"
    fits: FitsLike | None = None


def output_ext(ext: str) -> str:
    """The extension of the output of an input with extension `ext` (".JPG" -> ".png")."""
    return ".png" if ext.lower() in _JPEG else ext


def read(data: bytes, ext: str, hdu: str | None = None) -> tuple[np.ndarray, Like]:
    """(values [C, H, W] float32, how to write an output like it); ValueError if unreadable."""
    e = ext.lower()
    if e in FITS_EXTS:
        values, like = read_fits(data, hdu)
        return values, Like(ext, "float32", fits=like)
    if e in ARRAY_EXTS:
        a = load_npy(data)
        return npy_values(a), Like(ext, a.dtype.name, array_layout(a.shape)[0])
    if e in IMAGE_EXTS:
        with open_image(data) as img:
            mode = img.mode
            values = image_values(img)
        dtype = "float32" if mode == "F" else "uint16" if mode.startswith("I") else "uint8"
        return values, Like(output_ext(ext), dtype)
    raise ValueError(f"unknown extension {ext!r}")


def _stored(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float values back into `dtype`: integers times what reading divided them by
    (`sources.integer_scale`), rounded and saturated."""
    if dtype.kind == "f":
        return values.astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    info = np.iinfo(dtype)
    scaled = np.rint(np.nan_to_num(values) * np.float64(integer_scale(dtype)))
    return np.clip(scaled, info.min, info.max).astype(dtype)


def encode(values: np.ndarray, like: Like, scale: int) -> bytes:
    """[C, H, W] float32 values as the bytes of a file like the input (`scale`: the SR factor,
    for a FITS WCS)."""
    if like.fits is not None:
        return encode_fits(values, like.fits, scale)
    a = _stored(values, np.dtype(like.dtype))
    buf = io.BytesIO()
    if like.ext.lower() in ARRAY_EXTS:
        a = a[0] if like.layout == "hw" else a.transpose(1, 2, 0) if like.layout == "hwc" else a
        np.save(buf, np.ascontiguousarray(a))
    else:
        image = Image.fromarray(np.ascontiguousarray(a[0] if len(a) == 1 else a.transpose(1, 2, 0)))
        image.save(buf, format="TIFF" if like.ext.lower() in (".tif", ".tiff") else "PNG")
    return buf.getvalue()

"""Source data on disk: list folders of images/.npy (HR only, or paired hr/ lr/, with optional
meta/ JSON per pair); probe, decode."""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.core.errors import UserError
from toolkit.data.fits import FITS_EXTS, decode_fits, probe_fits

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ARRAY_EXTS = (".npy",)
EXTS = IMAGE_EXTS + ARRAY_EXTS + FITS_EXTS
META = "meta"  # a paired source's folder of per-sample metadata: meta/<key>.json
META_EXTS = (".json",)

# PIL modes that decode to one channel; every other mode is converted to RGB.
_GREY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = b"\xff\xda"
_PNG_IEND = b"IEND\xaeB`\x82"  # the end chunk's type and (constant) CRC


@dataclass(frozen=True)
class Item:
    """One sample: its shard key and the file(s) it is made of."""

    key: str
    hr: Path
    lr: Path | None
    meta: Path | None = None  # paired: meta/<key>.json, where the source has one

    @property
    def files(self) -> int:
        return 1 + (self.lr is not None) + (self.meta is not None)


@dataclass(frozen=True)
class Source:
    """A listed source folder: "paired" (hr/ + lr/, meta/ optional) or "hr" (HR only), items
    sorted by key."""

    kind: str
    root: Path
    items: list[Item]


# ---------------------------------------------------------------- decode


def _ext(ext: str) -> str:
    return ext.lower().lstrip(".")


def array_layout(shape: tuple[int, ...]) -> tuple[str, int, int, int]:
    """(layout, channels, height, width) of an array shape, by the rules decode applies: the
    channel axis (the bands of a multi-band stack, all kept) is the first or the last one, the
    one shorter than both image sides; failing that (a tiny image), the one of 1, 3 or 4."""
    if len(shape) == 2:
        return "hw", 1, shape[0], shape[1]
    if len(shape) != 3:
        raise ValueError(f"array of shape {shape}: expected (H, W), (H, W, C) or (C, H, W)")
    if shape[2] < min(shape[:2]) or (shape[0] >= min(shape[1:]) and shape[2] in (1, 3, 4)):
        return "hwc", shape[2], shape[0], shape[1]
    if shape[0] < min(shape[1:]) or shape[0] in (1, 3, 4):
        return "chw", shape[0], shape[1], shape[2]
    raise ValueError(
        f"array of shape {shape}: expected the channels first or last, fewer than the image's "
        "height and width"
    )


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise ValueError(f"array of dtype {dtype}: expected bool, integer or float")


def integer_scale(dtype: np.dtype) -> float:
    """What an integer array's values are divided by: an image depth's maximum for 8- and 16-bit
    integers (uint8 by 255, uint16 by 65535, int16 by 32767), and nothing (1) for wider ones,
    which hold counts (a detector's electrons, a catalogue's fluxes), not a depth: no camera
    has 31 bits, and dividing by 2**31 would put counts of a few thousand near 1e-6."""
    return float(np.iinfo(dtype).max) if dtype.itemsize <= 2 else 1.0


def _to_float(a: np.ndarray) -> np.ndarray:
    """float32 values: floats as they are (negative, above 1, NaN: nothing is clipped); 8- and
    16-bit integers divided by their type's maximum (signed values keep their sign), wider ones
    as they are (`integer_scale`); booleans 0 or 1."""
    _check_dtype(a.dtype)
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    if a.dtype.kind == "b":
        return a.astype(np.float32)
    return a.astype(np.float32) / np.float32(integer_scale(a.dtype))


def load_npy(data: bytes) -> np.ndarray:
    """A .npy file's array as stored (no pickles); ValueError if it is not an image array."""
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # numpy raises ValueError, EOFError, OSError... on bad bytes
        raise ValueError(f"not a readable .npy: {_one_line(err)}") from err
    if not isinstance(a, np.ndarray):
        raise ValueError("not a single array")
    _check_dtype(a.dtype)
    array_layout(a.shape)
    return a


def npy_values(a: np.ndarray) -> np.ndarray:
    """A loaded array as float32 [C, H, W] (see `array_layout` and `_to_float`)."""
    layout, _, _, _ = array_layout(a.shape)
    if layout == "hw":
        a = a[None]
    elif layout == "hwc":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(_to_float(a))


def open_image(data: bytes) -> Image.Image:
    """A photograph (PNG, JPEG, TIFF), loaded; ValueError if it cannot be."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error... on bad bytes
        raise ValueError(f"not a readable image: {_one_line(err)}") from err


def image_values(img: Image.Image) -> np.ndarray:
    """A loaded photograph as float32 [C, H, W]: 8-bit / 255, 16-bit / 65535, float as is."""
    mode = img.mode
    if mode in ("LA", "La", "1"):
        img, mode = img.convert("L"), "L"
    elif mode not in _GREY_MODES and mode != "RGB":
        img, mode = img.convert("RGB"), "RGB"  # RGBA, P, CMYK, YCbCr...: alpha dropped
    a = np.asarray(img)
    if mode == "F":
        a = a.astype(np.float32)  # a float TIFF: values as they are
    elif mode.startswith("I"):
        # 16-bit sources (PNG/TIFF) open as I;16* or as I: both are scaled by the 16-bit max.
        a = a.astype(np.float32) / 65535.0
    else:
        a = a.astype(np.float32) / 255.0
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))


def decode(data: bytes, ext: str, hdu: str | None = None) -> np.ndarray:
    """A file's bytes as float32 [C, H, W]; ValueError if undecodable. Photographs (8/16 bit) come
    out in [0, 1] with 1 or 3 channels (alpha dropped); arrays keep every channel and, if float,
    every value (see `_to_float`); FITS: the image of HDU `hdu` in its physical units
    (`toolkit/data/fits.py`)."""
    e = _ext(ext)
    if f".{e}" in FITS_EXTS:
        return decode_fits(data, hdu)
    if f".{e}" in ARRAY_EXTS:
        return npy_values(load_npy(data))
    if f".{e}" in IMAGE_EXTS:
        with open_image(data) as img:
            return image_values(img)
    raise ValueError(f"unknown extension {ext!r}: expected one of {', '.join(EXTS)}")


# ---------------------------------------------------------------- probe


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, ValueError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], int, np.dtype]:
    """(shape, data bytes, dtype) of a whole .npy header; cached, as a data set repeats a few
    headers."""
    f = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as err:  # numpy raises ValueError, EOFError... on a bad header
        raise ValueError(f"not a readable .npy: {_one_line(err)}") from err
    _check_dtype(dtype)
    array_layout(tuple(shape))
    return tuple(shape), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, dtype


def _npy_end(data: bytes) -> int:
    """Where a .npy's data starts: its header length sits after the magic and version, in 2
    bytes in format 1.0, in 4 after."""
    if len(data) < 10 or not data.startswith(_NPY_MAGIC):
        raise ValueError("not a readable .npy: no .npy magic string")
    size_bytes = 2 if data[6] == 1 else 4
    return 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")


def npy_range(data: bytes) -> tuple[float, float]:
    """The lowest and highest of a .npy's values as `decode` gives them (float32, integers
    scaled), read from a view of the bytes without decoding; NaN or inf when it holds any."""
    end = _npy_end(data)
    _, nbytes, dtype = _npy_header(data[:end])
    view = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=end)
    if view.size == 0:
        return math.nan, math.nan
    # The ufuncs' own reductions: ndarray.min/max wrap them in ~5 us of Python, a third of the
    # time on a 150 x 150 float32 image. NaN if any value is (numpy propagates it).
    lo, hi = np.float32(np.minimum.reduce(view)), np.float32(np.maximum.reduce(view))
    if dtype.kind in "iu":
        top = np.float32(integer_scale(dtype))
        lo, hi = lo / top, hi / top
    return float(lo), float(hi)


def _probe_npy(data: bytes) -> tuple[int, int, int]:
    end = _npy_end(data)
    shape, expected, _ = _npy_header(data[:end])
    got = len(data) - end
    if got != expected:
        raise ValueError(f"truncated or padded .npy: {got} data bytes, {expected} expected {shape}")
    _, c, h, w = array_layout(shape)
    return c, h, w


def _check_jpeg_end(data: bytes) -> None:
    # verify() does not decode JPEG data, so look for the end-of-image marker after the last
    # scan header: entropy-coded data never holds 0xFFD9 (0xFF bytes are stuffed), and an EXIF
    # thumbnail's marker lies before the main image's scans. Trailing bytes after it are allowed.
    sos = data.rfind(_JPEG_SOS)
    if sos < 0 or data.find(_JPEG_EOI, sos) < 0:
        raise ValueError("truncated JPEG: no end-of-image marker")


def _check_tiff_extent(img: Image.Image, size: int) -> None:
    # verify() does not read TIFF strips: check that every strip/tile lies inside the file.
    tags = img.tag_v2
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets is None or counts is None:
            continue
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        end = max((o + n for o, n in zip(offsets, counts, strict=False)), default=0)
        if end > size:
            raise ValueError(f"truncated TIFF: image data ends at byte {end}, file has {size}")


def _probe_image(data: bytes) -> tuple[int, int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (w, h) = img.format, img.mode, img.size
            if fmt == "TIFF":
                _check_tiff_extent(img, len(data))
            img.verify()
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error... on bad bytes
        raise ValueError(f"not a readable image: {_one_line(err)}") from err
    if fmt == "JPEG":
        _check_jpeg_end(data)
    # verify() stops at the IEND chunk's type and does not need its CRC: ask for the whole chunk.
    if fmt == "PNG" and data.rfind(_PNG_IEND) < 0:
        raise ValueError("truncated PNG: no complete end chunk")
    return (1 if mode in _GREY_MODES else 3), h, w


def probe(data: bytes, ext: str, hdu: str | None = None) -> tuple[int, int, int]:
    """(channels, height, width) as decode would give (without decoding, but for FITS);
    ValueError if corrupt."""
    e = _ext(ext)
    if f".{e}" in FITS_EXTS:
        return probe_fits(data, hdu)
    if f".{e}" in ARRAY_EXTS:
        return _probe_npy(data)
    if f".{e}" in IMAGE_EXTS:
        return _probe_image(data)
    raise ValueError(f"unknown extension {ext!r}: expected one of {', '.join(EXTS)}")


# ---------------------------------------------------------------- listing


def _unlistable(err: OSError) -> None:
    raise UserError(f"{err.filename}: cannot list this folder: {err.strerror or err}")


def walk_files(root: Path, exts: tuple[str, ...] = EXTS) -> Iterator[tuple[str, Path]]:
    """(posix path relative to root, file) for the usable files under root (those of `exts`:
    images and arrays by default), recursively.

    Hidden files and folders are left out. Linked folders are followed (data sets are often
    put together from links), each real folder once, so that a link loop ends. Strings, not
    Path methods, for the relative part: listing is otherwise a visible share of sharding time.
    """
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unlistable, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                yield prefix + name, Path(dirpath, name)


def key_of(rel: str) -> str:
    """The shard key of a posix path relative to its root: no extension, no dots.

    webdataset splits a member name at the first dot of its basename, so dots would cut keys.
    """
    return os.path.splitext(rel)[0].replace(".", "_")


def _keyed(root: Path, label: str, exts: tuple[str, ...] = EXTS) -> dict[str, Path]:
    """key -> file for the usable files (of `exts`) under root; two files with one key are an
    error."""
    out: dict[str, Path] = {}
    rels: dict[str, str] = {}
    for rel, path in walk_files(root, exts):
        key = key_of(rel)
        if key in out:
            raise UserError(
                f"{label}{rels[key]} and {label}{rel} map to the same sample key {key!r}: "
                "rename one (keys drop the extension and turn dots into '_')"
            )
        out[key], rels[key] = path, rel
    return out


def _missing(keys: list[str], files: dict[str, Path], other: str) -> UserError:
    more = f" (and {len(keys) - 1} more without one)" if len(keys) > 1 else ""
    return UserError(f"{files[keys[0]]} has no {other} partner {other}/{keys[0]}.*{more}")


def list_source(src: Path, out: Path | None = None) -> Source:
    """List SRC: a folder of images/arrays ("hr") or one with hr/ and lr/ paired by name (and
    nothing else but meta/, each pair's metadata as meta/<key>.json where it has any, and `out`,
    the shards' folder, if it lies there)."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: source folder not found")
    if not src.is_dir():
        raise UserError(f"{src}: expected a folder of images/.npy files, got a file")
    exts = ", ".join(EXTS)
    if not (src / "lr").is_dir():
        files = _keyed(src, "")
        if not files:
            raise UserError(f"{src}: no usable files ({exts}) found, nested folders included")
        items = [Item(k, files[k], None) for k in sorted(files)]
        return Source("hr", src, items)
    # Images or folders beside hr/ and lr/ would be left out without a word (notes are not).
    others = sorted(
        p.name for p in src.iterdir()
        if p.name not in ("hr", "lr", META) and not p.name.startswith(".")
        and (out is None or (p.resolve() != out and p.resolve() not in out.parents))
        and (p.is_dir() or p.suffix.lower() in EXTS)
    )  # fmt: skip
    if others:  # they would be left out without a word
        raise UserError(f"{src}: holds hr/ and lr/ (pairs) and also {', '.join(others[:3])}: "
                        "give the pairs a folder of their own (beside them only meta/, of "
                        "<key>.json per pair)")  # fmt: skip
    hr = _keyed(src / "hr", "hr/") if (src / "hr").is_dir() else {}
    lr = _keyed(src / "lr", "lr/")
    if not hr and not lr:
        raise UserError(f"{src}: hr/ and lr/ hold no usable files ({exts})")
    orphans = sorted(lr.keys() - hr.keys())
    if orphans:
        raise _missing(orphans, lr, "hr")
    lonely = sorted(hr.keys() - lr.keys())
    if lonely:
        raise _missing(lonely, hr, "lr")
    meta = _keyed(src / META, f"{META}/", META_EXTS) if (src / META).is_dir() else {}
    strays = sorted(meta.keys() - hr.keys())
    if strays:
        more = f" (and {len(strays) - 1} more without one)" if len(strays) > 1 else ""
        k = strays[0]
        raise UserError(f"{meta[k]} describes no pair: no hr/{k}.* and lr/{k}.*{more}")
    return Source("paired", src, [Item(k, hr[k], lr[k], meta.get(k)) for k in sorted(hr)])

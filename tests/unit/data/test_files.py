"""An output is written like its input: a .npy in its dtype and axis order, a PNG/TIFF in its
bit depth, JPEG as PNG; read back, the values are the ones written."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from toolkit.data.sources import decode
from toolkit.prediction.files import encode, read

RNG = np.random.default_rng(5)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def pil(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "array",
    [
        RNG.standard_normal((12, 10)).astype(np.float64) * 50,  # (H, W) float64, negatives
        (RNG.standard_normal((12, 10, 5)) * 3).astype(np.float32),  # (H, W, C): 5 bands
        RNG.integers(0, 65535, (3, 12, 10)).astype(np.uint16),  # (C, H, W) 16 bit
        RNG.integers(-32768, 32767, (12, 10)).astype(np.int16),  # signed counts
        RNG.integers(0, 2**20, (12, 10)).astype(np.int32),  # detector counts
    ],
    ids=["hw-float64", "hwc-float32", "chw-uint16", "hw-int16", "hw-int32"],
)
def test_an_npy_comes_back_in_its_dtype_and_axis_order(array: np.ndarray) -> None:
    values, like = read(npy(array), ".npy")
    back = np.load(io.BytesIO(encode(values, like, 1)))
    assert back.dtype == array.dtype and back.shape == array.shape
    if array.dtype.kind == "f":
        np.testing.assert_array_equal(back, array.astype(np.float32).astype(array.dtype))
    else:
        np.testing.assert_array_equal(back, array)  # scaled by the maximum and back, exactly


def test_integer_outputs_saturate_instead_of_wrapping() -> None:
    _, like = read(npy(np.zeros((4, 4), np.uint8)), ".npy")
    out = np.load(io.BytesIO(encode(np.array([[[-0.2, 0.5, 1.3, np.nan]]], np.float32), like, 1)))
    np.testing.assert_array_equal(out, [[0, 128, 255, 0]])


@pytest.mark.parametrize(
    ("array", "fmt", "ext", "out_ext", "dtype"),
    [
        (RNG.integers(0, 255, (9, 11), dtype=np.uint8), "PNG", ".png", ".png", "uint8"),
        (RNG.integers(0, 255, (9, 11, 3), dtype=np.uint8), "PNG", ".png", ".png", "uint8"),
        (RNG.integers(0, 65535, (9, 11)).astype(np.uint16), "PNG", ".png", ".png", "uint16"),
        (RNG.integers(0, 65535, (9, 11)).astype(np.uint16), "TIFF", ".tif", ".tif", "uint16"),
        (RNG.standard_normal((9, 11)).astype(np.float32), "TIFF", ".tiff", ".tiff", "float32"),
        (RNG.integers(0, 255, (9, 11, 3), dtype=np.uint8), "JPEG", ".jpg", ".png", "uint8"),
    ],
    ids=["png8-grey", "png8-rgb", "png16", "tiff16", "tiff-float", "jpeg-as-png"],
)
def test_an_image_comes_back_in_its_bit_depth(
    array: np.ndarray, fmt: str, ext: str, out_ext: str, dtype: str
) -> None:
    values, like = read(pil(array, fmt), ext)
    assert (like.ext, like.dtype) == (out_ext, dtype)
    data = encode(values, like, 1)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == ("TIFF" if out_ext.startswith(".tif") else "PNG")
        stored = np.asarray(img)
    assert stored.dtype == np.dtype(dtype) or (dtype == "uint16" and stored.dtype.kind in "iu")
    np.testing.assert_array_equal(decode(data, out_ext), values)  # the same values read back

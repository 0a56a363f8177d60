"""Tests for toolkit.data.sources: decode and probe of each format, listing of source folders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolkit.core.errors import UserError
from toolkit.data.sources import decode, list_source, npy_range, probe

RNG = np.random.default_rng(0)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- decode: images


def test_decode_uint8_grey_png_maps_255_to_one() -> None:
    a = np.zeros((4, 5), np.uint8)
    a[1, 2] = 255
    a[3, 4] = 51
    out = decode(encode(Image.fromarray(a), "PNG"), "png")
    assert out.shape == (1, 4, 5) and out.dtype == np.float32
    assert out[0, 1, 2] == 1.0
    assert out[0, 3, 4] == pytest.approx(0.2)
    assert out[0, 0, 0] == 0.0


def test_decode_16bit_png_divides_by_65535() -> None:
    a = np.array([[0, 65535], [32768, 1000]], np.uint16)
    data = encode(Image.fromarray(a), "PNG")
    out = decode(data, "png")
    assert out.shape == (1, 2, 2)
    np.testing.assert_allclose(out[0], a / 65535.0, rtol=1e-6)
    assert probe(data, "png") == (1, 2, 2)


def test_decode_rgb_png_is_chw() -> None:
    a = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    out = decode(encode(Image.fromarray(a), "PNG"), "PNG")
    assert out.shape == (3, 6, 7)
    np.testing.assert_allclose(out, a.transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_decode_rgba_png_drops_alpha() -> None:
    a = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    a[..., 3] = 0  # fully transparent: colour must still come through, alpha must not
    data = encode(Image.fromarray(a, "RGBA"), "PNG")
    out = decode(data, "png")
    assert out.shape == (3, 6, 7)
    np.testing.assert_allclose(out, a[..., :3].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert probe(data, "png") == (3, 6, 7)


def test_decode_palette_and_la_png() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    p = decode(encode(Image.fromarray(rgb).convert("P"), "PNG"), "png")
    assert p.shape == (3, 4, 4)
    np.testing.assert_allclose(p[:, 0, 0], [1.0, 0.0, 0.0])
    la = Image.fromarray(np.full((4, 4), 128, np.uint8)).convert("LA")
    out = decode(encode(la, "PNG"), "png")
    assert out.shape == (1, 4, 4)
    assert out[0, 0, 0] == pytest.approx(128 / 255)


def test_decode_float_tiff_taken_as_is() -> None:
    a = np.array([[0.25, 0.5], [-1.0, 3.0]], np.float32)
    data = encode(Image.fromarray(a, "F"), "TIFF")
    out = decode(data, "tif")
    np.testing.assert_array_equal(out[0], a)  # negatives and values above 1 kept
    assert probe(data, "tiff") == (1, 2, 2)


def test_decode_16bit_tiff_and_rgb_jpeg() -> None:
    a = np.array([[65535, 0]], np.uint16)
    np.testing.assert_allclose(decode(encode(Image.fromarray(a), "TIFF"), "tiff")[0], [[1.0, 0]])
    flat = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    out = decode(encode(Image.fromarray(flat), "JPEG", quality=95), "jpg")
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out[:, 8, 8], np.array([200, 100, 50]) / 255.0, atol=3 / 255)


# ---------------------------------------------------------------- decode: arrays


def test_decode_npy_2d_float_is_one_channel() -> None:
    a = RNG.random((5, 6)).astype(np.float32)
    out = decode(npy(a), "npy")
    assert out.shape == (1, 5, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], a)


def test_decode_npy_hwc_and_chw_agree() -> None:
    chw = RNG.random((3, 5, 6))
    out_chw = decode(npy(chw), "npy")
    out_hwc = decode(npy(chw.transpose(1, 2, 0)), "npy")
    assert out_chw.shape == out_hwc.shape == (3, 5, 6)
    np.testing.assert_allclose(out_chw, chw.astype(np.float32))
    np.testing.assert_array_equal(out_chw, out_hwc)


@pytest.mark.parametrize("bands", [2, 4, 5, 12])
def test_decode_npy_keeps_every_band_bit_for_bit(bands: int) -> None:
    """A multi-band stack (g, r, i, z, y ...) of floats with negative values after sky
    subtraction comes out whole, channels first or last."""
    a = (RNG.standard_normal((bands, 20, 24)) * 50).astype(np.float32)
    for stored in (a, a.transpose(1, 2, 0)):
        out = decode(npy(stored), "npy")
        assert out.shape == (bands, 20, 24) and out.dtype == np.float32
        np.testing.assert_array_equal(out, a)
    assert probe(npy(a), "npy") == (bands, 20, 24)


def test_decode_npy_keeps_nan_and_inf_for_the_shard_policy() -> None:
    a = np.array([[np.nan, 1.0], [np.inf, -np.inf]], np.float32)
    np.testing.assert_array_equal(decode(npy(a), "npy")[0], a)


def test_decode_npy_dtypes() -> None:
    np.testing.assert_allclose(decode(npy(np.array([[0, 255]], np.uint8)), "npy")[0], [[0, 1]])
    np.testing.assert_allclose(
        decode(npy(np.array([[0, 65535, 257]], np.uint16)), "npy")[0], [[0, 1, 257 / 65535]]
    )
    signed = decode(npy(np.array([[-5, 127]], np.int8)), "npy")[0]
    np.testing.assert_allclose(signed, [[-5 / 127, 1]])  # signed: by the max, sign kept
    np.testing.assert_allclose(decode(npy(np.array([[-32767, 0]], np.int16)), "npy")[0], [[-1, 0]])
    for wide in (np.int32, np.uint32, np.int64):  # counts, not an image depth: as they are
        counts = decode(npy(np.array([[1, 3989, 82]], wide)), "npy")[0]
        np.testing.assert_array_equal(counts, [[1, 3989, 82]])
    np.testing.assert_array_equal(decode(npy(np.array([[True, False]])), "npy")[0], [[1, 0]])
    floats = np.array([[-0.5, 2.0, 0.3]], np.float64)
    np.testing.assert_array_equal(decode(npy(floats), "npy")[0], floats.astype(np.float32))


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((6, 5, 6)), "channels first or last"),
        (np.zeros((7, 7, 7)), "channels first or last"),
        (np.zeros((5,)), "expected"),
        (np.zeros((2, 2), np.complex64), "dtype"),
        (np.array([["a", "b"]]), "dtype"),
    ],
)
def test_decode_npy_rejects_unusable_arrays(array: np.ndarray, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode(npy(array), "npy")
    with pytest.raises(ValueError, match=reason):
        probe(npy(array), "npy")


def test_decode_rejects_garbage_and_unknown_extension() -> None:
    with pytest.raises(ValueError, match="not a readable"):
        decode(b"hello", "png")
    with pytest.raises(ValueError, match="not a readable"):
        decode(b"hello", "npy")
    with pytest.raises(ValueError, match="unknown extension"):
        decode(b"hello", "gif")


# ---------------------------------------------------------------- probe


def test_probe_matches_decode_shape() -> None:
    cases = [
        (npy(RNG.random((7, 9)).astype(np.float32)), "npy"),
        (npy(RNG.random((7, 9, 4))), "npy"),
        (encode(Image.fromarray(np.zeros((7, 9), np.uint8)), "JPEG"), "jpeg"),
        (encode(Image.fromarray(np.zeros((7, 9, 3), np.uint8)), "TIFF"), "tif"),
        (encode(Image.fromarray(np.zeros((7, 9, 4), np.uint8)), "PNG"), "png"),
    ]
    for data, ext in cases:
        assert probe(data, ext) == decode(data, ext).shape


def test_probe_catches_truncated_png() -> None:
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)), "PNG")
    assert probe(data, "png") == (1, 64, 64)
    with pytest.raises(ValueError):
        probe(data[: len(data) // 2], "png")
    with pytest.raises(ValueError):
        probe(data[:-4], "png")  # only the IEND CRC missing


def test_probe_catches_truncated_jpeg() -> None:
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    assert probe(data, "jpg") == (3, 64, 64)
    assert probe(data + b"trailing bytes", "jpg") == (3, 64, 64)
    with pytest.raises(ValueError, match="truncated JPEG"):
        probe(data[: len(data) // 2], "jpg")
    with pytest.raises(ValueError, match="truncated JPEG"):
        probe(data[:-2], "jpg")


def test_probe_catches_truncated_tiff() -> None:
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)), "TIFF")
    assert probe(data, "tif") == (1, 64, 64)
    with pytest.raises(ValueError):
        probe(data[: len(data) - 100], "tif")


def test_probe_catches_truncated_and_padded_npy() -> None:
    data = npy(RNG.random((10, 10)).astype(np.float32))
    assert probe(data, "npy") == (1, 10, 10)
    with pytest.raises(ValueError, match="truncated"):
        probe(data[:-1], "npy")
    with pytest.raises(ValueError, match="truncated"):
        probe(data + b"\0", "npy")
    with pytest.raises(ValueError):
        probe(data[:20], "npy")  # inside the header
    with pytest.raises(ValueError):
        probe(b"", "npy")


# ---------------------------------------------------------------- listing


def test_list_hr_folder_walks_nested_sorted_and_ignores_others(tmp_path: Path) -> None:
    touch(tmp_path / "b" / "deep" / "x.npy")
    touch(tmp_path / "a.PNG")
    touch(tmp_path / "c" / "y.tif")
    touch(tmp_path / ".hidden.png")
    touch(tmp_path / ".git" / "z.png")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "d" / "img.v2.jpeg")
    src = list_source(tmp_path)
    assert src.kind == "hr"
    assert [i.key for i in src.items] == ["a", "b/deep/x", "c/y", "d/img_v2"]
    assert src.items[1].hr == tmp_path / "b" / "deep" / "x.npy"
    assert all(i.lr is None for i in src.items)


def test_list_keys_replace_dots_in_folders(tmp_path: Path) -> None:
    touch(tmp_path / "run.1" / "a.npy")
    assert [i.key for i in list_source(tmp_path).items] == ["run_1/a"]


def test_list_paired_with_different_extensions(tmp_path: Path) -> None:
    for name in ("s1", "sub/s2"):
        touch(tmp_path / "hr" / f"{name}.png")
        touch(tmp_path / "lr" / f"{name}.npy")
    src = list_source(tmp_path)
    assert src.kind == "paired"
    assert [i.key for i in src.items] == ["s1", "sub/s2"]
    assert src.items[1].hr == tmp_path / "hr" / "sub" / "s2.png"
    assert src.items[1].lr == tmp_path / "lr" / "sub" / "s2.npy"


def test_list_key_collision_names_both_files(tmp_path: Path) -> None:
    touch(tmp_path / "x.png")
    touch(tmp_path / "x.npy")
    with pytest.raises(UserError, match=r"x\.npy and x\.png") as err:
        list_source(tmp_path)
    assert "\n" not in str(err.value)
    touch(tmp_path / "y" / "a.b.npy")
    touch(tmp_path / "y" / "a_b.npy")
    (tmp_path / "x.npy").unlink()
    with pytest.raises(UserError, match="same sample key 'y/a_b'"):
        list_source(tmp_path)


def test_list_lr_without_hr_names_the_file(tmp_path: Path) -> None:
    touch(tmp_path / "hr" / "a.npy")
    touch(tmp_path / "lr" / "a.npy")
    touch(tmp_path / "lr" / "b.npy")
    with pytest.raises(UserError, match=r"lr/b\.npy has no hr partner"):
        list_source(tmp_path)


def test_list_hr_without_lr_names_the_file(tmp_path: Path) -> None:
    touch(tmp_path / "hr" / "a.npy")
    touch(tmp_path / "hr" / "b.npy")
    touch(tmp_path / "hr" / "c.npy")
    touch(tmp_path / "lr" / "a.npy")
    with pytest.raises(UserError, match=r"hr/b\.npy has no lr partner .*\(and 1 more"):
        list_source(tmp_path)


def test_list_paired_with_meta_beside_takes_each_pairs_json(tmp_path: Path) -> None:
    for name in ("s1", "s2", "sub/s3"):
        touch(tmp_path / "hr" / f"{name}.npy")
        touch(tmp_path / "lr" / f"{name}.npy")
    touch(tmp_path / "meta" / "s1.json", b"{}")
    touch(tmp_path / "meta" / "sub" / "s3.json", b"{}")
    touch(tmp_path / "meta" / "notes.txt")  # not metadata: left out, as in hr/ and lr/
    src = list_source(tmp_path)  # meta/ is no stray folder beside the pairs
    assert src.kind == "paired" and [i.key for i in src.items] == ["s1", "s2", "sub/s3"]
    # Optional per sample: s2 has none.
    assert [i.meta for i in src.items] == [
        tmp_path / "meta" / "s1.json",
        None,
        tmp_path / "meta" / "sub" / "s3.json",
    ]
    assert [i.files for i in src.items] == [3, 2, 3]


def test_list_meta_without_a_pair_names_the_file(tmp_path: Path) -> None:
    touch(tmp_path / "hr" / "a.npy")
    touch(tmp_path / "lr" / "a.npy")
    touch(tmp_path / "meta" / "a.json", b"{}")
    touch(tmp_path / "meta" / "b.json", b"{}")
    touch(tmp_path / "meta" / "c.json", b"{}")
    with pytest.raises(UserError, match=r"meta/b\.json describes no pair: no hr/b\.\* and "
                       r"lr/b\.\* \(and 1 more") as err:  # fmt: skip
        list_source(tmp_path)
    assert "\n" not in str(err.value)


def test_list_other_folders_beside_pairs_are_still_refused(tmp_path: Path) -> None:
    touch(tmp_path / "hr" / "a.npy")
    touch(tmp_path / "lr" / "a.npy")
    touch(tmp_path / "meta" / "a.json", b"{}")
    touch(tmp_path / "extra" / "a.npy")
    with pytest.raises(UserError, match=r"holds hr/ and lr/ \(pairs\) and also extra:"):
        list_source(tmp_path)


def test_list_errors_for_missing_file_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        list_source(tmp_path / "nope")
    with pytest.raises(UserError, match="got a file"):
        list_source(touch(tmp_path / "f.npy"))
    empty = tmp_path / "empty"
    touch(empty / "readme.txt")
    with pytest.raises(UserError, match="no usable files"):
        list_source(empty)
    (empty / "hr").mkdir()
    (empty / "lr").mkdir()
    with pytest.raises(UserError, match="no usable files"):
        list_source(empty)


def test_list_follows_linked_folders_once(tmp_path: Path) -> None:
    data = tmp_path / "elsewhere"
    touch(data / "a.npy")
    src = tmp_path / "src"
    touch(src / "b.npy")
    (src / "linked").symlink_to(data, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # a link loop must end
    assert [i.key for i in list_source(src).items] == ["b", "linked/a"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can list any folder")
def test_list_unlistable_folder_is_a_user_error(tmp_path: Path) -> None:
    touch(tmp_path / "ok.npy")
    locked = tmp_path / "locked"
    touch(locked / "x.npy")
    locked.chmod(0)
    try:
        with pytest.raises(UserError, match="cannot list"):
            list_source(tmp_path)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    "array",
    [
        np.linspace(-3e38, 3e38, 60).reshape(6, 10),  # float64 at float32's limits
        np.arange(-7, 53, dtype=np.float32).reshape(6, 10),
        np.arange(100, 160, dtype=np.uint16).reshape(1, 6, 10),
        np.arange(-30, 30, dtype=np.int16).reshape(6, 10, 1),
        np.arange(82, 142, dtype=np.int32).reshape(6, 10),  # counts
        np.eye(6, 10, dtype=bool),
    ],
)
def test_npy_range_is_the_decoded_range_without_decoding(array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    values = decode(buf.getvalue(), "npy")
    assert npy_range(buf.getvalue()) == (float(values.min()), float(values.max()))


def test_npy_range_reports_nan_and_inf() -> None:
    for bad in (np.nan, np.inf):
        a = np.zeros((4, 4), np.float32)
        a[1, 2] = bad
        buf = io.BytesIO()
        np.save(buf, a)
        assert not all(np.isfinite(npy_range(buf.getvalue())))

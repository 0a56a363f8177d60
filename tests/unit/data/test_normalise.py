"""Normalisations: parsing, each map and its inverse, which one is in force, and the loader
applying it with statistics of the whole input image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.core.errors import UserError
from toolkit.data.format import read_manifest
from toolkit.data.loader import build_loader
from toolkit.data.normalise import Normalisation, parse, resolve
from toolkit.data.sharding import shard
from toolkit.runs.recipe import DataConfig


def sky(seed: int = 0, bands: int = 3) -> torch.Tensor:
    """Sky-subtracted fluxes: noise around 0 (negative half the time) and a bright core."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bands, 16, 16, generator=g) * 2.0
    x[:, 8, 8] += torch.tensor([500.0, 900.0, 2000.0])[:bands]
    return x


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unit", Normalisation("unit")),
        ("none", Normalisation("none")),
        ("minmax", Normalisation("minmax")),
        ("percentile", Normalisation("percentile", (0.5, 99.5))),
        ("percentile:1,99", Normalisation("percentile", (1.0, 99.0))),
        ("asinh", Normalisation("asinh", (1.0,))),
        ("asinh:0.05", Normalisation("asinh", (0.05,))),
    ],
)
def test_parse_and_print_round_trip(text: str, expected: Normalisation) -> None:
    assert parse(text) == expected
    assert parse(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("zscore", "expected one of unit, none, minmax, percentile, asinh"),
        ("minmax:1", "takes no parameters"),
        ("percentile:99,1", "0 <= lo < hi <= 100"),
        ("percentile:1", "takes 2 number(s)"),
        ("asinh:0", "must be > 0"),
        ("asinh:x", "must be numbers"),
        ("asinh:nan", "takes 1 number(s)"),
    ],
)
def test_parse_names_what_was_expected(text: str, words: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(text)
    assert words in str(err.value) and text in str(err.value)


@pytest.mark.parametrize("text", ["none", "unit", "minmax", "asinh:0.5"])
def test_invert_undoes_apply_in_data_units(text: str) -> None:
    norm, x = parse(text), sky()
    stats = norm.fit(x)
    y = norm.apply(x, stats)
    torch.testing.assert_close(norm.invert(y, stats), x, rtol=1e-5, atol=1e-4)


def test_minmax_and_percentile_are_per_channel_of_the_reference() -> None:
    x = sky()
    y = parse("minmax").apply(x, parse("minmax").fit(x))
    assert torch.equal(y.amin(dim=(1, 2)), torch.zeros(3))
    torch.testing.assert_close(y.amax(dim=(1, 2)), torch.ones(3))
    p = parse("percentile:5,95")
    stats = p.fit(x)
    z = p.apply(x, stats)
    assert z.min() == 0 and z.max() == 1  # the core and the deepest noise are clipped
    for c in range(3):
        lo, hi = np.percentile(x[c].numpy(), [5, 95])
        assert stats[0, c].item() == pytest.approx(lo, rel=1e-5)
        assert stats[1, c].item() == pytest.approx(hi, rel=1e-5)
    inside = (x > stats[0]) & (x < stats[1])
    torch.testing.assert_close(p.invert(z, stats)[inside], x[inside], rtol=1e-5, atol=1e-5)


def test_asinh_is_linear_below_the_softening_and_logarithmic_above() -> None:
    a = parse("asinh:2")
    small = torch.tensor([0.01, -0.02])
    torch.testing.assert_close(a.apply(small, None), small / 2, rtol=1e-4, atol=0)
    big = torch.tensor([1e4, 1e5])
    ratio = a.apply(big, None)
    assert ratio[1] - ratio[0] == pytest.approx(np.log(10), rel=1e-4)


def test_which_normalisation_is_in_force(tmp_path: Path) -> None:
    """The recipe's, else the manifest's, else unit (a run before any shards)."""
    src = tmp_path / "src"
    (src / "hr").mkdir(parents=True)
    (src / "lr").mkdir()
    for i in range(4):
        np.save(src / "hr" / f"{i}.npy", sky(i).numpy())
        np.save(src / "lr" / f"{i}.npy", sky(i).numpy()[:, ::2, ::2])
    shard(src, tmp_path / "plain", val_fraction=0.5)
    shard(src, tmp_path / "asinh", val_fraction=0.5, normalise="asinh:3")
    plain, asinh = read_manifest(tmp_path / "plain"), read_manifest(tmp_path / "asinh")
    assert plain.normalise == "none"  # values beyond [0, 1]: taken as they are, unclamped
    assert asinh.normalise == "asinh:3"
    assert resolve(None, asinh) == parse("asinh:3")
    assert resolve("minmax", asinh) == parse("minmax")
    assert resolve(None, None) == parse("unit")
    with pytest.raises(UserError, match="--normalise 'cubic': expected one of"):
        shard(src, tmp_path / "bad", val_fraction=0.5, normalise="cubic")
    assert not (tmp_path / "bad").exists()


def test_the_loader_maps_with_the_whole_input_images_statistics(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "hr").mkdir(parents=True)
    (src / "lr").mkdir()
    hr = {f"{i}": sky(i).numpy() for i in range(6)}
    for key, image in hr.items():
        np.save(src / "hr" / f"{key}.npy", image)
        np.save(src / "lr" / f"{key}.npy", image.reshape(3, 8, 2, 8, 2).mean(axis=(2, 4)))
    shard(src, tmp_path / "out", val_fraction=0.5, seed=1)
    assert json.loads((tmp_path / "out/manifest.json").read_text())["normalise"] == "none"
    for text in ("none", "asinh:3", "minmax"):
        data = DataConfig(shards=str(tmp_path / "out"), batch_size=6, num_workers=0,
                          normalise=text)  # fmt: skip
        norm = parse(text)
        for split in ("train", "val"):
            # an 8x8 centre crop of 16x16 images: statistics from the whole LR, not the crop
            ld = build_loader(data, split, crop=8, seed=0, evaluation=True)
            for batch in ld:
                for key, got_hr, got_lr in zip(batch["key"], batch["hr"], batch["lr"], strict=True):
                    full_hr = torch.from_numpy(hr[key])
                    full_lr = torch.from_numpy(np.load(src / "lr" / f"{key}.npy"))
                    stats = norm.fit(full_lr)
                    want_hr = norm.apply(full_hr, stats)[:, 4:12, 4:12]
                    want_lr = norm.apply(full_lr, stats)[:, 2:6, 2:6]
                    torch.testing.assert_close(got_hr, want_hr, rtol=0, atol=0)
                    torch.testing.assert_close(got_lr, want_lr, rtol=0, atol=0)
            ld.close()

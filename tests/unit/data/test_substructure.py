"""Labelled lensing images: the substructure of each class where it should be, classes in turn,
the same files whatever the workers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toolkit.data.sim import substructure, write
from toolkit.data.sim.substructure import CLASSES, SUB_COUNT, SUB_RING, SUB_THETA, VORTEX_BEADS

LENS = {"theta_E": 1.2, "center_x": 0.05, "center_y": -0.03}


def radius(p: dict) -> float:
    return math.hypot(p["center_x"] - LENS["center_x"], p["center_y"] - LENS["center_y"])


def test_cdm_subhalos_lie_on_the_ring_with_their_masses() -> None:
    for seed in range(20):
        subs = substructure.substructure(np.random.default_rng(seed), "cdm", LENS)
        assert SUB_COUNT[0] <= len(subs) <= SUB_COUNT[1]
        for s in subs:
            assert SUB_RING[0] <= radius(s) / LENS["theta_E"] <= SUB_RING[1]
            assert SUB_THETA[0] <= s["theta_E"] <= SUB_THETA[1]


def test_a_vortex_is_a_straight_string_of_beads_centred_on_the_ring() -> None:
    from toolkit.data.sim.substructure import VORTEX_LENGTH, VORTEX_THETA

    for seed in range(20):
        beads = substructure.substructure(np.random.default_rng(seed), "vortex", LENS)
        xy = np.array([[b["center_x"], b["center_y"]] for b in beads])
        assert len(beads) == VORTEX_BEADS
        centre = xy.mean(axis=0)
        d = {"center_x": centre[0], "center_y": centre[1]}
        assert SUB_RING[0] <= radius(d) / LENS["theta_E"] <= SUB_RING[1]
        steps = np.diff(xy, axis=0)
        cross = steps[1:, 0] * steps[:-1, 1] - steps[1:, 1] * steps[:-1, 0]
        assert np.abs(cross).max() < 1e-12  # collinear, evenly spaced
        length = np.linalg.norm(xy[-1] - xy[0])
        assert VORTEX_LENGTH[0] - 1e-9 <= length <= VORTEX_LENGTH[1] + 1e-9
        total = sum(b["theta_E"] for b in beads)
        assert VORTEX_THETA[0] - 1e-12 <= total <= VORTEX_THETA[1] + 1e-12
    assert substructure.substructure(np.random.default_rng(0), "no_sub", LENS) == []
    with pytest.raises(ValueError, match="unknown class 'wdm'"):
        substructure.substructure(np.random.default_rng(0), "wdm", LENS)


def test_classes_in_turn_and_the_same_files_whatever_the_workers(tmp_path) -> None:
    pytest.importorskip("lenstronomy")
    write.generate(tmp_path / "one", 6, seed=2, workers=1, classes=True)
    write.generate(tmp_path / "two", 6, seed=2, workers=2, classes=True)
    names = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*.npy"))
    assert names == [
        f"{CLASSES[i % 3]}/{i:06d}.npy" for i in sorted(range(6), key=lambda i: (i % 3, i))
    ]
    for name in names:
        a = np.load(tmp_path / "one" / name)
        assert a.shape == (150, 150) and a.dtype == np.float32 and 0 <= a.min() <= a.max() <= 1
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_each_class_changes_the_image_of_the_same_system() -> None:
    """With the same seed (the same lens, source, light and PSF are drawn before the
    substructure) and no noise, `cdm` and `vortex` images differ from `no_sub` because of their
    perturbers alone: a generator that dropped them would make the classes indistinguishable."""
    pytest.importorskip("lenstronomy")
    images = {
        cls: substructure.simulate_labelled(np.random.default_rng(7), cls, noise=False)
        for cls in ("no_sub", "cdm", "vortex")
    }
    again = substructure.simulate_labelled(np.random.default_rng(7), "no_sub", noise=False)
    assert np.array_equal(again, images["no_sub"])  # no randomness left: what differs is the class
    for cls in ("cdm", "vortex"):
        diff = np.abs(images[cls].astype(np.float64) - images["no_sub"])
        # Float32 rounding of values in [0, 1] is below 6e-8; the noise the generator would add
        # has an rms of at most 0.008 (lensing's calibration). The perturbers move arcs by
        # pixels and rescale the normalisation: 0.03 (vortex) and 0.05 (cdm) on average here, and
        # even perturbers 10 times lighter change it by 0.01. 0.008 asks for a change at least
        # the size of the noise, on average over the whole image.
        assert diff.mean() > 0.008, (cls, diff.mean())
        assert diff.max() > 0.1, (cls, diff.max())
    assert np.abs(images["cdm"] - images["vortex"]).mean() > 0.008  # and from each other

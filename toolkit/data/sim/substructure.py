"""Labelled lensing images by dark-matter substructure, for the classify task.

    python -m toolkit.simulate OUT --count N --classes [--seed S] [--workers W]

writes ``OUT/<class>/<key>.npy``: 150x150 HR images (0.03 arcsec pixels) of the systems
``toolkit.data.sim.lensing`` draws (SIE + shear lens, Sersic source and lens light, Gaussian PSF,
the same normalisation and noise), sample ``i`` of class ``CLASSES[i % 3]``:

- ``no_sub``: the smooth lens alone;
- ``cdm``: a population of subhalos, each a singular isothermal sphere of Einstein radius
  drawn log-uniformly in ``SUB_THETA``, ``SUB_COUNT`` of them, placed uniformly in an annulus
  of ``SUB_RING`` times the main lens's Einstein radius (where the arcs are, so they perturb
  them);
- ``vortex``: a line mass (a vortex string of an axion-like dark matter) crossing the ring: a
  straight chain of ``VORTEX_BEADS`` small isothermal spheres over ``VORTEX_LENGTH``, its
  total Einstein radius (the sum of the beads') drawn in ``VORTEX_THETA``, its centre in the
  annulus, at a random angle.

Shard with ``python -m toolkit.shard OUT SHARDS --labels``: the class is each file's folder.

Calibration (lenstronomy 1.14.2; 1,500 images, seed 0, sharded 90:10: 146 in val): the demo's
CNN from scratch (`recipes/demo/classify_cnn.yaml`, 98K parameters, 6 epochs, about 2 minutes
on 2 CPU cores) reaches a micro one-vs-rest AUC of 0.82 (0.70 to 0.82 over its epochs), inside
the 0.75-0.98 band the task is meant for: not trivial, not hopeless. The knobs, from the
strongest: the subhalos' and the string's Einstein radii, then their number and the string's
length. Weaker perturbers (subhalos of 0.02-0.06", a string of 0.1-0.25") left the same CNN at
chance (AUC 0.57 after 10 epochs); 0.05-0.15" and 0.3-0.6" gave 0.70. The substructure adds mass
near the ring (CDM: about 7% of the main lens's on average, SIS mass going as theta_E^2), so
rings grow a little; as the main lens's Einstein radius varies by a factor of two between
systems, ring size alone does not give the class away. 6-7 ms an image on one worker.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from toolkit.core.atomic import save_npy

CLASSES = ("cdm", "no_sub", "vortex")  # sorted: the labels `shard --labels` gives them

SUB_COUNT = (3, 8)  # CDM subhalos per system (uniform integer)
SUB_THETA = (0.08, 0.2)  # each subhalo's Einstein radius, arcsec (log-uniform)
SUB_RING = (0.6, 1.4)  # subhalos and the vortex centre: this fraction of theta_E from the lens
VORTEX_BEADS = 10
VORTEX_LENGTH = (1.0, 2.0)  # arcsec
VORTEX_THETA = (0.4, 0.8)  # the string's total Einstein radius (sum over beads), arcsec


def _ring_point(rng: np.random.Generator, lens: dict) -> tuple[float, float]:
    r = lens["theta_E"] * rng.uniform(*SUB_RING)
    a = rng.uniform(0, 2 * math.pi)
    return lens["center_x"] + r * math.cos(a), lens["center_y"] + r * math.sin(a)


def substructure(rng: np.random.Generator, cls: str, lens: dict) -> list[dict]:
    """The SIS perturbers of one system of class `cls` around the main lens `lens`."""
    if cls == "no_sub":
        return []
    if cls == "cdm":
        out = []
        for _ in range(int(rng.integers(SUB_COUNT[0], SUB_COUNT[1] + 1))):
            x, y = _ring_point(rng, lens)
            theta = math.exp(rng.uniform(math.log(SUB_THETA[0]), math.log(SUB_THETA[1])))
            out.append({"theta_E": theta, "center_x": x, "center_y": y})
        return out
    if cls == "vortex":
        x, y = _ring_point(rng, lens)
        a, half = rng.uniform(0, math.pi), rng.uniform(*VORTEX_LENGTH) / 2
        theta = rng.uniform(*VORTEX_THETA) / VORTEX_BEADS
        return [{"theta_E": theta, "center_x": x + t * math.cos(a), "center_y": y + t * math.sin(a)}
                for t in np.linspace(-half, half, VORTEX_BEADS)]  # fmt: skip
    raise ValueError(f"unknown class {cls!r}: expected one of {', '.join(CLASSES)}")


def simulate_labelled(rng: np.random.Generator, cls: str, noise: bool = True) -> np.ndarray:
    """One HR image of class `cls`: float32 150x150 in [0, 1], normalised as the SR data's HR."""
    from toolkit.data.sim import lensing as L

    L.require_lenstronomy()
    kwargs, fwhm, light_to_source, rms = L._draw_system(rng)
    subs = substructure(rng, cls, kwargs["kwargs_lens"][0])
    kwargs["kwargs_lens"] = kwargs["kwargs_lens"] + subs
    models = ("SIE", "SHEAR", *("SIS",) * len(subs))
    args = (L.HR_SIZE, L.HR_PIXEL, fwhm, L.HR_SUPERSAMPLING, kwargs)
    source = L._render(*args, lens_light=False, lens_models=models)
    light = L._render(*args, source=False, lens_models=models)
    image = source / source.max() + light_to_source * light / light.max()
    gain = (1 - 2 * L.SKY) / np.percentile(image, L.SCALE_PERCENTILE)
    image = L.SKY + gain * image
    if noise:
        image = image + rng.normal(0.0, rms, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def write_range(out: Path, seed: int, start: int, stop: int) -> int:
    """Samples start..stop-1 into out/<class>/<key>.npy (the `lensing.generate` worker)."""

    for index in range(start, stop):
        cls = CLASSES[index % len(CLASSES)]
        image = simulate_labelled(np.random.default_rng([seed, index, 1]), cls)
        save_npy(out / cls / f"{index:06d}.npy", image)
    return stop - start

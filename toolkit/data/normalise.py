"""Normalisation: the named, invertible map from the data's units to the values a model sees.

Written `NAME[:p1,p2]` in `toolkit.shard --normalise` (recorded in manifest.json) and in a
recipe's `data.normalise` (which overrides the manifest's; the run's recipe.yaml records the one
used):

    unit                values used as they are, known to lie in [0, 1] (8/16-bit images, or
                        float data the shard step found there): outputs are clamped to [0, 1]
    none                values used as they are, whatever their range: nothing is clamped
    minmax              per image and channel, (x - min) / (max - min) of the input -> [0, 1]
                        (its HR pair may reach past 1: nothing is clamped)
    percentile:lo,hi    per image and channel, the lo-th and hi-th percentiles -> 0 and 1,
                        values beyond clipped (default 0.5,99.5): robust to hot pixels
    asinh:soft          asinh(x / soft): linear below `soft` (data units), logarithmic above;
                        for a large dynamic range (bright cores, faint arcs), unbounded

The per-image statistics are fitted on the model's input (the LR image, which prediction also
has) and applied to both images of a pair, so the inverse of a prediction uses the statistics of
its own input. PSNR and SSIM are computed in the normalised values with peak 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from toolkit.data.format import Manifest, default_normalise

NAMES = ("unit", "none", "minmax", "percentile", "asinh")
_DEFAULTS = {"percentile": (0.5, 99.5), "asinh": (1.0,)}
_EPS = 1e-12  # a flat image (max == min) maps to 0 instead of dividing by zero


@dataclass(frozen=True)
class Normalisation:
    name: str
    params: tuple[float, ...] = ()

    @property
    def bounded(self) -> bool:
        """True when the normalised values lie in [0, 1] (outputs and references are clamped)."""
        return self.name in ("unit", "percentile")

    @property
    def per_image(self) -> bool:
        return self.name in ("minmax", "percentile")

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}:{','.join(f'{p:g}' for p in self.params)}"

    def fit(self, ref: torch.Tensor) -> torch.Tensor | None:
        """Per-image statistics from `ref` [C, H, W] (or [N, C, H, W]): (low, high) per channel,
        shaped to broadcast over it; None for the maps that have none."""
        if not self.per_image:
            return None
        flat = ref.float().flatten(-2)
        if self.name == "minmax":
            low, high = flat.amin(-1), flat.amax(-1)
        else:
            q = torch.tensor([self.params[0] / 100, self.params[1] / 100], dtype=flat.dtype)
            low, high = torch.quantile(flat, q, dim=-1)
        return torch.stack([low, high])[..., None, None]  # [2, (N,) C, 1, 1]

    def apply(self, x: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        if self.name in ("unit", "none"):
            return x
        if self.name == "asinh":
            return torch.asinh(x / self.params[0])
        assert stats is not None
        low, high = stats[0], stats[1]
        y = (x - low) / (high - low).clamp_min(_EPS)
        return y.clamp(0.0, 1.0) if self.name == "percentile" else y

    def invert(self, y: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        """Back to the data's units (percentile: the clipped values stay at the percentiles)."""
        if self.name in ("unit", "none"):
            return y
        if self.name == "asinh":
            return torch.sinh(y) * self.params[0]
        assert stats is not None
        low, high = stats[0], stats[1]
        return y * (high - low).clamp_min(_EPS) + low


def parse(text: str) -> Normalisation:
    """`NAME[:p1,p2]` -> Normalisation; ValueError with what was expected."""
    name, _, rest = text.strip().partition(":")
    if name not in NAMES:
        raise ValueError(f"{text!r}: expected one of {', '.join(NAMES)} (e.g. asinh:0.1)")
    if not rest:
        return Normalisation(name, _DEFAULTS.get(name, ()))
    if name not in _DEFAULTS:
        raise ValueError(f"{text!r}: {name} takes no parameters")
    try:
        params = tuple(float(p) for p in rest.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: parameters must be numbers") from None
    want = len(_DEFAULTS[name])
    if len(params) != want or not all(math.isfinite(p) for p in params):
        raise ValueError(f"{text!r}: {name} takes {want} number(s)")
    if name == "percentile" and not 0 <= params[0] < params[1] <= 100:
        raise ValueError(f"{text!r}: expected 0 <= lo < hi <= 100")
    if name == "asinh" and params[0] <= 0:
        raise ValueError(f"{text!r}: the softening must be > 0")
    return Normalisation(name, params)


def resolve(spec: str | None, manifest: Manifest | None) -> Normalisation:
    """The normalisation in force: the recipe's, else the one the shards record, else the
    default for their value range (`unit` without shards to ask: a run before any)."""
    if spec:
        return parse(spec)
    if manifest is not None and manifest.normalise:
        return parse(manifest.normalise)
    return default_for(manifest.value_range if manifest is not None else None)


def default_for(value_range: tuple[float, float] | None) -> Normalisation:
    """What shards without an explicit choice get: `unit` for values in [0, 1], else `none`."""
    return Normalisation(default_normalise(value_range))

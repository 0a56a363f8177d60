"""Whether data fit what a run was trained on: channels, size, and the range of the values the
model sees under its normalisation. What does not fit is refused with one line that says what
was seen, what the run expects, and what would map one to the other, never passed through a
model that would turn it into confident nonsense."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from toolkit.data.normalise import Normalisation

# How far beyond the range of its training values (as a fraction of that range's width) a
# model is still given values: noise and calibration put a little outside any range seen, but
# a model extrapolates there, and far outside it, it returns nonsense with no warning.
SLACK = 0.1


@dataclass(frozen=True)
class Expected:
    """What a run's model was trained on."""

    run: str  # the run, for messages
    channels: int  # model.in_chans
    norm: Normalisation  # the run's normalisation
    value_range: tuple[float, float] | None  # of its training data, in their units (None: unknown)
    min_side: int = 1  # the smallest input side it takes (LR pixels)

    @property
    def model_range(self) -> tuple[float, float] | None:
        """The values the model saw in training, normalised: [0, 1] for the maps that put them
        there, the training data's range mapped otherwise (None where that is unknown)."""
        if self.norm.name == "unit" or self.norm.per_image:
            return 0.0, 1.0
        if self.value_range is None:
            return None
        low, high = self.norm.apply(torch.tensor(self.value_range, dtype=torch.float64), None)
        return float(low), float(high)

    def allowed(self) -> tuple[float, float] | None:
        """The model range widened by SLACK of its width on each side."""
        if self.model_range is None:
            return None
        low, high = self.model_range
        margin = SLACK * max(high - low, 1e-12)
        return low - margin, high + margin


def _g(value: float) -> str:
    return f"{value:.4g}"


def range_misfit(
    where: str,
    seen: tuple[float, float],
    mapped: tuple[float, float],
    norm: Normalisation,
    expected: Expected,
    remap: str = "predict --normalise ",
) -> str | None:
    """Why values `seen` (data units; `mapped`: what `norm` makes of them for the model) do not
    fit the run, in one line, or None when they do. `remap`: how the command is told another
    normalisation, for the remedy."""
    allowed = expected.allowed()
    if allowed is None or (allowed[0] <= mapped[0] and mapped[1] <= allowed[1]):
        return None
    model_low, model_high = expected.model_range or allowed
    trained = (
        f"trained on values {_g(expected.value_range[0])} to {_g(expected.value_range[1])}"
        if expected.value_range is not None
        else "trained"
    )
    under = (
        ""
        if norm.name in ("unit", "none")
        else f" ({_g(mapped[0])} to {_g(mapped[1])} under {norm})"
    )
    # A model that saw values in [0, 1] takes any image mapped there per image; one that saw
    # data in other units needs data like them.
    if model_low >= -SLACK and model_high <= 1 + SLACK:
        remedy = (
            f"`{remap}minmax` (or percentile) maps each image to [0, 1] and the model's output "
            "back to the image's units; or retrain on such data"
        )
    else:
        remedy = "retrain on such data (shard them; data.normalise=asinh:SOFT suits a wide range)"
    return (
        f"{where}: values {_g(seen[0])} to {_g(seen[1])}{under}, but {expected.run} was "
        f"{trained} (normalisation {expected.norm}: {_g(model_low)} to {_g(model_high)} for the "
        f"model); {remedy}"
    )


def unit_misfit(
    where: str, value_range: tuple[float, float] | None, key: str, norm: Normalisation
) -> str | None:
    """Why `unit` (named by `key`: a flag or a recipe key) cannot map values spanning
    `value_range`, or None: it says they lie in [0, 1], and everything beyond would be clamped
    there (a blank image of ones for counts)."""
    if norm.name != "unit" or value_range is None:
        return None
    low, high = value_range
    if low >= 0.0 and high <= 1.0:
        return None
    return (
        f"{where}: {key} unit says values lie in [0, 1], but they span {_g(low)} to {_g(high)}: "
        "use none, minmax, percentile or asinh"
    )


def shards_misfit(
    where: str, value_range: tuple[float, float] | None, norm: Normalisation, expected: Expected
) -> str | None:
    """Why shards whose values span `value_range` do not fit the run when mapped by `norm`, or
    None (also when their range was not recorded). A per-image map puts every image in [0, 1]."""
    if value_range is None:
        return None
    if norm.per_image:
        mapped = (0.0, 1.0)
    else:
        ends = norm.apply(torch.tensor(value_range, dtype=torch.float64), None)
        mapped = (float(ends[0]), float(ends[1]))
    return range_misfit(where, value_range, mapped, norm, expected, remap="data.normalise=")


def misfit(where: str, x: torch.Tensor, norm: Normalisation, expected: Expected) -> str | None:
    """Why an image [C, H, W] in its data's units (NaN/inf: masked, left out) does not fit the
    run when mapped by `norm`, in one line naming `where`, or None when it fits."""
    channels, h, w = x.shape
    if channels != expected.channels:
        return (
            f"{where}: {channels} channel(s), but {expected.run} takes {expected.channels} "
            "(model.in_chans)"
        )
    if min(h, w) < expected.min_side:
        return (
            f"{where}: {h}x{w} pixels, smaller than {expected.min_side} on a side, half the tile "
            f"{expected.run} takes: most of what the model would see is padding; give it larger "
            "images or cutouts"
        )
    finite = torch.isfinite(x)
    if not finite.any():
        return f"{where}: no finite value (every pixel is NaN or inf)"
    clean = torch.where(finite, x, 0.0)
    mapped = norm.apply(clean, norm.fit(clean))[finite]
    values = x[finite]
    seen = float(values.min()), float(values.max())
    low, high = float(mapped.min()), float(mapped.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{where}: values {_g(seen[0])} to {_g(seen[1])} overflow under {norm}"
    return range_misfit(where, seen, (low, high), norm, expected)

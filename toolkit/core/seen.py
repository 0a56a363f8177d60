"""What a metric is given: an output and the batch it answers (target, the model's input, each
sample's PSFs, the maps to and from the data's units, the run's degradation), with what several
metrics derive from them computed once."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch
from torch import Tensor

from toolkit.core import images, physics

# LR pixels at each edge left out of the consistency of the run's degradation: the reach of
# the antialiased bicubic kernel (2 LR pixels), which saw padding there.
FALLBACK_BORDER = 2
# A saturated pixel's share of an LR pixel above which that pixel is not compared (a Gaussian
# tail below it moves the LR value by less than float32 resolves).
SATURATION_REACH = 1e-6


class Truth:
    """What the metrics of one batch share whatever output they judge (the model's, or the
    reference's): the target, the model's input, each sample's own degradation, the maps to
    and from the data's units and the run's own degradation. What is derived from the target
    (its values in data units, its signal mask) is computed once for all outputs."""

    def __init__(
        self,
        target: Tensor,
        input: Tensor | None = None,
        psf: Tensor | None = None,
        to_data: Callable[[Tensor], Tensor] | None = None,
        from_data: Callable[[Tensor], Tensor] | None = None,
        degrade: Callable[[Tensor], Tensor] | None = None,
        scale: int = 1,
        saturated: Tensor | None = None,
    ) -> None:
        self.target = target.detach().double()
        self.input = None if input is None else input.detach().to(self.target.device).double()
        # [N, 2]: the HR and LR PSF's Gaussian sigma in HR pixels; NaN where not recorded
        self.psf = psf
        self._to_data, self._from_data = to_data, from_data
        self.degrade, self.scale = degrade, scale
        # [N, C, H, W] bool: target pixels clipped at the top of a bounded range (a saturated
        # core), whose true light is unknown; None where nothing is clipped
        self.saturated = saturated

    def to_data(self, x: Tensor) -> Tensor:
        """Normalised values -> the data's own units (each sample with its own statistics)."""
        return x if self._to_data is None else self._to_data(x).double()

    def from_data(self, x: Tensor) -> Tensor:
        return x if self._from_data is None else self._from_data(x).double()

    @cached_property
    def data_target(self) -> Tensor:
        return self.to_data(self.target)

    @cached_property
    def background(self) -> tuple[Tensor, Tensor]:
        """The median and std [N, C] of the target's sigma-clipped background (data units)."""
        _, median, std = physics.sigma_clipped_stats(self.data_target)
        return median, std

    @cached_property
    def signal(self) -> Tensor:
        """Where the target stands above its sigma-clipped background (the arcs, the lens)."""
        return physics.signal_mask(self.data_target, background=self.background)

    def forward(self, x: Tensor) -> Tensor:
        """HR-grid images [N, C, H, W] in data units -> the LR grid, each sample by its own
        PSFs and pixels where known (`physical`), by the run's degradation otherwise."""
        assert self.input is not None and self.degrade is not None
        known = self.physical.to(x.device)
        out = x.new_empty((len(x), *self.input.shape[1:]))
        if known.any():
            hr_sigma, lr_sigma = self.sigmas
            out[known] = physics.redegrade(x[known], hr_sigma, lr_sigma, self.scale)
        if not known.all():
            out[~known] = self.degrade(x[~known])
        return out

    @cached_property
    def sigmas(self) -> tuple[Tensor, Tensor]:
        """The HR and LR PSF sigmas (HR pixels) of the samples whose degradation is known."""
        assert self.psf is not None
        known = self.physical
        psf = self.psf.reshape(len(known), -1)[known].to(self.target.device, torch.float64)
        return psf[:, 0], psf[:, 1]

    @cached_property
    def comparable(self) -> Tensor:
        """[N, C, h, w] bool, the LR pixels the forward-model consistency compares: not within
        the blur's reach of the image's edge (it saw padding there), nor of a saturated target
        pixel; the interior alone where that would leave nothing."""
        assert self.input is not None
        n, _, h, w = self.input.shape
        borders = torch.full((n,), FALLBACK_BORDER, dtype=torch.long)
        known = self.physical
        if known.any():
            hr_sigma, lr_sigma = self.sigmas
            extra = (lr_sigma.square() - hr_sigma.square()).clamp_min(0).sqrt().cpu()
            radius = (physics.BLUR_TRUNCATE * extra + 0.5).floor()
            borders[known] = torch.ceil(radius / self.scale).long()
        y = torch.arange(h).view(1, h, 1)
        x = torch.arange(w).view(1, 1, w)
        b = borders.view(n, 1, 1)
        inner = ((y >= b) & (y < h - b) & (x >= b) & (x < w - b)).unsqueeze(1)
        inner = inner.expand(self.input.shape).to(self.input.device)
        if self.saturated is None:
            return inner
        reach = self.forward(self.saturated.double()).abs() > SATURATION_REACH
        keep = inner & ~reach
        empty = keep.flatten(1).sum(1) == 0
        return torch.where(empty.view(n, 1, 1, 1), inner, keep)

    @cached_property
    def physical(self) -> Tensor:
        """[N] bool: the sample's own degradation is known (its PSFs, from the shards)."""
        n = len(self.target)
        if self.psf is None:
            return torch.zeros(n, dtype=torch.bool)
        return torch.isfinite(self.psf.reshape(n, -1)).all(dim=1).cpu()


class Seen:
    """What a metric is given: one output [N, C, H, W] (normalised values, as the model makes
    them) and the batch it answers (`truth`), so a metric can compare with the input or work in
    the data's units, not only with the target."""

    def __init__(self, output: Tensor, truth: Truth) -> None:
        self.output = output.detach().to(truth.target.device).double()
        self.truth = truth

    @property
    def target(self) -> Tensor:
        return self.truth.target

    @cached_property
    def data_output(self) -> Tensor:
        return self.truth.to_data(self.output)

    @cached_property
    def ssim_map(self) -> Tensor:
        return images.ssim_map(self.output, self.target)

    @cached_property
    def bands(self) -> Tensor:
        return physics.band_power_ratio(self.output, self.target)

    @cached_property
    def lr_psnr(self) -> Tensor:
        """The output taken back to the input's grid, PSNR against the input: by the sample's
        own PSFs and pixels (blur to the LR PSF, average to the LR pixel) where known, by the
        run's degradation otherwise; in the data's units, as the light was degraded. Left out:
        the LR pixels whose blur reached past the image's edge, and those a saturated target
        pixel reaches (clipped light, which no forward model can take back)."""
        t = self.truth
        if t.input is None or t.degrade is None:
            raise ValueError("the forward-model consistency needs the model's input and the "
                             "run's degradation")  # fmt: skip
        lr_hat = t.from_data(t.forward(self.data_output))  # each sample by its own statistics
        return physics.masked_psnr(lr_hat, t.input, t.comparable).cpu()

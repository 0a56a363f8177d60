"""Super-resolution: LR in, HR out; a pixel loss; MSE / PSNR / SSIM and the physics-aware metrics
(forward-model consistency with the input, flux, the arcs' PSNR / SSIM, power by spatial
frequency) against bicubic upscaling; the power spectra of HR, SR and bicubic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.core.metrics import MetricAccumulator, image_metrics
from toolkit.core.physics import radial_power
from toolkit.core.schema import Recipe
from toolkit.core.seen import Seen, Truth
from toolkit.data.degrade import degrade, upscale_bicubic
from toolkit.data.normalise import resolve
from toolkit.tasks.base import BatchResult, Placement, Task

_PIXEL_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}
# What an astronomer asks of a super-resolved image besides its PSNR (`toolkit.core.physics`).
PHYSICS = ("lr_psnr", "flux_err", "arc_flux_err", "arc_psnr", "arc_ssim", "power_low",
           "power_mid", "power_high")  # fmt: skip
PHYSICS_NOTE = (
    "LR consistency: the output taken back to the input's grid by each sample's own PSFs and "
    "pixels where the shards record them, else by the run's degradation, against the input; "
    "flux errors: |relative error| of the flux above the sigma-clipped background, in the "
    "data's units, over the image and over the arcs (pixels 3 sigma above the background), "
    "where arc PSNR / SSIM are taken too; power: the output's over HR's in the low, mid and "
    "high third of the spatial frequencies (1 is right)"
)
SPECTRA = ("hr", "model", "bicubic")  # the radially averaged power spectra eval.json keeps


class SRTask(Task):
    """The model maps `lr` [N, C, h, w] to [N, C, h*scale, w*scale]; the loss is the recipe's
    pixel loss (train.loss, L1 by default) against `hr`; the reference is bicubic upscaling of
    the same inputs. Where the normalised values lie in [0, 1] (data.normalise unit or
    percentile), outputs are clamped there before metrics, as any image would be."""

    name = "sr"
    title = "super-resolution"
    default_arch = "srmae"
    fields = ("hr", "lr")
    metrics = ("loss", "mse", "psnr", "ssim", *PHYSICS)
    table = ("mse", "psnr", "ssim")
    more_tables = (("physics", PHYSICS, PHYSICS_NOTE),)
    compare = ("psnr", "ssim")
    score = "psnr"
    reference = "bicubic"
    tiles = ("LR", "bicubic", "SR", "HR")
    scored_tiles = ("bicubic", "SR")

    def __init__(self, r: Recipe) -> None:
        super().__init__(r)
        self.scale = r.data.scale
        # Outputs and the bicubic row are clamped where the values are known to lie in [0, 1].
        self.norm = resolve(r.data.normalise, None)
        self.clamp = self.norm.bounded
        self.size = r.model.img_size  # the side of the HR crop: the spectra's frequencies
        self.loss_name = r.train.loss or "l1"
        self.loss_label = f"loss ({self.loss_name})"

    @classmethod
    def problems(cls, r: Recipe) -> Iterator[tuple[str, str]]:
        if r.model.img_size % r.data.scale:
            yield "data.scale", f"{r.data.scale} does not divide model.img_size {r.model.img_size}"

    def model_inputs(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def losses(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, rng: torch.Generator | None
    ) -> tuple[Tensor, Any]:
        out, hr = self.supervised(model, batch, at, "lr", "hr")
        # In fp32 whatever the model computes in: a bf16 loss would round away small errors.
        per_pixel = _PIXEL_LOSSES[self.loss_name](out.float(), hr, reduction="none")
        return per_pixel.mean(dim=(1, 2, 3)), out

    def truth(self, batch: dict[str, Any], at: Placement) -> Truth:
        """What the metrics see of a batch besides an output: the HR target, the LR input, each
        sample's own PSFs where the shards record them, the normalisation in force (with each
        sample's statistics) and the run's own degradation."""
        hr, lr = batch["hr"].to(at.device), batch["lr"].to(at.device)
        stats = None
        if self.norm.per_image:
            if "norm" not in batch:
                raise ValueError(f"data.normalise {self.norm} needs each sample's statistics")
            stats = batch["norm"].to(at.device, torch.float64).transpose(0, 1)  # [2, N, C, 1, 1]
        norm = self.norm
        return Truth(
            hr, lr, batch.get("psf"),
            to_data=lambda y: norm.invert(y, stats),
            from_data=lambda x: norm.apply(x, stats),
            # in the data's units, where no [0, 1] bound holds: nothing clamped
            degrade=lambda x: degrade(x, self.scale, clamp=False),
            scale=self.scale,
            # values at the top of a bounded range were clipped there: saturated light
            saturated=(hr >= 1) if self.clamp else None,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, tiles: int
    ) -> BatchResult:
        loss, out = self.losses(model, batch, at, None)
        lr, hr = batch["lr"].to(at.device), batch["hr"].to(at.device)
        sr = out.float().clamp(0, 1) if self.clamp else out.float()
        bicubic = upscale_bicubic(lr, self.scale, clamp=self.clamp)
        truth = self.truth(batch, at)
        ours, ref = Seen(sr, truth), Seen(bicubic, truth)
        values = {"loss": loss, **image_metrics(self.metrics, ours)}
        # beside the metrics, gathered with them: which forward model each sample had, and the
        # spectra the report's figure averages
        values["physical"] = truth.physical.double()
        for name, image in zip(SPECTRA, (hr, sr, bicubic), strict=True):
            values[f"spectrum.{name}"] = radial_power(image)[1]
        rows: list[list[Tensor]] = []
        if tiles:
            up = F.interpolate(lr[:tiles], size=hr.shape[-2:], mode="nearest")
            rows = [list(t) for t in zip(up, bicubic[:tiles], sr[:tiles], hr[:tiles], strict=True)]
        return BatchResult(values, image_metrics(self.metrics, ref), rows)

    def extras(self, values: MetricAccumulator) -> dict[str, Any]:
        """How each sample's output was taken back to its input's grid (`psf`: by its own PSFs
        and pixels, recorded by the simulator; `run`: by the run's degradation), and the power
        spectra of HR, the model's output and bicubic averaged over the split (the mean power
        at each spatial frequency, in cycles per HR pixel)."""
        physical = int(values.values("physical").sum().item())
        spectra = {name: values.values(f"spectrum.{name}").mean(dim=0).tolist()
                   for name in SPECTRA}  # fmt: skip
        frequency = [k / self.size for k in range(1, len(spectra["hr"]) + 1)]
        return {
            "forward_model": {"psf": physical, "run": values.count - physical},
            "spectra": {"frequency": frequency, **spectra},
        }

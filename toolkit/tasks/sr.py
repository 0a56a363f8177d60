"""Super-resolution: LR in, HR out; a pixel loss; MSE / PSNR / SSIM against bicubic upscaling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.core.metrics import image_metrics
from toolkit.core.schema import Recipe
from toolkit.data.degrade import upscale_bicubic
from toolkit.data.normalise import resolve
from toolkit.tasks.base import BatchResult, Placement, Task

_PIXEL_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


class SRTask(Task):
    """The model maps `lr` [N, C, h, w] to [N, C, h*scale, w*scale]; the loss is the recipe's
    pixel loss (train.loss, L1 by default) against `hr`; the reference is bicubic upscaling of
    the same inputs. Where the normalised values lie in [0, 1] (data.normalise unit or
    percentile), outputs are clamped there before metrics, as any image would be."""

    name = "sr"
    title = "super-resolution"
    default_arch = "srmae"
    fields = ("hr", "lr")
    metrics = ("loss", "mse", "psnr", "ssim")
    table = ("mse", "psnr", "ssim")
    compare = ("psnr", "ssim")
    score = "psnr"
    reference = "bicubic"
    tiles = ("LR", "bicubic", "SR", "HR")
    scored_tiles = ("bicubic", "SR")

    def __init__(self, r: Recipe) -> None:
        super().__init__(r)
        self.scale = r.data.scale
        # Outputs and the bicubic row are clamped where the values are known to lie in [0, 1].
        self.clamp = resolve(r.data.normalise, None).bounded
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

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, tiles: int
    ) -> BatchResult:
        loss, out = self.losses(model, batch, at, None)
        lr, hr = batch["lr"].to(at.device), batch["hr"].to(at.device)
        sr = out.float().clamp(0, 1) if self.clamp else out.float()
        bicubic = upscale_bicubic(lr, self.scale, clamp=self.clamp)
        names = self.metrics
        rows: list[list[Tensor]] = []
        if tiles:
            up = F.interpolate(lr[:tiles], size=hr.shape[-2:], mode="nearest")
            rows = [list(t) for t in zip(up, bicubic[:tiles], sr[:tiles], hr[:tiles], strict=True)]
        return BatchResult(
            {"loss": loss, **image_metrics(names, sr, hr)}, image_metrics(names, bicubic, hr), rows
        )

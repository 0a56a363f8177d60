"""One pass over a validation split: per-sample metrics (model and bicubic) and a sample grid."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.data.degrade import upscale_bicubic
from toolkit.metrics import MetricAccumulator, per_image

if TYPE_CHECKING:
    from toolkit.recipe import Recipe

GRID_SAMPLES = 4  # val samples shown in the TensorBoard image grid


@dataclass
class Validation:
    model: MetricAccumulator  # per-sample metrics of the model ("loss", and mse/psnr/ssim for SR)
    bicubic: MetricAccumulator | None  # the bicubic baseline on the same inputs (SR only)
    grid_rows: list[list[torch.Tensor]]  # tiles for the image grid, from this rank's first batch

    def gathered(self) -> Validation:
        """Every rank's per-sample metrics, on every rank (collective)."""
        bicubic = self.bicubic.gather() if self.bicubic is not None else None
        return Validation(self.model.gather(), bicubic, self.grid_rows)


def mask_noise(keys: Iterable[str], patches: int, seed: int) -> torch.Tensor:
    """Masking noise for validation, fixed per sample key: the same masks whatever the number of
    ranks or the batch a sample lands in, and no draw from the training RNG streams."""
    rows = []
    for key in keys:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        rows.append(torch.rand(patches, generator=g))
    return torch.stack(rows)  # [N, L]


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    stage: str,
    scale: int,
    loss_name: str,
    seed: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    dtype: torch.dtype = torch.float32,
    grid_samples: int = GRID_SAMPLES,
) -> Validation:
    """Evaluate `model` (unwrapped: no DDP collectives, ranks may differ) on every valid sample.
    `dtype`: what the model takes as input (bf16 under DeepSpeed bf16); metrics are in fp32.
    The image grid shows the first `grid_samples` samples of this rank's first batch."""
    ours, base = MetricAccumulator(), (MetricAccumulator() if stage == "finetune" else None)
    grid: list[list[torch.Tensor]] = []
    for batch in batches:
        valid = batch["valid"]
        keys = [k for k, ok in zip(batch["key"], valid.tolist(), strict=True) if ok]
        hr = batch["hr"].to(device)
        if stage == "pretrain":
            patches = model.patchify(hr).shape[1]
            noise = mask_noise(batch["key"], patches, seed).to(device)
            with autocast():
                out = model(hr.to(dtype), noise=noise)
            target = model.patchify(hr)
            err = ((out.pred.float() - target) ** 2).mean(dim=-1)  # [N, L]
            per_sample = (err * out.mask).sum(1) / out.mask.sum(1).clamp(min=1)  # [N]
            ours.add(keys, {"loss": per_sample[valid.to(device)].double().cpu()})
            if not grid:
                recon = model.unpatchify(
                    out.pred.float() * out.mask[..., None] + target * (1 - out.mask[..., None])
                )
                masked = model.unpatchify(target * (1 - out.mask[..., None]))
                grid = [[m, r, h] for m, r, h in zip(masked, recon.clamp(0, 1), hr, strict=False)]
        else:
            lr = batch["lr"].to(device)
            with autocast():
                raw = model(lr.to(dtype))
            sr = raw.float().clamp(0, 1)
            bic = upscale_bicubic(lr, scale)
            loss = (F.l1_loss if loss_name == "l1" else F.mse_loss)(
                raw.float(), hr, reduction="none"
            ).mean(dim=(1, 2, 3))
            m = valid.to(device)
            ours.add(keys, {"loss": loss[m].double().cpu(), **_select(per_image(sr, hr), m)})
            base.add(keys, _select(per_image(bic, hr), m))
            if not grid:
                up = F.interpolate(lr, size=hr.shape[-2:], mode="nearest")
                grid = [list(t) for t in zip(up, bic, sr, hr, strict=False)]
        grid = grid[:grid_samples]
    return Validation(ours, base, [[t.cpu() for t in row] for row in grid])


def validate_run(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    r: Recipe,
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    dtype: torch.dtype = torch.float32,
    grid_samples: int = GRID_SAMPLES,
) -> Validation:
    """`validate` with the stage, scale, loss and masking seed of a run's recipe."""
    return validate(
        model,
        batches,
        stage=r.stage,
        scale=r.data.scale,
        loss_name=r.train.loss or "l1",
        seed=r.train.seed,
        device=device,
        autocast=autocast,
        dtype=dtype,
        grid_samples=grid_samples,
    )


def _select(values: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[mask.cpu()] for k, v in values.items()}


def eval_summary(result: Validation, split: str, stage: str) -> dict[str, Any]:
    """The evaluation as `eval.json` holds it (the layout DESIGN.md gives): means over every
    sample of the split for the model and bicubic, and per-image statistics (mean, median and
    the five worst keys) of each metric."""
    ours = result.model.summary()
    per_image = {"model": {n: result.model.stats(n) for n in result.model.names}}
    if result.bicubic is not None:
        per_image["bicubic"] = {n: result.bicubic.stats(n) for n in result.bicubic.names}
    return {
        "split": split,
        "count": result.model.count,
        "stage": stage,
        "model": {k: ours[k] for k in ("mse", "psnr", "ssim", "loss") if k in ours},
        "bicubic": result.bicubic.summary() if result.bicubic is not None else None,
        "per_image": per_image,
    }


def write_eval(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write an evaluation (a run's `eval.json`) atomically: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    return summary

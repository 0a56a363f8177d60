"""Masked-autoencoder pretraining: HR images in, the MAE's masked-patch MSE as loss and metric."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.core.schema import Recipe
from toolkit.tasks.base import BatchResult, Placement, Task


def mask_noise(keys: Iterable[str], patches: int, seed: int) -> Tensor:
    """Masking noise for evaluation, fixed per sample key: the same masks whatever the number of
    ranks or the batch a sample lands in, and no draw from the training RNG streams."""
    rows = []
    for key in keys:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        rows.append(torch.rand(patches, generator=g))
    return torch.stack(rows)  # [N, L]


class MAETask(Task):
    """The model (an MAE: `model(imgs, noise=...)` -> MAEOutput) masks patches by the noise and
    reconstructs them; its own per-sample loss (norm_pix_loss included) is the loss in training
    and in validation alike."""

    name = "mae"
    title = "masked-autoencoder pretraining"
    default_arch = "mae"
    fields = ("hr",)
    metrics = ("loss",)
    table = ("loss",)
    score = "loss"
    tiles = ("masked input", "reconstruction", "HR")
    scored_tiles = ("reconstruction",)
    loss_label = "loss (MSE on masked patches)"

    def __init__(self, r: Recipe) -> None:
        super().__init__(r)
        m: Any = r.model
        self.patches = (m.img_size // m.patch_size) ** 2

    @classmethod
    def problems(cls, r: Recipe) -> Iterator[tuple[str, str]]:
        if r.train.loss not in (None, "mse"):
            yield (
                "train.loss",
                "the mae task trains the MAE objective (MSE on masked patches): use null",
            )

    def losses(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, rng: torch.Generator | None
    ) -> tuple[Tensor, Any]:
        hr = batch["hr"].to(at.device, non_blocking=True)
        n = hr.shape[0]
        if rng is not None:  # on the CPU, so the masks do not depend on the device
            noise = torch.rand(n, self.patches, generator=rng)
        else:
            noise = mask_noise(batch["key"], self.patches, self.seed)
        if at.device.type == "cuda":  # page-locked: the copy does not wait for the device
            noise = noise.pin_memory()
        with at.autocast():
            out = model(hr, noise=noise.to(at.device, non_blocking=True))
        return out.sample_loss.float(), out

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batch: dict[str, Any], at: Placement, tiles: int
    ) -> BatchResult:
        loss, out = self.losses(model, batch, at, None)
        rows: list[list[Tensor]] = []
        if tiles:
            hr = batch["hr"][:tiles].to(at.device)
            target = model.patchify(hr)
            pred, mask = out.pred[:tiles].float(), out.mask[:tiles, :, None]
            recon = model.unpatchify(pred * mask + target * (1 - mask))
            masked = model.unpatchify(target * (1 - mask))
            rows = [list(t) for t in zip(masked, recon.clamp(0, 1), hr, strict=True)]
        return BatchResult({"loss": loss}, None, rows)

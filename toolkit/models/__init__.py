"""Models: the pretraining MAE and SR-MAE, built from the recipe's `model` section."""

from __future__ import annotations

from typing import Any

from torch import nn

from toolkit.models.mae import MAE, MAEOutput
from toolkit.models.srmae import SRMAE, LoadReport, apply_freeze, load_mae_weights, param_counts

__all__ = [
    "MAE",
    "SRMAE",
    "LoadReport",
    "MAEOutput",
    "apply_freeze",
    "build_model",
    "load_mae_weights",
    "param_counts",
]


def build_model(cfg: Any, stage: str, scale: int = 2) -> nn.Module:
    """MAE for stage "pretrain", SR-MAE (x`scale`) for "finetune".

    `cfg` is anything with the recipe's model fields as attributes (ModelConfig); the models
    do not import the recipe module.
    """
    vit = dict(
        in_chans=cfg.in_chans,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        decoder_embed_dim=cfg.decoder_embed_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
        mlp_ratio=cfg.mlp_ratio,
    )
    if stage == "pretrain":
        return MAE(**vit, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)
    if stage == "finetune":
        return SRMAE(**vit, sr_channels=cfg.sr_channels, scale=scale)
    raise ValueError(f"unknown stage {stage!r}; expected 'pretrain' or 'finetune'")

"""The masked autoencoder used for pretraining: random masking, encoder, decoder, masked loss."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from toolkit.core.schema import MAX_LAYERS, MAX_WIDTH, ModelBase, setting
from toolkit.models.registry import ModelSpec
from toolkit.models.vit import (
    SMALL_VIT,
    EncoderDecoder,
    patchify,
    unpatchify,
)

_VIT_FIELDS = ("in_chans", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
               "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio",
               "drop_path")  # fmt: skip


@dataclass
class MAEConfig(ModelBase):
    """The ViT MAE's recipe section (`model.arch: mae`); SR-MAE extends it."""

    # Side of a square ViT patch, in pixels.
    patch_size: int = setting(10, gt=0, le=MAX_WIDTH)
    # Encoder token width (the workload's embedding width).
    embed_dim: int = setting(256, gt=0, le=MAX_WIDTH)
    # Encoder transformer blocks.
    depth: int = setting(8, gt=0, le=MAX_LAYERS)
    # Encoder attention heads; must divide embed_dim.
    num_heads: int = setting(8, gt=0, le=MAX_WIDTH)
    # Decoder token width (the MAE's light decoder).
    decoder_embed_dim: int = setting(128, gt=0, le=MAX_WIDTH)
    # Decoder transformer blocks.
    decoder_depth: int = setting(4, gt=0, le=MAX_LAYERS)
    # Decoder attention heads; must divide decoder_embed_dim.
    decoder_num_heads: int = setting(4, gt=0, le=MAX_WIDTH)
    # Hidden width of each MLP as a multiple of the token width.
    mlp_ratio: float = setting(4.0, gt=0, le=MAX_LAYERS)
    # Stochastic depth of the encoder's blocks in training: the drop rate of the last block, the
    # earlier ones' rising linearly from 0 (timm's and the MAE finetuning's rule; 0.1 there for
    # ViT-B); 0: none, the model as before.
    drop_path: float = setting(0.0, ge=0, lt=1)
    # Fraction of patches hidden from the encoder during pretraining.
    mask_ratio: float = setting(0.75, ge=0, lt=1)
    # Pretraining target: each patch normalised by its own mean and variance.
    norm_pix_loss: bool = False

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.img_size % self.patch_size:
            yield (
                "img_size",
                f"{self.img_size} is not divisible by model.patch_size {self.patch_size}",
            )
        if self.embed_dim % self.num_heads:
            yield "num_heads", f"{self.num_heads} does not divide model.embed_dim {self.embed_dim}"
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            yield "embed_dim", "model.embed_dim and model.decoder_embed_dim must be multiples of 4"
        if self.decoder_embed_dim % self.decoder_num_heads:
            yield (
                "decoder_num_heads",
                (
                    f"{self.decoder_num_heads} does not divide model.decoder_embed_dim "
                    f"{self.decoder_embed_dim}"
                ),
            )

    def vit(self) -> dict[str, int | float]:
        """The keyword arguments of the ViT parts (encoder and decoder)."""
        return {name: getattr(self, name) for name in _VIT_FIELDS}


class MAEOutput(NamedTuple):
    # A NamedTuple rather than a dataclass: DDP, accelerate and torch.compile all walk tuples.
    loss: Tensor  # [] mean squared error over masked patches (the mean of sample_loss)
    pred: Tensor  # [N, L, p*p*C] prediction for every patch (in normalised units if norm_pix_loss)
    mask: Tensor  # [N, L] 1 = masked (hidden from the encoder), 0 = visible
    sample_loss: Tensor  # [N] each sample's loss: what validation reports per sample


class MAE(EncoderDecoder):
    """Masked autoencoder (He et al. 2021) for square C-channel images, built from scratch.

    State dict names: `encoder.*` (patch embedding, blocks, norm), `decoder.*` (embed, blocks,
    norm, pred) and `mask_token`. SR-MAE is built on the same `EncoderDecoder`, so a pretrain
    state dict loads into it by name; `mask_token` is the one MAE tensor SR-MAE
    has no use for. Position embeddings are non-persistent buffers (not in the state dict).
    """

    def __init__(self, mask_ratio: float = 0.75, norm_pix_loss: bool = False, **vit: Any) -> None:
        """`vit`: the encoder's and decoder's settings, EncoderDecoder's arguments."""
        super().__init__(**vit)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.decoder.embed.out_features))
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: Tensor) -> Tensor:
        return patchify(imgs, self.patch_size)  # [N, C, H, W] -> [N, L, p*p*C]

    def unpatchify(self, x: Tensor) -> Tensor:
        return unpatchify(x, self.patch_size, self.in_chans)  # [N, L, p*p*C] -> [N, C, H, W]

    @staticmethod
    def random_masking(
        x: Tensor,
        mask_ratio: float,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a random subset of tokens per sample by sorting noise.

        x: [N, L, D]. Keeps exactly int(L * (1 - mask_ratio)) tokens in every sample (the ones
        with the smallest noise). `noise` ([N, L]) or `generator` make it deterministic.
        Returns the kept tokens [N, L_keep, D], the mask [N, L] (1 = masked) and ids_restore
        [N, L], which puts a [kept, masked] sequence back in the original patch order.
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        n, seq, d = x.shape
        len_keep = int(seq * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, seq, generator=generator, device=x.device)  # [N, L]
        ids_shuffle = torch.argsort(noise, dim=1)  # [N, L] ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L] inverse permutation
        ids_keep = ids_shuffle[:, :len_keep]  # [N, L_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, L_keep, D]
        mask = torch.ones(n, seq, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [N, L] back in patch order
        return x_kept, mask, ids_restore

    def forward_encoder(
        self,
        imgs: Tensor,
        mask_ratio: float,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = self.encoder.embed(imgs)  # [N, L, D]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise, generator)
        return self.encoder(x), mask, ids_restore  # [N, L_keep, D], [N, L], [N, L]

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.decoder.embed(latent)  # [N, L_keep, Dd]
        n, len_keep, dd = x.shape
        seq = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(n, seq - len_keep, dd)  # [N, L - L_keep, Dd]
        x = torch.cat([x, mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # patch order
        return self.decoder(x)  # [N, L, p*p*C]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Each sample's mean squared error per patch, averaged over its masked patches only: [N].

        With nothing masked (mask_ratio 0) it averages over every patch instead, so the same
        model trains as a plain autoencoder (the benchmark's baseline) rather than giving 0/0.
        Every sample has the same number of masked patches, so the batch loss is the mean of
        these, and a validation sample's loss is exactly what training minimises for it.
        """
        target = self.patchify(imgs)  # [N, L, p*p*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L] per-patch MSE
        # Branch on a tensor, not on .item(), so there is no host sync on GPU.
        weight = torch.where(mask.sum() > 0, mask, torch.ones_like(mask))  # [N, L]
        return (loss * weight).sum(dim=1) / weight.sum(dim=1)

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise, generator)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        per_sample = self.forward_loss(imgs, pred, mask)  # [N]
        return MAEOutput(per_sample.mean(), pred, mask, per_sample)


def build(cfg: MAEConfig) -> MAE:
    return MAE(**cfg.vit(), mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)


SPEC = ModelSpec("mae", MAEConfig, build, tasks=("mae",), title="MAE", layer_decay=True,
                 small=SMALL_VIT)  # fmt: skip

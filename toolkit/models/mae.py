"""The masked autoencoder used for pretraining: random masking, encoder, decoder, masked loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from toolkit.models.vit import Decoder, Encoder, init_vit_weights, patchify, unpatchify


class MAEOutput(NamedTuple):
    # A NamedTuple rather than a dataclass: DDP, accelerate and torch.compile all walk tuples.
    loss: Tensor  # [] mean squared error over masked patches
    pred: Tensor  # [N, L, p*p*C] prediction for every patch (in normalised units if norm_pix_loss)
    mask: Tensor  # [N, L] 1 = masked (hidden from the encoder), 0 = visible


class MAE(nn.Module):
    """Masked autoencoder (He et al. 2021) for square C-channel images, built from scratch.

    State dict names: `encoder.*` (patch embedding, blocks, norm), `decoder.*` (embed, blocks,
    norm, pred) and `mask_token`. SR-MAE reuses the `encoder` and `decoder` modules unchanged,
    so a pretrain state dict loads into it by name; `mask_token` is the one MAE tensor SR-MAE
    has no use for. Position embeddings are non-persistent buffers (not in the state dict).
    """

    def __init__(
        self,
        in_chans: int = 1,
        img_size: int = 150,
        patch_size: int = 10,
        embed_dim: int = 256,
        depth: int = 8,
        num_heads: int = 8,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 4,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.encoder = Encoder(
            in_chans, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio
        )
        self.decoder = Decoder(
            in_chans,
            img_size,
            patch_size,
            embed_dim,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
            mlp_ratio,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        init_vit_weights(self)
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
        """Mean squared error per patch, averaged over the masked patches only.

        With nothing masked (mask_ratio 0) it averages over every patch instead, so the same
        model trains as a plain autoencoder (the benchmark's baseline) rather than giving 0/0.
        """
        target = self.patchify(imgs)  # [N, L, p*p*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L] per-patch MSE
        # Branch on a tensor, not on .item(), so there is no host sync on GPU.
        weight = torch.where(mask.sum() > 0, mask, torch.ones_like(mask))  # [N, L]
        return (loss * weight).sum() / weight.sum()

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
        return MAEOutput(self.forward_loss(imgs, pred, mask), pred, mask)

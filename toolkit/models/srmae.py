"""SR-MAE: the pretrained MAE wrapped in convolution/deconvolution layers for super-resolution.

LR image [N, C, h, h] (h = img_size // scale) -> HR image [N, C, H, H] (H = img_size):

    base = bicubic(lr)                                         the skip both residuals sit on
    f    = relu(sr.body(relu(sr.head(lr))))                    3x3 then 5x5 conv, at LR
    u    = base + sr.to_img(relu(sr.up(f)))                    4x4 deconv to H x H, to image
    m    = unpatchify(decoder(encoder(u)))                     the MAE on all patches, no mask
    out  = base + sr.tail(relu(sr.fuse([u, m])))               3x3 + 3x3 refinement at HR

Why this shape: the wide layers work at LR and the deconvolution upsamples late (as in
FSRCNN/EDSR), so the SR layers cost about a third of what the same parameters would at HR;
the MAE sees an image close to the HR images it was pretrained on (u starts near bicubic, since
`to_img` and `tail` start small); the two HR convolutions (5x5 receptive field) span patch
borders, where an unpatchified prediction has seams. Every parameter takes part in forward
(DDP needs that), so the MAE's mask token is not a parameter here: loading a pretrained MAE
(`toolkit.models.params.load_weights`) reports it as unused.

Parameters at the workload's width (C=1, embed 256, depth 8, decoder 128 x 4, patch 10,
sr_channels 64; the same at scale 2, 3 and 4):
    MAE (pretrain, with mask token)              7,183,716   (write-up: 7.25M)
    SR-MAE, all (no mask token)                  7,354,662   (write-up: 7.38M)
    SR-MAE, encoder frozen: decoder + sr.*       1,010,214   (write-up: 996K)
    SR-MAE, MAE frozen: sr.* only                  171,074   (write-up: 167.7K)
    sr.*: head 640, body 102,464, up 65,600, to_img 577, fuse 1,216, tail 577
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.core.schema import MAX_WIDTH, setting
from toolkit.models.mae import MAEConfig
from toolkit.models.registry import ModelSpec
from toolkit.models.vit import SMALL_VIT, EncoderDecoder, unpatchify


def _deconv_padding(lr_size: int, hr_size: int, scale: int, kernel: int) -> tuple[int, int]:
    """(padding, output_padding) so a stride-`scale` deconv maps lr_size exactly to hr_size."""
    # out = (lr - 1) * s - 2p + k + op; hr may exceed lr * s by a remainder (150 = 37 * 4 + 2).
    rest = hr_size - (lr_size - 1) * scale - kernel  # = op - 2p
    pad = max(0, -(rest // 2))
    out_pad = rest + 2 * pad
    if not 0 <= out_pad < scale:
        raise ValueError(f"no deconvolution maps {lr_size} to {hr_size} at scale {scale}")
    return pad, out_pad


class SRLayers(nn.Module):
    """The convolution/deconvolution layers added around the MAE (the `sr.*` parameters)."""

    def __init__(self, in_chans: int, channels: int, lr_size: int, hr_size: int, scale: int):
        super().__init__()
        c, f = in_chans, channels
        # Kernel 4 for scales 2-4 keeps the parameter count independent of the scale.
        kernel = max(4, scale)
        pad, out_pad = _deconv_padding(lr_size, hr_size, scale, kernel)
        self.head = nn.Conv2d(c, f, 3, padding=1)  # at LR
        self.body = nn.Conv2d(f, f, 5, padding=2)  # at LR
        self.up = nn.ConvTranspose2d(
            f, f, kernel, stride=scale, padding=pad, output_padding=out_pad
        )
        self.to_img = nn.Conv2d(f, c, 3, padding=1)  # at HR, from here on
        self.fuse = nn.Conv2d(2 * c, f, 3, padding=1)
        self.tail = nn.Conv2d(f, c, 3, padding=1)
        # Residual outputs start small, so at init u and the output are close to bicubic and
        # the frozen MAE sees in-distribution images from the first step.
        for conv in (self.to_img, self.tail):
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)


class SRMAE(EncoderDecoder):
    """MAE encoder + decoder between convolution/deconvolution layers; LR in, HR out."""

    def __init__(self, sr_channels: int = 64, scale: int = 2, **vit: Any) -> None:
        """`vit`: the encoder's and decoder's settings, EncoderDecoder's arguments."""
        if scale < 2:
            raise ValueError(f"scale must be 2 or more, got {scale}")
        super().__init__(**vit)
        self.scale = scale
        self.lr_size = self.img_size // scale
        self.sr = SRLayers(self.in_chans, sr_channels, self.lr_size, self.img_size, scale)

    def forward(self, lr: Tensor) -> Tensor:
        """[N, C, h, h] -> [N, C, H, H], unclamped (clamping would zero gradients at 0 and 1)."""
        if lr.shape[-2:] != (self.lr_size, self.lr_size):
            raise ValueError(
                f"SR-MAE (img_size {self.img_size}, scale {self.scale}) expects "
                f"{self.lr_size}x{self.lr_size} inputs, got {tuple(lr.shape[-2:])}"
            )
        sr = self.sr
        hr = (self.img_size, self.img_size)
        base = F.interpolate(lr, size=hr, mode="bicubic", align_corners=False)  # [N, C, H, H]
        feats = F.relu(sr.body(F.relu(sr.head(lr))))  # [N, F, h, h]
        u = base + sr.to_img(F.relu(sr.up(feats)))  # [N, C, H, H]
        tokens = self.encoder(self.encoder.embed(u))  # [N, L, D]: every patch, no masking
        patches = self.decoder(self.decoder.embed(tokens))  # [N, L, p*p*C]
        m = unpatchify(patches, self.patch_size, self.in_chans)  # [N, C, H, H]
        x = F.relu(sr.fuse(torch.cat([u, m], dim=1)))  # [N, F, H, H]
        return base + sr.tail(x)  # [N, C, H, H]

    def predict(self, lr: Tensor) -> Tensor:
        """Inference output for [0, 1] images: forward, clamped to [0, 1], no graph."""
        with torch.no_grad():
            return self(lr).clamp_(0.0, 1.0)


@dataclass
class SRMAEConfig(MAEConfig):
    """SR-MAE's recipe section (`model.arch: srmae`): the MAE's, plus the added layers' width.
    mask_ratio and norm_pix_loss are the pretraining's (SR-MAE masks nothing); they are accepted so
    that one model section serves every stage of the workload."""

    # Channels of the convolution/deconvolution layers added for super-resolution.
    sr_channels: int = setting(64, gt=0, le=MAX_WIDTH)


def build(cfg: SRMAEConfig, scale: int = 2) -> SRMAE:
    return SRMAE(**cfg.vit(), sr_channels=cfg.sr_channels, scale=scale)


SPEC = ModelSpec(
    "srmae",
    SRMAEConfig,
    build,
    tasks=("sr",),
    title="SR-MAE",
    # The workload's finetune modes: "mae" is everything but the added sr.* layers.
    freeze_modes={"encoder": ("encoder.",), "mae": ("encoder.", "decoder.")},
    fixed_size=True,  # the ViT's position embeddings are for img_size x img_size
    layer_decay=True,
    small={**SMALL_VIT, "sr_channels": 8},
)

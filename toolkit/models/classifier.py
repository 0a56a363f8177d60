"""Classifiers for the classify task: the MAE's ViT encoder with a linear head, and a small CNN.

    vit_classifier  image [N, C, H, H] -> encoder (the MAE's, all patches, no mask) -> mean of
                    the tokens -> (head_norm: batch norm, no affine) -> linear head -> logits
                    [N, num_classes]
    cnn             depth x (3x3 conv, batch norm, ReLU, 2x2 max pool; channels doubling) ->
                    global mean -> linear -> logits

The ViT classifier's encoder has the MAE's parameter names (`encoder.*`), so `init.from` a
pretraining run loads it (the MAE's decoder and mask token are reported unused, the head is
fresh), and `freeze: [encoder]` is a linear probe. Its recipe section is the MAE's (the same
model section serves the pretraining and the classification), plus `num_classes`. The tokens
are averaged rather than read from a class token: the MAE trains none, and the mean of its
encoder's tokens is what linear probes of MAE encoders use. The linear probe's recipe puts a
batch norm without affine parameters before the head (`model.head_norm`), as the MAE's linear
probing does: the frozen features' scales differ widely between channels, and normalising them
lets one learning rate suit every channel of the head (it adds no parameters, and a linear
layer after it could absorb its affine part anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.core.schema import MAX_LAYERS, MAX_WIDTH, ModelBase, setting
from toolkit.models.mae import MAEConfig
from toolkit.models.registry import ModelSpec
from toolkit.models.vit import SMALL_VIT, Encoder, EncoderLayers, init_vit_weights


@dataclass
class ViTClassifierConfig(MAEConfig):
    """`model.arch: vit_classifier`: the MAE's section (its decoder settings unused) and the
    number of classes."""

    # Classes the head scores (the shards' `classes`, in their order).
    num_classes: int = setting(3, ge=2, le=MAX_WIDTH)
    # Batch norm without affine parameters (eps 1e-6) on the mean token before the head, as the
    # MAE's linear probe has (recipes/classify/linear_probe.yaml sets it); false: none, the
    # classifier as before (a run trained without it records false and its weights load).
    head_norm: bool = False


class ProbeNorm(nn.BatchNorm1d):
    """The linear probe's BatchNorm1d(affine=False, eps=1e-6), computed in fp32 and returned in
    the input's dtype: under DeepSpeed's bf16 the features arrive in bf16 beside the fp32
    running statistics, and statistics need fp32's precision. In fp32 it is plain
    BatchNorm1d."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=1e-6, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


class ViTClassifier(EncoderLayers, nn.Module):
    def __init__(self, cfg: ViTClassifierConfig) -> None:
        super().__init__()
        self.encoder = Encoder(cfg.in_chans, cfg.img_size, cfg.patch_size, cfg.embed_dim,
                               cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path)  # fmt: skip
        init_vit_weights(self.encoder)
        # Its own name beside `head` (not a Sequential around it): `head.weight` keeps its name,
        # so the weights of classifiers trained before it load.
        self.head_norm: nn.Module = ProbeNorm(cfg.embed_dim) if cfg.head_norm else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        # A small head at init: the first steps of a linear probe do not swing far (MAE's
        # probe uses the same trick, with std 0.01).
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: Tensor) -> Tensor:
        tokens = self.encoder(self.encoder.embed(imgs))  # [N, L, D]
        return self.head(self.head_norm(tokens.mean(dim=1)))  # [N, num_classes]


@dataclass
class CNNConfig(ModelBase):
    """`model.arch: cnn`: the from-scratch baseline of the classify task."""

    # Channels of the first convolution; each block doubles them.
    channels: int = setting(16, gt=0, le=MAX_WIDTH)
    # Convolution blocks, each halving the image side.
    depth: int = setting(4, gt=0, le=MAX_LAYERS)
    # Classes the head scores.
    num_classes: int = setting(3, ge=2, le=MAX_WIDTH)


class FloatBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose weights may be cast to bf16 (DeepSpeed's bf16 casts parameters, not
    buffers): it then normalises in fp32 with fp32 weights and running statistics (batch_norm
    refuses bf16 weights beside fp32 statistics, and statistics need fp32's precision, which is
    why mixed precision keeps normalisation in fp32) and returns the input's dtype. With fp32
    weights (fp32 training, or DDP under autocast) it is plain BatchNorm2d."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype == torch.float32:
            return super().forward(x)
        if self.training:
            self.num_batches_tracked.add_(1)  # type: ignore[operator]
        with torch.autocast(x.device.type, enabled=False):
            y = F.batch_norm(
                x.float(), self.running_mean, self.running_var, self.weight.float(),
                self.bias.float(), self.training, self.momentum, self.eps,
            )  # fmt: skip
        return y.to(x.dtype)


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c = cfg.in_chans, cfg.channels
        for _ in range(cfg.depth):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), FloatBatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]  # fmt: skip
            c_in, c = c, 2 * c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, cfg.num_classes)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.head(self.body(imgs).mean(dim=(2, 3)))


VIT_SPEC = ModelSpec(
    "vit_classifier",
    ViTClassifierConfig,
    lambda cfg: ViTClassifier(cfg),
    tasks=("classify",),
    title="ViT (MAE encoder)",
    freeze_modes={"encoder": ("encoder.",)},  # a linear probe
    fixed_size=True,
    layer_decay=True,
    small=SMALL_VIT,
)
CNN_SPEC = ModelSpec("cnn", CNNConfig, lambda cfg: CNN(cfg), tasks=("classify",), title="CNN",
                     small=dict(img_size=32, channels=8, depth=2))  # fmt: skip

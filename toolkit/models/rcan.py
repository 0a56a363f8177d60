"""RCAN (Zhang et al. 2018): residual groups of channel-attention blocks, an attention baseline.

    LR -> head conv -> n_resgroups x group -> conv, + head's output -> upsampler -> tail conv -> HR
    group = n_resblocks x RCAB -> conv, + the group's input              (residual in residual)
    RCAB  = conv, ReLU, conv, channel attention, + the block's input
    channel attention = x * sigmoid(conv1x1(ReLU(conv1x1(global mean pool(x)))))  (C -> C/r -> C)

The long and short skips let the body learn only what bicubic-like features lack; the channel
attention reweights feature maps by their global statistics, the "attention mechanism" SR-MAE's
write-up names as its next step. Head, upsampler and tail are EDSR's. Fully convolutional.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from toolkit.core.schema import MAX_LAYERS, MAX_WIDTH, ModelBase, setting
from toolkit.models.edsr import ResidualSR, conv3x3
from toolkit.models.registry import ModelSpec


@dataclass
class RCANConfig(ModelBase):
    """RCAN's recipe section (`model.arch: rcan`); img_size is the HR side of training crops."""

    # Feature channels of every convolution between head and tail.
    n_feats: int = setting(64, gt=0, le=MAX_WIDTH)
    # Residual groups in the body.
    n_resgroups: int = setting(10, gt=0, le=MAX_LAYERS)
    # Channel-attention blocks per group.
    n_resblocks: int = setting(20, gt=0, le=MAX_LAYERS)
    # Channel attention squeezes n_feats to n_feats / reduction.
    reduction: int = setting(16, gt=0, le=MAX_WIDTH)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.n_feats % self.reduction:
            yield "reduction", f"{self.reduction} does not divide model.n_feats {self.n_feats}"


class ChannelAttention(nn.Module):
    def __init__(self, n_feats: int, reduction: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(n_feats, n_feats // reduction, 1)
        self.excite = nn.Conv2d(n_feats // reduction, n_feats, 1)

    def forward(self, x: Tensor) -> Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)  # [N, C, 1, 1]
        return x * self.excite(self.squeeze(w).relu()).sigmoid()


class RCAB(nn.Module):
    """Residual channel-attention block."""

    def __init__(self, n_feats: int, reduction: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(n_feats, n_feats)
        self.conv2 = conv3x3(n_feats, n_feats)
        self.attention = ChannelAttention(n_feats, reduction)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attention(self.conv2(self.conv1(x).relu()))


class ResidualGroup(nn.Module):
    def __init__(self, n_feats: int, n_resblocks: int, reduction: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(RCAB(n_feats, reduction) for _ in range(n_resblocks)), conv3x3(n_feats, n_feats)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.blocks(x)


def build(cfg: RCANConfig, scale: int = 2) -> ResidualSR:
    groups = [
        ResidualGroup(cfg.n_feats, cfg.n_resblocks, cfg.reduction) for _ in range(cfg.n_resgroups)
    ]
    return ResidualSR(cfg.in_chans, scale, cfg.n_feats, groups)


SMALL = dict(img_size=32, n_feats=8, n_resgroups=1, n_resblocks=1, reduction=4)
SPEC = ModelSpec("rcan", RCANConfig, build, tasks=("sr",), title="RCAN", small=SMALL)

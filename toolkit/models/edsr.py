"""EDSR (Lim et al. 2017), the residual CNN baseline for super-resolution.

    LR [N, C, h, w] -> head (3x3 conv to n_feats)
                    -> body: n_resblocks x (conv, ReLU, conv, x res_scale, + skip), conv,
                       plus the head's output
                    -> upsampler: (conv to n_feats * r^2, pixel shuffle r) per factor r of the scale
                    -> tail (3x3 conv to C)                                 -> HR [N, C, h*s, w*s]

No batch norm (it removes the range flexibility SR needs and costs memory), a learned
sub-pixel upsampler at the end, so every residual block works at LR. The RGB mean shift of the
original is left out: the inputs here are not natural-image RGB. Fully convolutional: any input
size works. Parameters: 2 * 9 * n_feats^2 per block; at n_feats 64 and 16 blocks (EDSR-baseline)
1.37M for one channel at scale 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from toolkit.core.schema import MAX_LAYERS, MAX_WIDTH, ModelBase, setting
from toolkit.models.registry import ModelSpec


@dataclass
class EDSRConfig(ModelBase):
    """EDSR's recipe section (`model.arch: edsr`); img_size is the HR side of training crops."""

    # Feature channels of every convolution between head and tail.
    n_feats: int = setting(64, gt=0, le=MAX_WIDTH)
    # Residual blocks in the body.
    n_resblocks: int = setting(16, gt=0, le=MAX_LAYERS)
    # Each block's residual is multiplied by this before the skip (EDSR's large models use 0.1).
    res_scale: float = setting(1.0, gt=0)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class ResBlock(nn.Module):
    """conv-ReLU-conv, scaled, plus the input; no batch norm."""

    def __init__(self, n_feats: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = conv3x3(n_feats, n_feats)
        self.conv2 = conv3x3(n_feats, n_feats)
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x).relu()) * self.res_scale


def _factors(scale: int) -> list[int]:
    """Pixel-shuffle stages for a scale: 2 -> [2], 3 -> [3], 4 -> [2, 2], 8 -> [2, 2, 2]."""
    if scale & (scale - 1) == 0:
        return [2] * (scale.bit_length() - 1)
    if scale == 3:
        return [3]
    raise ValueError(f"scale {scale}: expected 2, 3, 4 or 8")


class Upsampler(nn.Sequential):
    """Sub-pixel convolution (Shi et al. 2016): conv to n_feats * r^2 channels, shuffle by r."""

    def __init__(self, scale: int, n_feats: int) -> None:
        layers: list[nn.Module] = []
        for r in _factors(scale):
            layers += [conv3x3(n_feats, n_feats * r * r), nn.PixelShuffle(r)]
        super().__init__(*layers)


class ResidualSR(nn.Module):
    """head conv -> body, + the head's output (the long skip) -> upsampler -> tail conv: the frame
    EDSR and RCAN share; they differ in the body, which keeps n_feats channels at LR."""

    def __init__(self, in_chans: int, scale: int, n_feats: int, body: list[nn.Module]) -> None:
        super().__init__()
        self.scale = scale
        self.head = conv3x3(in_chans, n_feats)
        self.body = nn.Sequential(*body, conv3x3(n_feats, n_feats))
        self.upsample = Upsampler(scale, n_feats)
        self.tail = conv3x3(n_feats, in_chans)

    def forward(self, lr: Tensor) -> Tensor:
        """[N, C, h, w] -> [N, C, h*scale, w*scale], unclamped."""
        x = self.head(lr)
        x = x + self.body(x)
        return self.tail(self.upsample(x))


def build(cfg: EDSRConfig, scale: int = 2) -> ResidualSR:
    blocks = [ResBlock(cfg.n_feats, cfg.res_scale) for _ in range(cfg.n_resblocks)]
    return ResidualSR(cfg.in_chans, scale, cfg.n_feats, blocks)


SPEC = ModelSpec("edsr", EDSRConfig, build, tasks=("sr",), title="EDSR",
                 small=dict(img_size=32, n_feats=8, n_resblocks=1))  # fmt: skip

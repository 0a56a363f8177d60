"""Resampling between resolutions: HR -> LR degradation, and the bicubic upscaling baseline."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Resample = Callable[..., torch.Tensor]


def _batched(fn: Resample) -> Resample:
    """Accept one image [C, H, W] as well as a batch [N, C, H, W]."""

    def wrapper(x: torch.Tensor, scale: int, clamp: bool = True) -> torch.Tensor:
        single = x.dim() == 3
        out = fn(x.unsqueeze(0) if single else x, scale, clamp)
        return out.squeeze(0) if single else out

    return wrapper


@_batched
def degrade(hr: torch.Tensor, scale: int, clamp: bool = True) -> torch.Tensor:
    """HR [.., C, H, W] -> LR of side H/scale: bicubic with antialiasing (no aliasing of fine
    structure into the LR input, as a real lower-resolution camera would not alias). `clamp`:
    the values lie in [0, 1], and the kernel's overshoot is clamped back there."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by scale {scale}")
    lr = F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", antialias=True)
    return lr.clamp_(0.0, 1.0) if clamp else lr


@_batched
def upscale_bicubic(lr: torch.Tensor, scale: int, clamp: bool = True) -> torch.Tensor:
    """LR [.., C, h, w] -> bicubic upscaling to h*scale: the baseline every SR model must beat.
    `clamp`: as for `degrade`."""
    h, w = lr.shape[-2:]
    up = F.interpolate(lr, size=(h * scale, w * scale), mode="bicubic", align_corners=False)
    return up.clamp_(0.0, 1.0) if clamp else up

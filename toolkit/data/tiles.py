"""Super-resolution of images of any size in overlapping tiles, cross-faded where they overlap.

Along each axis, tiles of `tile` LR pixels start evenly spread from the image's first pixel to
its last, neighbours sharing at least `overlap` pixels. In what two tiles share, the outer
quarter next to each tile's edge gets weight 0 (there the tile's own zero padding, not the
image, decided the output), and the middle half cross-fades with a raised cosine
(sin^2 + cos^2 = 1, so the weights of the two tiles sum to 1 and no seam is brightened or
dimmed). Image borders keep weight 1: there the whole image would be padded the same way. A
fully convolutional model whose receptive field reaches no further than the quarter overlap
gives, tiled, exactly what it gives on the whole image.

A model with a fixed input size (the ViT inside SR-MAE) gets tiles of that size; an image
smaller than a tile is padded by reflection (a continuation of its own content, not a black
frame the model never saw) and the padding is cut from the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Tiling:
    tile: int  # LR side of a tile; 0: the whole image at once (fully convolutional models)
    overlap: int  # LR pixels that neighbouring tiles share at least
    fixed: bool = False  # the model takes tile x tile inputs only: smaller images are padded


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """First pixels of the tiles covering `length`, evenly spread, the last ending at the end."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp(size: int, scale: int, overlap: int) -> Tensor:
    """Weights of the `size` output pixels from a tile's inner edge inwards (1 past the ramp)."""
    margin = scale * (overlap // 4)
    fade = scale * overlap - 2 * margin
    k = torch.arange(size, dtype=torch.float32)
    t = ((k - margin + 0.5) / max(fade, 1)).clamp(0.0, 1.0)
    w = torch.sin(t * (math.pi / 2)) ** 2
    return torch.where(k < margin, 0.0, w) if fade else torch.ones(size, dtype=torch.float32)


def _profile(size: int, scale: int, overlap: int, first: bool, last: bool) -> Tensor:
    w = torch.ones(size, dtype=torch.float32)
    if not first:
        w = w * ramp(size, scale, overlap)
    if not last:
        w = w * ramp(size, scale, overlap).flip(0)
    return w


class Canvas:
    """One image's output, assembled from the outputs of its tiles."""

    def __init__(self, lr: Tensor, scale: int, tiling: Tiling, tag: Any = None) -> None:
        c, h, w = lr.shape
        self.tag, self.scale, self.size = tag, scale, (h, w)
        t = tiling.tile
        if tiling.fixed and (h < t or w < t):  # reflect where it can, repeat past that
            lr = _pad_to(lr, t)
        ph, pw = lr.shape[-2:]
        th, tw = (ph, pw) if t == 0 else (min(t, ph), min(t, pw))
        self.lr = lr
        self.pieces = [(y, x) for y in starts(ph, th, tiling.overlap)
                       for x in starts(pw, tw, tiling.overlap)]  # fmt: skip
        self.tile = (th, tw)
        self.overlap = tiling.overlap
        self.out = torch.zeros(c, ph * scale, pw * scale, dtype=torch.float32)
        self.weight = torch.zeros(1, ph * scale, pw * scale, dtype=torch.float32)
        self.missing = len(self.pieces)

    def tiles(self) -> Iterator[tuple[int, Tensor]]:
        th, tw = self.tile
        for i, (y, x) in enumerate(self.pieces):
            yield i, self.lr[:, y : y + th, x : x + tw]

    def add(self, index: int, out: Tensor) -> None:
        """The model's output for tile `index`, [C, th*scale, tw*scale]."""
        s, (th, tw), (y, x) = self.scale, self.tile, self.pieces[index]
        ph, pw = self.lr.shape[-2:]
        wy = _profile(th * s, s, self.overlap, y == 0, y + th == ph)
        wx = _profile(tw * s, s, self.overlap, x == 0, x + tw == pw)
        w = wy[:, None] * wx[None, :]
        region = (slice(None), slice(y * s, (y + th) * s), slice(x * s, (x + tw) * s))
        self.out[region] += out.float() * w
        self.weight[region] += w
        self.missing -= 1

    @property
    def done(self) -> bool:
        return self.missing == 0

    def result(self) -> Tensor:
        """The blended output [C, H*scale, W*scale] float32, padding cut off."""
        h, w = self.size
        return (self.out / self.weight)[:, : h * self.scale, : w * self.scale]


def _pad_to(lr: Tensor, size: int) -> Tensor:
    h, w = lr.shape[-2:]
    while h < size or w < size:
        dy, dx = min(size - h, h - 1), min(size - w, w - 1)
        if dy <= 0 and dx <= 0:  # a one-pixel side: nothing to reflect
            return F.pad(lr[None], (0, size - w, 0, size - h), mode="replicate")[0]
        lr = F.pad(lr[None], (0, max(dx, 0), 0, max(dy, 0)), mode="reflect")[0]
        h, w = lr.shape[-2:]
    return lr


def assemble(
    canvases: Iterable[Canvas], forward: Callable[[Tensor], Tensor], batch: int
) -> Iterator[Canvas]:
    """Run the tiles of each canvas through `forward` ([N, C, h, w] -> [N, C, h*s, w*s]), up
    to `batch` at a time, and yield the canvas once all its tiles are in. An image's tiles are
    never batched with another image's: which batch, and which place in it, a tile gets then
    depends on its own image alone, and so do the output's bits (matrix kernels round
    differently for other batch sizes and rows), whichever files a process was given."""
    for canvas in canvases:
        tiles = list(canvas.tiles())
        for first in range(0, len(tiles), batch):
            chunk = tiles[first : first + batch]
            outs = forward(torch.stack([t for _, t in chunk]))
            for (i, _), out in zip(chunk, outs, strict=True):
                canvas.add(i, out)
        yield canvas

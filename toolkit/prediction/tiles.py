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
frame the model never saw) and the padding is cut from the output. Such a model sees nothing
beyond its tile, so what it predicts for a pixel depends on where the tile's edges fall (not
a seam: a different answer everywhere); `shifts` averages tilings offset from each other by a
fraction of a step (measured on the demo SR-MAE: two tilings half a step apart differ by a
third of the model's error alone, by a twentieth when each is the average of two).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tiling:
    tile: int  # LR side of a tile; 0: the whole image at once (fully convolutional models)
    overlap: int  # LR pixels that neighbouring tiles share at least
    fixed: bool = False  # the model takes tile x tile inputs only: smaller images are padded
    # Tilings averaged, each offset from the last by 1/shifts of a tile step: a model whose
    # output depends on where a tile's edges fall (a ViT sees only its tile) varies less.
    shifts: int = 1


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


def _mirror(n: int, before: int, after: int) -> Tensor:
    """Indices into an axis of `n` pixels for it padded by reflection (edge pixel not repeated,
    as far as it takes: the reflection of a reflection); a one-pixel axis is repeated."""
    i = torch.arange(-before, n + after)
    if n == 1:
        return torch.zeros_like(i)
    i = i.remainder(2 * (n - 1))
    return torch.where(i < n, i, 2 * (n - 1) - i)


@dataclass(frozen=True)
class _Piece:
    y: int
    x: int
    edges: tuple[bool, bool, bool, bool]  # first / last along y, first / last along x


class Canvas:
    """One image's output, assembled from the outputs of its tiles.

    The tiles live in a frame: the image padded by reflection by `m` on every side (m = 0 for
    one tiling), and on the bottom and right up to a fixed-size tile. Tiling k covers the image
    and k/shifts of a step around it; its tiles are evenly spread over that, so that its tile
    edges fall elsewhere than the other tilings'. What lies outside the image is cut off."""

    def __init__(self, lr: Tensor, scale: int, tiling: Tiling, tag: Any = None) -> None:
        c, h, w = lr.shape
        self.tag, self.scale, self.size, self.overlap = tag, scale, (h, w), tiling.overlap
        t = tiling.tile
        ph, pw = (max(h, t), max(w, t)) if tiling.fixed else (h, w)
        th, tw = (ph, pw) if t == 0 else (min(t, ph), min(t, pw))
        shifts = tiling.shifts if t and (ph > th or pw > tw) else 1
        offsets = [round(k * (t - tiling.overlap) / shifts) for k in range(shifts)]
        self.margin = m = offsets[-1]
        rows, cols = _mirror(h, m, m + ph - h), _mirror(w, m, m + pw - w)
        self.lr = lr[:, rows][:, :, cols] if len(rows) != h or len(cols) != w else lr
        self.tile = (th, tw)
        self.pieces = []
        for off in offsets:  # tiling k: the region [m - off, m + p + off) on each axis
            ly, lx = ph + 2 * off, pw + 2 * off
            for y in starts(ly, th, tiling.overlap):
                for x in starts(lx, tw, tiling.overlap):
                    edges = (y == 0, y + th == ly, x == 0, x + tw == lx)
                    self.pieces.append(_Piece(m - off + y, m - off + x, edges))
        fh, fw = self.lr.shape[-2:]
        self.out = torch.zeros(c, fh * scale, fw * scale, dtype=torch.float32)
        self.weight = torch.zeros(1, fh * scale, fw * scale, dtype=torch.float32)
        self.missing = len(self.pieces)

    def tiles(self) -> Iterator[tuple[int, Tensor]]:
        th, tw = self.tile
        for i, p in enumerate(self.pieces):
            yield i, self.lr[:, p.y : p.y + th, p.x : p.x + tw]

    def add(self, index: int, out: Tensor) -> None:
        """The model's output for tile `index`, [C, th*scale, tw*scale]."""
        s, (th, tw), p = self.scale, self.tile, self.pieces[index]
        wy = _profile(th * s, s, self.overlap, p.edges[0], p.edges[1])
        wx = _profile(tw * s, s, self.overlap, p.edges[2], p.edges[3])
        w = wy[:, None] * wx[None, :]
        region = (slice(None), slice(p.y * s, (p.y + th) * s), slice(p.x * s, (p.x + tw) * s))
        self.out[region] += out.float() * w
        self.weight[region] += w
        self.missing -= 1

    @property
    def done(self) -> bool:
        return self.missing == 0

    def result(self) -> Tensor:
        """The blended output [C, H*scale, W*scale] float32, padding cut off."""
        (h, w), s, m = self.size, self.scale, self.margin
        return (self.out / self.weight)[:, m * s : (m + h) * s, m * s : (m + w) * s]


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

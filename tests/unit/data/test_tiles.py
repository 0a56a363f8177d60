"""Tiled super-resolution: tiles cover the image evenly, the cross-fade sums to one and leaves
no step, a fully convolutional model gives what it gives on the whole image, a fixed-size model
only ever sees its size, and small images batch together."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit.models.edsr import EDSRConfig, build
from toolkit.prediction.tiles import Canvas, Tiling, assemble, ramp, starts


def run(x: torch.Tensor, tiling: Tiling, forward, scale: int = 2, batch: int = 4) -> torch.Tensor:
    return next(assemble([Canvas(x, scale, tiling)], forward, batch)).result()


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(450, 128, 24), (600, 100, 24), (129, 128, 0), (1000, 75, 18)]
)
def test_tiles_cover_the_axis_evenly_sharing_at_least_the_overlap(
    length: int, tile: int, overlap: int
) -> None:
    s = starts(length, tile, overlap)
    assert s[0] == 0 and s[-1] + tile == length
    shared = [a + tile - b for a, b in itertools.pairwise(s)]
    assert min(shared) >= overlap and max(shared) - min(shared) <= 1  # evenly spread
    assert starts(tile - 5, tile, overlap) == [0]


@pytest.mark.parametrize(("scale", "overlap"), [(2, 24), (3, 18), (4, 10)])
def test_the_two_weights_of_a_shared_strip_sum_to_one(scale: int, overlap: int) -> None:
    size = scale * overlap  # the strip two neighbours share, in output pixels
    up, down = ramp(size, scale, overlap), ramp(size, scale, overlap).flip(0)
    torch.testing.assert_close(up + down, torch.ones(size), rtol=0, atol=1e-6)
    margin = scale * (overlap // 4)
    assert up[:margin].eq(0).all() and down[-margin:].eq(0).all()  # next to a tile's own edge


def test_the_cross_fade_leaves_no_step_where_a_hard_seam_would() -> None:
    """A model whose output is a different constant on every tile: the blend is a smooth ramp
    between them (steps of at most a few percent), not the jump a seam without overlap gives."""
    x = torch.zeros(1, 60, 300)
    calls = iter(range(100))

    def constant(tiles: torch.Tensor) -> torch.Tensor:
        n, c, h, w = tiles.shape
        return torch.stack(
            [torch.full((c, 2 * h, 2 * w), float(next(calls) % 2)) for _ in range(n)]
        )

    blended = run(x, Tiling(64, 32), constant, batch=1)
    steps = blended[0, 30].diff().abs()
    assert 0.05 > steps.max() > 0  # tiles 0, 1, 0, 1...: the output fades between them
    calls = iter(range(100))
    # Without overlap, the strips the evenly spread tiles happen to share are averaged: a jump.
    assert run(x, Tiling(64, 0), constant, batch=1)[0, 30].diff().abs().max() >= 0.5


def test_a_fully_convolutional_model_tiled_equals_it_on_the_whole_image() -> None:
    """EDSR with one block sees 5.5 LR pixels around each output: an overlap of 24 (a
    discarded quarter of 6) makes tiling exact; one of 8 does not."""
    torch.manual_seed(0)
    model = build(EDSRConfig(arch="edsr", in_chans=3, n_feats=8, n_resblocks=1), scale=2).eval()
    x = torch.rand(3, 600, 450)
    with torch.no_grad():
        whole = model(x[None])[0]
        for tile in (128, 100):
            tiled = run(x, Tiling(tile, 24), model)
            torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
        assert (run(x, Tiling(128, 8), model) - whole).abs().max() > 1e-3


def test_a_fixed_size_model_gets_its_size_and_small_images_are_padded_unseen() -> None:
    """Nearest upsampling stands for a model that takes 16x16 inputs only: images smaller than a
    tile, or of any size above, come back as the upsampled image, padding cut off."""
    seen = set()

    def nearest(tiles: torch.Tensor) -> torch.Tensor:
        seen.add(tuple(tiles.shape[-2:]))
        return F.interpolate(tiles, scale_factor=2, mode="nearest")

    for h, w in [(5, 9), (1, 16), (16, 16), (40, 23)]:
        x = torch.rand(2, h, w)
        out = run(x, Tiling(16, 4, fixed=True), nearest)
        assert out.shape == (2, 2 * h, 2 * w)
        torch.testing.assert_close(
            out, F.interpolate(x[None], scale_factor=2)[0], rtol=0, atol=1e-6
        )
    assert seen == {(16, 16)}


def test_an_image_s_tiles_are_batched_by_themselves() -> None:
    """Up to `batch` tiles of one image per forward, never mixed with another image's, so an
    output is the same bits whatever other images a process predicts around it."""
    batches = []

    def forward(tiles: torch.Tensor) -> torch.Tensor:
        batches.append(len(tiles))
        return F.interpolate(tiles, scale_factor=3, mode="nearest")

    images = [torch.full((1, 8, 8), float(i)) for i in range(3)] + [torch.rand(1, 40, 40)]
    done = list(assemble((Canvas(x, 3, Tiling(16, 4), tag=i) for i, x in enumerate(images)),
                         forward, batch=4))  # fmt: skip
    assert [c.tag for c in done] == [0, 1, 2, 3]
    assert batches == [1, 1, 1, 4, 4, 1]  # the large image: 9 tiles
    assert all(c.result().eq(i).all() for i, c in enumerate(done[:3]))


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize(("before", "after"), [(0, 0), (2, 5), (9, 13)])
def test_the_frame_is_padded_by_reflection_as_numpy_does_it(
    n: int, before: int, after: int
) -> None:
    from toolkit.prediction.tiles import _mirror

    expect = np.pad(np.arange(n), (before, after), mode="reflect" if n > 1 else "edge")
    np.testing.assert_array_equal(_mirror(n, before, after).numpy(), expect)


def test_shifted_tilings_keep_exactness_and_average_out_where_edges_fall() -> None:
    """Two tilings (the second half a step off) of a fully convolutional model still give its
    whole-image output away from the border (where the shifted one sees reflection padding
    instead of the zeros the whole image is padded with). A model that adds a pattern fixed to
    the tile (as a ViT's answer depends on where in its tile a pixel is) deviates less with two
    than with one."""
    torch.manual_seed(0)
    model = build(EDSRConfig(arch="edsr", in_chans=1, n_feats=8, n_resblocks=1), scale=2).eval()
    x = torch.rand(1, 130, 170)
    with torch.no_grad():
        whole = model(x[None])[0]
        two = Canvas(x, 2, Tiling(48, 24, shifts=2))
        assert len(two.pieces) > len(Canvas(x, 2, Tiling(48, 24)).pieces) * 1.5
        tiled = next(assemble([two], model, 8)).result()
    inner = (slice(None), slice(12, -12), slice(12, -12))  # 6 LR pixels: the receptive field
    torch.testing.assert_close(tiled[inner], whole[inner], rtol=0, atol=1e-5)
    pattern = torch.rand(96, 96)  # added to every tile's output at the same place

    def patterned(tiles: torch.Tensor) -> torch.Tensor:
        return F.interpolate(tiles, scale_factor=2, mode="nearest") + pattern

    base = F.interpolate(x[None], scale_factor=2, mode="nearest")[0]
    spread = {k: (run(x, Tiling(48, 12, shifts=k), patterned) - base).std().item() for k in (1, 2)}
    assert spread[2] < 0.8 * spread[1], spread


def entering(size: int) -> np.ndarray:
    """The weight, written out, of the tile whose edge is at the start of a shared strip of
    `size` output pixels (size divisible by 4): 0 over the quarter next to its edge, a raised
    cosine sin^2(pi/2 t) over the middle half at pixel centres, t = (j - size/4 + 0.5) / (size/2),
    1 over the last quarter. The other tile's weight is its mirror image."""
    j = np.arange(size, dtype=np.float64)
    t = np.clip((j - size / 4 + 0.5) / (size / 2), 0, 1)
    return np.where(j < size / 4, 0.0, np.sin(np.pi / 2 * t) ** 2)


@pytest.mark.parametrize(("scale", "overlap"), [(2, 8), (3, 12)])
def test_the_cross_fade_of_four_tiles_against_its_formula(scale: int, overlap: int) -> None:
    """A 2 x 2 tiling whose neighbours share exactly `overlap` LR pixels: each tile's weight
    map, as Canvas.add accumulates it, is 1 away from the strips, 0 in the quarter of a strip
    next to its own edge, sin^2 / cos^2 in the middle half, the product of the two axes' weights
    where four tiles meet, and the weights of all tiles sum to 1 everywhere."""
    tile = 16
    side = 2 * tile - overlap  # two tiles per axis, sharing overlap pixels
    canvas = Canvas(torch.zeros(4, side, side), scale, Tiling(tile, overlap))
    assert [(p.y, p.x) for p in canvas.pieces] == [
        (0, 0), (0, tile - overlap), (tile - overlap, 0), (tile - overlap, tile - overlap)
    ]  # fmt: skip
    for i, _ in canvas.tiles():  # tile i answers 1 in channel i: out[i] is its weight map
        answer = torch.zeros(4, tile * scale, tile * scale)
        answer[i] = 1.0
        canvas.add(i, answer)
    weights = canvas.out.double().numpy()
    strip = scale * overlap
    lo = scale * (tile - overlap)  # the strip, in output pixels: [lo, lo + strip)
    up = entering(strip)
    # Along an axis: 1 before the strip, the mirrored ramp in it, absent (0) after it; the
    # tile after the strip is the mirror image.
    first = np.concatenate([np.ones(lo), up[::-1], np.zeros(scale * side - lo - strip)])
    second = first[::-1]
    expected = [np.outer(a, b) for a in (first, second) for b in (first, second)]
    # float32 sin and products against float64: rounding of 1e-7.
    np.testing.assert_allclose(weights, np.stack(expected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(canvas.weight[0].numpy(), 1.0, rtol=0, atol=1e-6)
    # Exact zeros next to each edge, and values at chosen pixels of the strip written out.
    q = strip // 4
    row = weights[1, 0, lo : lo + strip]  # tile (0, 1) along its top row: it enters the strip
    assert (row[:q] == 0).all() and row[q] > 0
    # The first and last pixel of the middle half, half a pixel into the fade (float32: 1e-7).
    assert row[q] == pytest.approx(np.sin(np.pi / 2 * 0.5 / (strip / 2)) ** 2, abs=1e-7)
    assert row[3 * q - 1] == pytest.approx(np.cos(np.pi / 2 * 0.5 / (strip / 2)) ** 2, abs=1e-7)
    # Either side of the strip's centre: sin^2(pi/4 - d) + sin^2(pi/4 + d) = 1.
    assert row[strip // 2 - 1] + row[strip // 2] == pytest.approx(1.0, abs=1e-6)
    assert (row[3 * q :] == 1).all()

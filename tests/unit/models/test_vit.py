"""ViT pieces: sin-cos position embedding values, patchify layout, attention wiring."""

import math

import pytest
import torch

from toolkit.models.vit import Attention, Encoder, patchify, sincos_pos_embed_2d, unpatchify


def test_pos_embed_matches_sincos_formula_on_2x2_grid() -> None:
    dim, grid = 8, 2
    k = dim // 4  # frequencies per (axis, sin/cos)
    expected = []
    for row in range(grid):
        for col in range(grid):
            vec = []
            for pos in (row, col):
                freqs = [10000 ** (-i / k) for i in range(k)]
                vec += [math.sin(pos * w) for w in freqs] + [math.cos(pos * w) for w in freqs]
            expected.append(vec)
    got = sincos_pos_embed_2d(dim, grid)
    assert got.shape == (grid * grid, dim)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    # Spot values that do not depend on the formula written above: token 3 is (row 1, col 1),
    # so its first channel is sin(1) and channel k (first cos) is cos(1).
    assert got[3, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert got[3, k].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    # Token 1 is (row 0, col 1): row half is sin(0)=0 / cos(0)=1, column half is not.
    assert got[1, :k].abs().max().item() == 0.0
    assert got[1, dim // 2].item() == pytest.approx(math.sin(1.0), abs=1e-6)


def test_pos_embed_rejects_width_not_multiple_of_4() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(10, 3)


def test_pos_embed_is_a_non_persistent_buffer() -> None:
    enc = Encoder(1, 20, 4, 32, 1, 4, 2.0)
    assert "pos_embed" in dict(enc.named_buffers())
    assert "pos_embed" not in dict(enc.named_parameters())
    assert "pos_embed" not in enc.state_dict()
    assert enc.pos_embed.shape == (1, 25, 32)
    # A model for another grid loads the same state dict (only the buffer depends on the grid).
    Encoder(1, 40, 4, 32, 1, 4, 2.0).load_state_dict(enc.state_dict())


@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_round_trip_and_layout(channels: int) -> None:
    p = 4
    imgs = torch.randn(2, channels, 12, 12)
    x = patchify(imgs, p)
    assert x.shape == (2, 9, p * p * channels)
    torch.testing.assert_close(unpatchify(x, p, channels), imgs, rtol=0, atol=0)
    # Patch 5 is grid (row 1, col 2); its entries run (pixel row, pixel col, channel).
    block = imgs[1, :, 4:8, 8:12]  # [C, p, p]
    torch.testing.assert_close(x[1, 5], block.permute(1, 2, 0).reshape(-1), rtol=0, atol=0)


def test_patchify_rejects_non_multiple() -> None:
    with pytest.raises(ValueError, match="multiple of patch size"):
        patchify(torch.zeros(1, 1, 10, 10), 4)


def test_attention_equals_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2)
    x = torch.randn(3, 5, 8)
    qkv = attn.qkv(x).reshape(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [N, heads, L, hd]
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_encoder_rejects_wrong_image_size() -> None:
    enc = Encoder(1, 20, 4, 32, 1, 4, 2.0)
    with pytest.raises(ValueError, match="20x20"):
        enc.embed(torch.zeros(1, 1, 16, 16))

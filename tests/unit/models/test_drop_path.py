"""Stochastic depth of the ViT blocks (`model.drop_path`): per-sample drops rescaled by
1 / keep, rates rising linearly over the blocks, draws from the training step's stream, off in
eval mode, and at 0 the model as it was (same parameters, same outputs)."""

from __future__ import annotations

import pytest
import torch

from toolkit.models.classifier import ViTClassifier, ViTClassifierConfig
from toolkit.models.mae import MAE
from toolkit.models.srmae import SRMAE
from toolkit.models.vit import Block, DropPath, Encoder, drop_path_stream

TINY = {"in_chans": 1, "img_size": 8, "patch_size": 4, "embed_dim": 8, "num_heads": 2,
        "mlp_ratio": 2.0}  # fmt: skip


def encoder(depth: int, drop_path: float, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(depth=depth, drop_path=drop_path, **TINY)


def test_block_drops_each_branch_per_sample_and_rescales_by_one_over_keep() -> None:
    """The block's output written out: x + m1 / keep * attn(norm1(x)), then the same with m2 for
    the MLP, where m = (u < keep) for one uniform u per sample and branch, drawn from the step's
    stream in that order (attention first, MLP second)."""
    torch.manual_seed(0)
    p, n = 0.5, 64
    block = Block(8, 2, 2.0, drop_path=p).train()
    x = torch.randn(n, 3, 8)
    with drop_path_stream(torch.Generator().manual_seed(7)):
        got = block(x)
    g = torch.Generator().manual_seed(7)
    keep = 1 - p
    m1 = (torch.rand(n, 1, 1, generator=g) < keep).float() / keep
    m2 = (torch.rand(n, 1, 1, generator=g) < keep).float() / keep
    with torch.no_grad():
        h = x + m1 * block.attn(block.norm1(x))
        want = h + m2 * block.mlp(block.norm2(h))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Both outcomes happen at this rate: some samples drop a branch, some keep both.
    assert 0 < int((m1 == 0).sum()) < n and 0 < int((m2 == 0).sum()) < n


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean() -> None:
    """On ones, each sample is all 0 or all 1 / keep; the share of zeros is about p (10,000
    draws: the binomial's standard deviation is 0.005, the bound 0.02 is 4 of them)."""
    p = 0.3
    torch.manual_seed(0)  # outside the loop it draws from the global RNG
    out = DropPath(p).train()(torch.ones(10_000, 4, 5))
    per_sample = out.flatten(1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)  # whole samples
    assert sorted(set(per_sample[:, 0].tolist())) == [0.0, pytest.approx(1 / (1 - p), rel=1e-6)]
    assert abs(float((per_sample[:, 0] == 0).double().mean()) - p) < 0.02
    assert abs(float(out.double().mean()) - 1.0) < 0.03


def test_rates_rise_linearly_from_zero_to_the_setting_over_the_blocks() -> None:
    depth, rate = 5, 0.2
    got = [getattr(b.drop_path, "p", 0.0) for b in encoder(depth, rate).blocks]
    assert got == pytest.approx([rate * i / (depth - 1) for i in range(depth)])
    assert isinstance(encoder(depth, rate).blocks[0].drop_path, torch.nn.Identity)  # rate 0
    assert [getattr(b.drop_path, "p", 0.0) for b in encoder(1, 0.5).blocks] == [0.0]


def test_off_in_eval_mode_and_at_zero_the_model_as_it_was() -> None:
    """drop_path changes neither the parameters (names, shapes, initial values) nor the eval
    output; at 0 the training output is the eval output (nothing random in the forward)."""
    x = torch.randn(4, 5, 8)
    plain, dropped = encoder(3, 0.0), encoder(3, 0.5)
    a, b = plain.state_dict(), dropped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(x), dropped(x))
    plain.train()
    with drop_path_stream(torch.Generator().manual_seed(1)):
        assert torch.equal(plain(x), dropped(x))
    dropped.train()
    with drop_path_stream(torch.Generator().manual_seed(1)):
        assert not torch.equal(plain(x), dropped(x))


def test_the_step_stream_decides_the_drops() -> None:
    """The same stream seed gives the same output whatever the global RNG did meanwhile (a
    resumed run reseeds the stream, not the global RNG); another seed other drops."""
    enc = encoder(4, 0.5).train()
    x = torch.randn(16, 5, 8)

    def run(seed: int) -> torch.Tensor:
        with drop_path_stream(torch.Generator().manual_seed(seed)):
            return enc(x)

    first = run(3)
    torch.manual_seed(12345)
    torch.rand(100)
    assert torch.equal(run(3), first)
    assert not torch.equal(run(4), first)


@pytest.mark.parametrize("arch", ["mae", "srmae", "vit_classifier"])
def test_every_vit_model_passes_drop_path_to_its_encoder_only(arch: str) -> None:
    vit = {**TINY, "depth": 3, "decoder_embed_dim": 8, "decoder_depth": 2, "decoder_num_heads": 2}
    if arch == "mae":
        model = MAE(**vit, drop_path=0.4)
    elif arch == "srmae":
        model = SRMAE(**vit, sr_channels=4, scale=2, drop_path=0.4)
    else:
        model = ViTClassifier(ViTClassifierConfig(**vit, drop_path=0.4, num_classes=3))
    rates = [getattr(b.drop_path, "p", 0.0) for b in model.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.2, 0.4])
    # The decoder (MAE's light decoder, as in its recipe) has none.
    decoder = getattr(model, "decoder", None)
    assert decoder is None or not any(isinstance(m, DropPath) for m in decoder.modules())

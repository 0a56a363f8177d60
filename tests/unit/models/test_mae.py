"""MAE: masking invariants, masked-only loss, the encoder seeing only visible patches."""

import pytest
import torch

from tests.helpers import TINY_VIT
from toolkit.models.mae import MAE, MAEOutput

L = 25  # (20 / 4) ** 2 patches


def tiny_mae(**overrides: object) -> MAE:
    torch.manual_seed(0)
    return MAE(**{**TINY_VIT, **overrides})


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 0.97])
def test_masked_count_is_exact_in_every_sample(ratio: float) -> None:
    x = torch.randn(6, L, 8)
    kept, mask, _ = MAE.random_masking(x, ratio, generator=torch.Generator().manual_seed(1))
    n_masked = L - int(L * (1 - ratio))
    assert kept.shape == (6, L - n_masked, 8)
    assert mask.sum(dim=1).tolist() == [float(n_masked)] * 6
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_masking_keeps_lowest_noise_and_restore_inverts_shuffle() -> None:
    n, d = 4, 3
    x = torch.randn(n, L, d)
    noise = torch.rand(n, L, generator=torch.Generator().manual_seed(2))
    kept, mask, ids_restore = MAE.random_masking(x, 0.6, noise=noise)
    len_keep = kept.shape[1]
    order = noise.argsort(dim=1)  # independent of the implementation's ids_shuffle
    for i in range(n):
        visible = order[i, :len_keep]
        torch.testing.assert_close(kept[i], x[i, visible], rtol=0, atol=0)
        expected_mask = torch.ones(L)
        expected_mask[visible] = 0
        torch.testing.assert_close(mask[i], expected_mask, rtol=0, atol=0)
    # [kept, masked-in-noise-order] gathered with ids_restore is the original sequence.
    masked = torch.stack([x[i, order[i, len_keep:]] for i in range(n)])
    shuffled = torch.cat([kept, masked], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    torch.testing.assert_close(restored, x, rtol=0, atol=0)


def test_masking_is_deterministic_with_a_generator() -> None:
    x = torch.randn(3, L, 4)
    _, m1, _ = MAE.random_masking(x, 0.75, generator=torch.Generator().manual_seed(5))
    _, m2, _ = MAE.random_masking(x, 0.75, generator=torch.Generator().manual_seed(5))
    _, m3, _ = MAE.random_masking(x, 0.75, generator=torch.Generator().manual_seed(6))
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_masking_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE.random_masking(torch.zeros(1, L, 2), ratio)


def test_loss_ignores_predictions_on_visible_patches() -> None:
    model = tiny_mae()
    imgs = torch.rand(2, 1, 20, 20)
    mask = torch.zeros(2, L)
    mask[0, [1, 4, 7]] = 1
    mask[1, [0, 24]] = 1
    pred = torch.randn(2, L, 16, requires_grad=True)
    per_sample = model.forward_loss(imgs, pred, mask)
    assert per_sample.shape == (2,)
    per_sample.sum().backward()
    grad_norm = pred.grad.abs().sum(dim=-1)  # [N, L]
    assert (grad_norm[mask == 0] == 0).all()
    assert (grad_norm[mask == 1] > 0).all()
    # Changing visible predictions leaves the loss as it was; the value is the masked MSE.
    other = pred.detach().clone()
    other[mask == 0] += 10.0
    torch.testing.assert_close(model.forward_loss(imgs, other, mask), per_sample.detach())
    per_patch = ((pred.detach() - model.patchify(imgs)) ** 2).mean(-1)
    for i in range(2):  # each sample: the mean over its own masked patches
        expected = per_patch[i][mask[i] == 1].mean().item()
        assert per_sample[i].item() == pytest.approx(expected, rel=1e-6)


def test_norm_pix_loss_targets_each_patch_normalised() -> None:
    model = tiny_mae(norm_pix_loss=True)
    imgs = torch.rand(2, 1, 20, 20)
    mask = torch.ones(2, L)
    target = model.patchify(imgs)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert model.forward_loss(imgs, normed, mask).max().item() == pytest.approx(0.0, abs=1e-10)
    assert model.forward_loss(imgs, target, mask).min().item() > 0.1


def test_loss_with_nothing_masked_averages_every_patch() -> None:
    model = tiny_mae()
    imgs = torch.rand(2, 1, 20, 20)
    out = model(imgs, mask_ratio=0.0)
    assert out.mask.sum().item() == 0
    expected = ((out.pred - model.patchify(imgs)) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.loss.item() > 0


def test_batch_loss_is_the_mean_of_the_sample_losses() -> None:
    """What training minimises is exactly the mean of what validation reports per sample."""
    model = tiny_mae(norm_pix_loss=True)
    out = model(torch.rand(3, 1, 20, 20), generator=torch.Generator().manual_seed(0))
    assert out.sample_loss.shape == (3,) and len(set(out.sample_loss.tolist())) == 3
    assert out.loss.item() == pytest.approx(out.sample_loss.mean().item(), rel=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shapes_and_every_parameter_gets_a_gradient(channels: int) -> None:
    model = tiny_mae(in_chans=channels)
    out = model(torch.rand(3, channels, 20, 20), generator=torch.Generator().manual_seed(0))
    assert isinstance(out, MAEOutput)
    assert out.pred.shape == (3, L, 16 * channels)
    assert out.mask.shape == (3, L)
    assert out.mask.sum(1).tolist() == [float(L - int(L * 0.25))] * 3
    assert model.unpatchify(out.pred).shape == (3, channels, 20, 20)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


def test_encoder_never_sees_masked_pixels() -> None:
    model = tiny_mae()
    imgs = torch.rand(1, 1, 20, 20)
    noise = torch.rand(1, L, generator=torch.Generator().manual_seed(3))
    base = model(imgs, noise=noise)
    masked = base.mask[0].nonzero().flatten()
    changed = model.unpatchify(model.patchify(imgs).index_fill(1, masked, 5.0))
    out = model(changed, noise=noise)
    torch.testing.assert_close(out.pred, base.pred)  # no prediction saw the masked pixels
    assert out.loss.item() != pytest.approx(base.loss.item())  # though they are the target


def test_decoder_puts_every_token_back_in_place() -> None:
    # Without blocks every token is processed on its own, so prediction j may depend on
    # patch j alone (visible) or on nothing in the image (masked: mask token + position j).
    model = tiny_mae(depth=0, decoder_depth=0)
    imgs = torch.rand(1, 1, 20, 20)
    noise = torch.rand(1, L, generator=torch.Generator().manual_seed(4))
    base = model(imgs, noise=noise)
    visible = (base.mask[0] == 0).nonzero().flatten().tolist()
    for j in visible[:3]:
        bumped = model.patchify(imgs)
        bumped[0, j] += 1.0
        pred = model(model.unpatchify(bumped), noise=noise).pred[0]
        changed = (pred - base.pred[0]).abs().amax(dim=-1) > 1e-6  # [L]
        assert changed.nonzero().flatten().tolist() == [j]
    masked = base.mask[0].nonzero().flatten().tolist()
    expected = model.decoder.pred(
        model.decoder.norm(model.mask_token[0, 0] + model.decoder.pos_embed[0, masked])
    )
    torch.testing.assert_close(base.pred[0, masked], expected)


def test_mask_token_and_init() -> None:
    model = tiny_mae()
    assert model.mask_token.shape == (1, 1, 16)
    assert 0.005 < model.mask_token.std().item() < 0.05
    assert model.encoder.blocks[0].attn.qkv.bias.abs().max().item() == 0.0
    keys = set(model.state_dict())
    assert "mask_token" in keys
    assert not any("pos_embed" in k for k in keys)
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "mask_token"}

"""The classifiers' parts: the CNN's batch norm under DeepSpeed's bf16 (bf16 weights beside
fp32 running statistics), where plain batch_norm refuses to run; the linear probe's batch norm
without affine parameters before the ViT classifier's head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit.models import load_weights
from toolkit.models.classifier import (
    FloatBatchNorm2d,
    ProbeNorm,
    ViTClassifier,
    ViTClassifierConfig,
)
from toolkit.runs import recipe


def test_batch_norm_with_bf16_weights_normalises_in_fp32() -> None:
    """DeepSpeed's bf16 casts a model's parameters to bf16 and leaves its buffers in fp32;
    torch's batch_norm then stops with "expected scalar type BFloat16 but found Float". This
    one normalises as an fp32 BatchNorm2d would on the same values: the running statistics
    exactly (the same fp32 computation), the output to bf16's rounding (it is returned in the
    input's bf16: 8 bits of mantissa, a relative step of 2**-8)."""
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 3 + 1).bfloat16()
    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    bn = FloatBatchNorm2d(3)
    bn.load_state_dict(reference.state_dict())
    with torch.no_grad():  # as DeepSpeed leaves it: bf16 parameters, fp32 buffers
        bn.weight.data = bn.weight.data.bfloat16()
        bn.bias.data = bn.bias.data.bfloat16()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    plain.weight.data, plain.bias.data = bn.weight.data.clone(), bn.bias.data.clone()
    with pytest.raises(RuntimeError, match="expected scalar type"):
        plain(x)  # what the CNN did before
    ref_in = x.float()
    reference.weight.data = bn.weight.data.float()
    reference.bias.data = bn.bias.data.float()
    for _ in range(2):  # training: batch statistics, running ones updated
        out = bn(x)
        expected = reference(ref_in)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=2**-8)
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var)
    assert int(bn.num_batches_tracked) == 2
    bn.eval()
    reference.eval()
    torch.testing.assert_close(bn(x).float(), reference(ref_in), rtol=2**-8, atol=2**-8)


def test_with_fp32_weights_it_is_plain_batch_norm_to_the_bit() -> None:
    """fp32 training (and DDP under autocast, whose weights stay fp32) is unchanged."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5)
    plain, bn = nn.BatchNorm2d(3), FloatBatchNorm2d(3)
    bn.load_state_dict(plain.state_dict())
    assert torch.equal(bn(x), plain(x))
    assert torch.equal(bn.running_var, plain.running_var)


# --- the linear probe's batch norm (model.head_norm) ---------------------------------------------

VIT = {"in_chans": 1, "img_size": 8, "patch_size": 4, "embed_dim": 8, "depth": 1, "num_heads": 2,
       "mlp_ratio": 2.0, "num_classes": 3}  # fmt: skip


def classifier(head_norm: bool) -> ViTClassifier:
    torch.manual_seed(0)
    return ViTClassifier(ViTClassifierConfig(**VIT, head_norm=head_norm))


def test_head_norm_standardises_the_mean_token_per_channel_before_the_head() -> None:
    """Training: each channel of the mean token minus its batch mean, over sqrt(biased batch
    variance + 1e-6), no scale or shift, then the head; the running statistics move by
    momentum 0.1 (unbiased variance), and eval mode uses them."""
    model = classifier(True).train()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        feats = model.encoder(model.encoder.embed(x)).mean(dim=1)  # [N, D]
        mean, var = feats.mean(0), feats.var(0, unbiased=False)
        want = model.head((feats - mean) / torch.sqrt(var + 1e-6))
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not list(model.head_norm.parameters())  # affine=False: nothing to train
    running_mean, running_var = 0.1 * mean, 0.9 + 0.1 * feats.var(0, unbiased=True)
    torch.testing.assert_close(model.head_norm.running_mean, running_mean)
    torch.testing.assert_close(model.head_norm.running_var, running_var)
    model.eval()
    with torch.no_grad():
        want = model.head((feats - running_mean) / torch.sqrt(running_var + 1e-6))
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_without_head_norm_the_classifier_and_its_weights_are_as_before() -> None:
    """Off (the default, and what a run recorded before the key existed reads as): no
    head_norm tensors, the head on the mean token, and the weights of such a run load with
    nothing fresh; with it, the weights differ by its running statistics only."""
    plain, normed = classifier(False), classifier(True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        want = plain.head(plain.encoder(plain.encoder.embed(x)).mean(dim=1))
        assert torch.equal(plain(x), want)
    extra = set(normed.state_dict()) - set(plain.state_dict())
    assert extra == {f"head_norm.{k}" for k in ("running_mean", "running_var",
                                                 "num_batches_tracked")}  # fmt: skip
    assert "head.weight" in plain.state_dict() and "head.weight" in normed.state_dict()
    report = load_weights(classifier(False), plain.state_dict())
    assert not report.fresh and not report.unused


def test_head_norm_under_bf16_features_normalises_in_fp32() -> None:
    """DeepSpeed's bf16 hands it bf16 features beside fp32 running statistics: it returns bf16,
    equal to the fp32 norm to bf16's rounding, and its statistics are the fp32 ones exactly."""
    torch.manual_seed(2)
    x = (torch.randn(16, 8) * 4 + 2).bfloat16()
    bn, reference = ProbeNorm(8), nn.BatchNorm1d(8, eps=1e-6, affine=False)
    out = bn(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x.float()), rtol=2**-8, atol=2**-8)
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var)


def test_the_shipped_linear_probe_has_the_norm_and_the_finetunes_do_not() -> None:
    classify = Path(__file__).resolve().parents[3] / "recipes" / "classify"
    got = {name: recipe.load(classify / f"{name}.yaml").model.head_norm
           for name in ("linear_probe", "finetune", "scratch", "partial")}  # fmt: skip
    assert got == {"linear_probe": True, "finetune": False, "scratch": False, "partial": False}

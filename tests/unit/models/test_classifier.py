"""The classifiers' parts: the CNN's batch norm under DeepSpeed's bf16 (bf16 weights beside
fp32 running statistics), where plain batch_norm refuses to run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.models.classifier import FloatBatchNorm2d


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

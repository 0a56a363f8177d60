"""The CNN baselines: EDSR and RCAN shapes at every scale, parameter counts from their
definitions, no batch norm, and RCAN's channel attention reaching beyond the convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.models import build_model, param_counts
from toolkit.models.edsr import EDSRConfig
from toolkit.models.rcan import RCANConfig


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k + c_out


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("arch", ["edsr", "rcan"])
def test_any_input_size_maps_to_scale_times_it(arch: str, scale: int) -> None:
    cfg = (EDSRConfig(arch="edsr", in_chans=3, n_feats=8, n_resblocks=2) if arch == "edsr"
           else RCANConfig(arch="rcan", in_chans=3, n_feats=8, n_resgroups=2, n_resblocks=2,
                           reduction=4))  # fmt: skip
    model = build_model(cfg, scale=scale)
    out = model(torch.rand(2, 3, 7, 11))  # not square, not a multiple of anything
    assert out.shape == (2, 3, 7 * scale, 11 * scale)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_edsr_parameter_count_is_its_definition() -> None:
    """EDSR-baseline (64 features, 16 blocks), one channel, x2 and x4."""
    f, b = 64, 16
    body = b * 2 * conv(f, f) + conv(f, f)
    x2 = conv(1, f) + body + conv(f, 4 * f) + conv(f, 1)
    x4 = conv(1, f) + body + 2 * conv(f, 4 * f) + conv(f, 1)
    cfg = EDSRConfig(arch="edsr", n_feats=f, n_resblocks=b)
    assert param_counts(build_model(cfg, scale=2)) == (x2, x2)
    assert param_counts(build_model(cfg, scale=4))[0] == x4


def test_rcan_parameter_count_is_its_definition() -> None:
    f, g, b, r = 32, 3, 2, 8
    rcab = 2 * conv(f, f) + conv(f, f // r, 1) + conv(f // r, f, 1)
    body = g * (b * rcab + conv(f, f)) + conv(f, f)
    expected = conv(1, f) + body + conv(f, 4 * f) + conv(f, 1)
    cfg = RCANConfig(arch="rcan", n_feats=f, n_resgroups=g, n_resblocks=b, reduction=r)
    assert param_counts(build_model(cfg, scale=2))[0] == expected


def test_rcan_channel_attention_sees_the_whole_image() -> None:
    """A pixel in one corner changes RCAN's output in the far corner, beyond the reach of its
    3x3 convolutions (the attention pools globally); EDSR of the same depth cannot."""
    torch.manual_seed(0)
    rcan = build_model(RCANConfig(arch="rcan", n_feats=8, n_resgroups=1, n_resblocks=1,
                                  reduction=2), scale=2)  # fmt: skip
    edsr = build_model(EDSRConfig(arch="edsr", n_feats=8, n_resblocks=1), scale=2)
    x = torch.rand(1, 1, 32, 32)
    y = x.clone()
    y[0, 0, 0, 0] += 1.0
    for model, reaches in ((rcan, True), (edsr, False)):
        with torch.no_grad():
            far = (model(x) - model(y))[0, 0, -8:, -8:].abs().max().item()
        assert (far > 1e-7) == reaches, (type(model).__name__, far)

"""SR-MAE: the pretrained MAE wrapped in convolution/deconvolution layers for super-resolution.

LR image [N, C, h, h] (h = img_size // scale) -> HR image [N, C, H, H] (H = img_size):

    base = bicubic(lr)                                         the skip both residuals sit on
    f    = relu(sr.body(relu(sr.head(lr))))                    3x3 then 5x5 conv, at LR
    u    = base + sr.to_img(relu(sr.up(f)))                    4x4 deconv to H x H, to image
    m    = unpatchify(decoder(encoder(u)))                     the MAE on all patches, no mask
    out  = base + sr.tail(relu(sr.fuse([u, m])))               3x3 + 3x3 refinement at HR

Why this shape: the wide layers work at LR and the deconvolution upsamples late (as in
FSRCNN/EDSR), so the SR layers cost about a third of what the same parameters would at HR;
the MAE sees an image close to the HR images it was pretrained on (u starts near bicubic, since
`to_img` and `tail` start small); the two HR convolutions (5x5 receptive field) span patch
borders, where an unpatchified prediction has seams. Every parameter takes part in forward
(DDP needs that), so the MAE's mask token is not a parameter here: `load_mae_weights` reports
it as unused.

Parameters at the workload's width (C=1, embed 256, depth 8, decoder 128 x 4, patch 10,
sr_channels 64; the same at scale 2, 3 and 4):
    MAE (pretrain, with mask token)              7,183,716   (write-up: 7.25M)
    SR-MAE, all (no mask token)                  7,354,662   (write-up: 7.38M)
    SR-MAE, encoder frozen: decoder + sr.*       1,010,214   (write-up: 996K)
    SR-MAE, MAE frozen: sr.* only                  171,074   (write-up: 167.7K)
    sr.*: head 640, body 102,464, up 65,600, to_img 577, fuse 1,216, tail 577
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.models.vit import Decoder, Encoder, init_vit_weights, unpatchify

logger = logging.getLogger(__name__)


def _deconv_padding(lr_size: int, hr_size: int, scale: int, kernel: int) -> tuple[int, int]:
    """(padding, output_padding) so a stride-`scale` deconv maps lr_size exactly to hr_size."""
    # out = (lr - 1) * s - 2p + k + op; hr may exceed lr * s by a remainder (150 = 37 * 4 + 2).
    rest = hr_size - (lr_size - 1) * scale - kernel  # = op - 2p
    pad = max(0, -(rest // 2))
    out_pad = rest + 2 * pad
    if not 0 <= out_pad < scale:
        raise ValueError(f"no deconvolution maps {lr_size} to {hr_size} at scale {scale}")
    return pad, out_pad


class SRLayers(nn.Module):
    """The convolution/deconvolution layers added around the MAE (the `sr.*` parameters)."""

    def __init__(self, in_chans: int, channels: int, lr_size: int, hr_size: int, scale: int):
        super().__init__()
        c, f = in_chans, channels
        # Kernel 4 for scales 2-4 keeps the parameter count independent of the scale.
        kernel = max(4, scale)
        pad, out_pad = _deconv_padding(lr_size, hr_size, scale, kernel)
        self.head = nn.Conv2d(c, f, 3, padding=1)  # at LR
        self.body = nn.Conv2d(f, f, 5, padding=2)  # at LR
        self.up = nn.ConvTranspose2d(
            f, f, kernel, stride=scale, padding=pad, output_padding=out_pad
        )
        self.to_img = nn.Conv2d(f, c, 3, padding=1)  # at HR, from here on
        self.fuse = nn.Conv2d(2 * c, f, 3, padding=1)
        self.tail = nn.Conv2d(f, c, 3, padding=1)
        # Residual outputs start small, so at init u and the output are close to bicubic and
        # the frozen MAE sees in-distribution images from the first step.
        for conv in (self.to_img, self.tail):
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)


class SRMAE(nn.Module):
    """MAE encoder + decoder between convolution/deconvolution layers; LR in, HR out."""

    def __init__(
        self,
        in_chans: int = 1,
        img_size: int = 150,
        patch_size: int = 10,
        embed_dim: int = 256,
        depth: int = 8,
        num_heads: int = 8,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 4,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        sr_channels: int = 64,
        scale: int = 2,
    ) -> None:
        super().__init__()
        if scale < 2:
            raise ValueError(f"scale must be 2 or more, got {scale}")
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.img_size = img_size
        self.scale = scale
        self.lr_size = img_size // scale
        self.encoder = Encoder(
            in_chans, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio
        )
        self.decoder = Decoder(
            in_chans,
            img_size,
            patch_size,
            embed_dim,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
            mlp_ratio,
        )
        init_vit_weights(self.encoder)
        init_vit_weights(self.decoder)
        self.sr = SRLayers(in_chans, sr_channels, self.lr_size, img_size, scale)

    def forward(self, lr: Tensor) -> Tensor:
        """[N, C, h, h] -> [N, C, H, H], unclamped (clamping would zero gradients at 0 and 1)."""
        if lr.shape[-2:] != (self.lr_size, self.lr_size):
            raise ValueError(
                f"SR-MAE (img_size {self.img_size}, scale {self.scale}) expects "
                f"{self.lr_size}x{self.lr_size} inputs, got {tuple(lr.shape[-2:])}"
            )
        sr = self.sr
        hr = (self.img_size, self.img_size)
        base = F.interpolate(lr, size=hr, mode="bicubic", align_corners=False)  # [N, C, H, H]
        feats = F.relu(sr.body(F.relu(sr.head(lr))))  # [N, F, h, h]
        u = base + sr.to_img(F.relu(sr.up(feats)))  # [N, C, H, H]
        tokens = self.encoder(self.encoder.embed(u))  # [N, L, D]: every patch, no masking
        patches = self.decoder(self.decoder.embed(tokens))  # [N, L, p*p*C]
        m = unpatchify(patches, self.patch_size, self.in_chans)  # [N, C, H, H]
        x = F.relu(sr.fuse(torch.cat([u, m], dim=1)))  # [N, F, H, H]
        return base + sr.tail(x)  # [N, C, H, H]

    def predict(self, lr: Tensor) -> Tensor:
        """Inference output for [0, 1] images: forward, clamped to [0, 1], no graph."""
        with torch.no_grad():
            return self(lr).clamp_(0.0, 1.0)


# Finetune modes -> parameter-name prefixes they freeze. "mae" is everything but `sr.*`.
FREEZE_PREFIXES: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder.",),
    "mae": ("encoder.", "decoder."),
}


def apply_freeze(model: nn.Module, freeze: list[str]) -> None:
    """Set requires_grad by finetune mode: [] trains all, ["encoder"], ["mae"] (all but sr.*).

    Every parameter is set (not only the frozen ones), so calling it twice with different modes
    gives the second mode. No train/eval switch is needed: the model has no dropout or batch
    norm, so frozen parts compute the same in either mode.
    """
    prefixes: tuple[str, ...] = ()
    for mode in freeze:
        if mode not in FREEZE_PREFIXES:
            raise ValueError(
                f"unknown freeze mode {mode!r}; expected one of {list(FREEZE_PREFIXES)}"
            )
        prefixes += FREEZE_PREFIXES[mode]
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(prefixes))
    total, trainable = param_counts(model)
    logger.info("freeze %s: %d of %d parameters trainable", freeze, trainable, total)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


@dataclass
class LoadReport:
    """What `load_mae_weights` did, tensor by tensor name."""

    loaded: list[str] = field(default_factory=list)  # copied from the checkpoint
    fresh: list[str] = field(default_factory=list)  # model tensors left at their initialisation
    unused: list[str] = field(default_factory=list)  # checkpoint tensors deliberately not used

    def summary(self) -> str:
        fresh_layers = sorted({k.rsplit(".", 1)[0] for k in self.fresh})
        return (
            f"loaded {len(self.loaded)} tensors; fresh: {', '.join(fresh_layers) or 'none'}; "
            f"unused: {', '.join(self.unused) or 'none'}"
        )


# Top-level parts of MAE / SR-MAE state dicts. A part the model lacks altogether (the mask
# token for SR-MAE, sr.* for an MAE) is skipped on purpose; a part present on both sides must
# match tensor for tensor, or the two models differ (depth, width, patch size).
_MAE_PARTS = ("encoder", "decoder")
_KNOWN_PARTS = (*_MAE_PARTS, "sr", "mask_token")
# Wrappers that prefix every key: DDP / DeepSpeed ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def _strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _width_hint(ckpt: dict[str, Tensor], own: dict[str, Tensor]) -> str:
    hints = []
    for key, name in (
        ("encoder.norm.weight", "embed_dim"),
        ("decoder.norm.weight", "decoder_embed_dim"),
    ):
        if key in ckpt and key in own and ckpt[key].shape != own[key].shape:
            hints.append(
                f"checkpoint {name} {ckpt[key].shape[0]}, model {name} {own[key].shape[0]}"
            )
    return f" ({'; '.join(hints)})" if hints else ""


def load_mae_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Load the MAE tensors of an MAE or SR-MAE state dict into `model` by name.

    Tensors of a part the checkpoint lacks (sr.* from a pretrain checkpoint) stay as
    initialised and are reported `fresh`; checkpoint parts the model lacks (the MAE's
    mask_token) are reported `unused`. Raises ValueError, before changing anything, on a shape
    mismatch, a different width or depth, or a checkpoint without any encoder./decoder. tensor.
    """
    ckpt = _strip_wrappers({k: v for k, v in state_dict.items() if isinstance(v, Tensor)})
    own = model.state_dict()
    if not any(_part(k) in _MAE_PARTS for k in ckpt):
        first = ", ".join(list(ckpt)[:3]) or "none"
        raise ValueError(
            f"checkpoint holds no MAE tensor (no encoder.* or decoder.* key); its keys: {first}"
        )
    for key, target in own.items():
        if key in ckpt and ckpt[key].shape != target.shape:
            raise ValueError(
                f"{key}: checkpoint has {list(ckpt[key].shape)}, model expects "
                f"{list(target.shape)}{_width_hint(ckpt, own)}"
            )
    ckpt_parts, own_parts = {_part(k) for k in ckpt}, {_part(k) for k in own}
    missing = [k for k in own if k not in ckpt and _part(k) in ckpt_parts]
    if missing:
        raise ValueError(
            f"{missing[0]}: missing from the checkpoint ({len(missing)} tensors in all) though it "
            f"has other {_part(missing[0])}.* tensors; was it saved from a different depth?"
        )
    extra = [
        k for k in ckpt if k not in own and (_part(k) in own_parts or _part(k) not in _KNOWN_PARTS)
    ]
    if extra:
        raise ValueError(
            f"{extra[0]}: checkpoint tensor with no place in the model ({len(extra)} in all); "
            "was it saved from a different depth or model?"
        )
    report = LoadReport(
        loaded=[k for k in own if k in ckpt],
        fresh=[k for k in own if k not in ckpt],
        unused=[k for k in ckpt if k not in own],
    )
    with torch.no_grad():
        for key in report.loaded:
            own[key].copy_(ckpt[key])
    logger.info("load_mae_weights: %s", report.summary())
    return report

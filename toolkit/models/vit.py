"""ViT building blocks: 2D sin-cos position embeddings, patchify, patch embedding, blocks,
stochastic depth, the layer numbering of layer-wise learning-rate decay, and the encoder +
decoder that the MAE and SR-MAE are built on."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2D sin-cos position embedding for a `grid_size` x `grid_size` grid: [L, embed_dim].

    Token t = row * grid_size + col (the order `patchify` and the patch embedding use).
    The first half of the channels encodes the row, the second half the column; each half is
    [sin(pos * w_0), ..., sin(pos * w_{K-1}), cos(pos * w_0), ..., cos(pos * w_{K-1})] with
    K = embed_dim // 4 and w_k = 10000 ** (-k / K), as in the Transformer and MAE.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2D sin-cos, got {embed_dim}")
    k = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / k)  # [K]
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # [G, G] each

    def encode(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega  # [L, K]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [L, 2K]

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # [L, D]


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], patches in row-major order, pixels (row, col, channel)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; the inverse of `patchify` for a square grid."""
    n, seq, _ = x.shape
    p, g = patch_size, round(seq**0.5)
    if g * g != seq:
        raise ValueError(f"{seq} patches do not form a square grid")
    x = x.reshape(n, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * p, g * p)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as one strided convolution."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)  # [N, C, H, W] -> [N, L, D]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide width {dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, seq, d = x.shape
        qkv = self.qkv(x).reshape(n, seq, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, L, d/heads]
        # SDPA picks a fused kernel (flash / memory-efficient on GPU, a fused loop on CPU).
        x = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, d/heads]
        return self.proj(x.transpose(1, 2).reshape(n, seq, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# The training step's random stream (the loop's `rng`, seeded by seed, step, micro-batch and
# rank) while a training forward runs: stochastic depth draws from it, so a resumed run drops
# the same paths as an uninterrupted one whatever else drew random numbers in between.
_STREAM: ContextVar[torch.Generator | None] = ContextVar("drop_path_stream", default=None)


@contextlib.contextmanager
def drop_path_stream(rng: torch.Generator | None) -> Iterator[None]:
    """Stochastic depth inside this block draws its masks from `rng` (a CPU generator)."""
    token = _STREAM.set(rng)
    try:
        yield
    finally:
        _STREAM.reset(token)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) of one residual branch: in training, each sample's
    branch output is zeroed with probability p and the kept ones are scaled by 1 / (1 - p), so
    the expected output is the branch's; in eval mode it is the identity."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p:g}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        rng = _STREAM.get()
        if rng is None:  # outside the training loop: the global RNG, as timm does
            u = torch.rand(shape, device=x.device)
        else:  # drawn on the CPU, so the masks do not depend on the device
            u = torch.rand(shape, generator=rng).to(x.device, non_blocking=True)
        # The scale in fp32, then the input's dtype: 1 / keep rounds once, in the cast.
        return x * ((u < keep).float() / keep).to(x.dtype)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop rates rising linearly from 0 (first block) to `rate` (last), as in timm
    and the MAE's finetuning: early blocks, whose features every later block builds on, are
    dropped least."""
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); with `drop_path`,
    each branch is dropped per sample in training (stochastic depth)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # No parameters or buffers either way: state dicts are the same with and without.
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    """Patch embedding + fixed position embedding, then ViT blocks over whatever tokens it gets.

    `embed` turns images into positioned tokens; `forward` runs the blocks, so the MAE can drop
    masked tokens in between and SR-MAE can keep them all.
    """

    def __init__(
        self,
        in_chans: int,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        # A buffer, not a parameter, and out of the state dict: it is a pure function of the
        # grid, so a checkpoint loads into a model built for another image size.
        pos = sincos_pos_embed_2d(embed_dim, img_size // patch_size).unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)  # [1, L, D]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate)
            for rate in drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(embed_dim)

    def embed(self, imgs: Tensor) -> Tensor:
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"encoder expects {self.img_size}x{self.img_size} images, "
                f"got {tuple(imgs.shape[-2:])}"
            )
        x = self.patch_embed(imgs)  # [N, L, D]
        # The buffer stays fp32 when DeepSpeed casts the parameters to bf16: match the tokens.
        return x + self.pos_embed.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # [N, L_seen, D]


class Decoder(nn.Module):
    """The MAE's light decoder: encoder width -> decoder width, blocks, one linear per patch.

    `embed` is applied by the caller before the full token sequence is assembled (the MAE
    inserts mask tokens at decoder width); `forward` takes all L tokens at decoder width.
    """

    def __init__(
        self,
        in_chans: int,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        decoder_embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, decoder_embed_dim)
        pos = sincos_pos_embed_2d(decoder_embed_dim, img_size // patch_size).unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)  # [1, L, Dd]
        self.blocks = nn.ModuleList(
            Block(decoder_embed_dim, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(decoder_embed_dim)
        self.pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed.to(x.dtype)  # [N, L, Dd]
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))  # [N, L, p*p*C]


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears (and the patch conv seen as a linear)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


# Layer-wise learning-rate decay numbers a ViT's parameters by depth: the embeddings are layer 0,
# block i is layer i + 1, and everything after the blocks (the encoder's last norm, a head, a
# decoder, SR layers) is the top layer, depth + 1, which trains at the full rate: a pretrained
# encoder's early layers hold general features to keep, and fresh layers have nothing to keep.
_EMBEDDING = re.compile(r"^encoder\.(patch_embed\.|pos_embed$|cls_token$)")
_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.")


def encoder_layer(name: str, depth: int) -> int:
    """The layer (0 .. depth + 1) of parameter `name` in a model whose ViT encoder is
    `encoder` with `depth` blocks."""
    if _EMBEDDING.match(name):
        return 0
    block = _BLOCK.match(name)
    return int(block.group(1)) + 1 if block else depth + 1


class EncoderLayers:
    """For models with a ViT `encoder` (MAE, SR-MAE, the ViT classifier): the layer numbering
    `toolkit.engine.optim` reads for `optim.layer_decay` (`lr_layers`: the top layer's number)."""

    encoder: Encoder

    @property
    def lr_layers(self) -> int:
        return len(self.encoder.blocks) + 1

    def lr_layer(self, name: str) -> int:
        return encoder_layer(name, len(self.encoder.blocks))


class EncoderDecoder(EncoderLayers, nn.Module):
    """The MAE's ViT encoder and light decoder, built and initialised: the `encoder.*` and
    `decoder.*` parameters the MAE and SR-MAE share, so that a pretrained MAE's state dict loads
    into SR-MAE by name. Subclasses add their own parts after calling this constructor (the MAE
    its mask token, SR-MAE its convolution layers): the random numbers drawn here, and so the
    weights a seed gives, are the same for both."""

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
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.encoder = Encoder(
            in_chans, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, drop_path
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


# A ViT with every kind of part and little else: 64 patches of 4x4, two encoder layers, one
# decoder layer (`ModelSpec.small` of the ViT architectures).
SMALL_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
             "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}  # fmt: skip

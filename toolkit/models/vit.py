"""ViT building blocks: 2D sin-cos position embeddings, patchify, patch embedding, blocks."""

from __future__ import annotations

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


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
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

"""Triplane generator T: learned triplane tokens and all image tokens in one self-attention transformer.

Pre-norm blocks (LayerNorm → attention → residual, LayerNorm → feed-forward → residual), attention through
`F.scaled_dot_product_attention` (flash / memory-efficient kernels where the device has them). No positional
embeddings: triplane tokens are distinct learned vectors and image tokens carry their Plücker rays. Only the
triplane tokens leave the transformer, through a final LayerNorm. `blocks` is a plain ModuleList so the
trainer can wrap each block in activation checkpointing or compile it from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention; q/k/v projections without bias by default, output projection with bias."""

    def __init__(self, width: int, heads: int, head_dim: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(width, inner, bias=qkv_bias)
        self.to_k = nn.Linear(width, inner, bias=qkv_bias)
        self.to_v = nn.Linear(width, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, width)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, width] -> [B, N, width]
        B, N, _ = x.shape

        def split(t: Tensor) -> Tensor:  # [B, N, h·d] -> [B, h, N, d]
            return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """GELU MLP (width → hidden → width) or GEGLU (width → 2·hidden, value·gelu(gate) → width)."""

    def __init__(self, width: int, hidden: int, kind: str = "gelu") -> None:
        super().__init__()
        if kind not in ("gelu", "geglu"):
            raise ValueError(f"unknown feed-forward {kind!r} (gelu | geglu)")
        self.kind = kind
        self.proj_in = nn.Linear(width, 2 * hidden if kind == "geglu" else hidden)
        self.proj_out = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj_in(x)
        if self.kind == "geglu":
            value, gate = h.chunk(2, dim=-1)  # the released model's order: first half value, second gate
            h = value * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(h)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, head_dim: int, ffn: str, ffn_hidden: int,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, head_dim, qkv_bias)
        self.norm2 = nn.LayerNorm(width)
        self.ff = FeedForward(width, ffn_hidden, ffn)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class TriplaneTransformer(nn.Module):
    """Image tokens [B, N_img, width] → triplane tokens as planes [B, 3, width, R, R] (planes xy, xz, yz)."""

    def __init__(self, width: int, depth: int, heads: int, head_dim: int, plane_res: int, ffn: str = "gelu",
                 ffn_mult: int = 4, qkv_bias: bool = False) -> None:
        super().__init__()
        self.width, self.plane_res = width, plane_res
        # randn / sqrt(width): unit-norm-ish tokens, the released model's init.
        self.planes = nn.Parameter(torch.randn(3, width, plane_res, plane_res) / math.sqrt(width))
        self.blocks = nn.ModuleList(
            [Block(width, heads, head_dim, ffn, ffn_mult * width, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, image_tokens: Tensor) -> Tensor:
        B = image_tokens.shape[0]
        R, W = self.plane_res, self.width
        # Tokens flattened plane, row, column: [3, W, R, R] -> [3·R·R, W].
        tri = self.planes.permute(0, 2, 3, 1).reshape(1, 3 * R * R, W).expand(B, -1, -1)
        x = torch.cat([tri, image_tokens.to(tri.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x[:, : 3 * R * R])  # image tokens are dropped here
        return x.reshape(B, 3, R, R, W).permute(0, 1, 4, 2, 3)  # [B, 3, W, R, R]

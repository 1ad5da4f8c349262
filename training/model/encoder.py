"""Image encoder E: one stride-`patch` convolution from the 10-channel input to image tokens (paper §3.1).

The paper's ablation (and the released model) use a single 16×16 stride-16 convolution trained from
scratch instead of DINO, so high-frequency detail is not thrown away before the transformer sees it.
"""

from __future__ import annotations

from torch import Tensor, nn


class ImageEncoder(nn.Module):
    """[B, V, C_in, H, W] → image tokens [B, V·(H/p)·(W/p), width], ordered view, row, column."""

    def __init__(self, in_channels: int, width: int, patch_size: int, bias: bool = True,
                 token_norm: bool = False) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size, bias=bias)
        # The released model LayerNorms the image tokens (its `norm1`) so their scale matches the triplane
        # tokens' randn/sqrt(width) init; ours makes it optional.
        self.norm = nn.LayerNorm(width) if token_norm else None

    def forward(self, x: Tensor) -> Tensor:
        B, V, C, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not a multiple of the encoder patch {self.patch_size}")
        t = self.proj(x.reshape(B * V, C, H, W))  # [B·V, width, h, w]
        t = t.flatten(2).transpose(1, 2).reshape(B, -1, t.shape[1])  # [B, V·h·w, width]
        return self.norm(t) if self.norm is not None else t


def image_tokens(height: int, width: int, patch_size: int) -> int:
    """Tokens one view contributes."""
    return (height // patch_size) * (width // patch_size)


"""Triplane upsampler: a per-token linear layer (a 1×1 convolution) and PixelShuffle, no deconvolution.

The paper (§3.1) traces LRM's grid artifacts to the transposed convolution; PixelShuffle spreads each token's
f² · C outputs over an f × f block of texels without overlapping kernels.
"""

from __future__ import annotations

from torch import Tensor, nn


class TriplaneUpsampler(nn.Module):
    """[B, 3, width, R, R] → [B, 3, C, R·f, R·f]; one shared projection for all three planes."""

    def __init__(self, width: int, channels: int, factor: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(width, channels * factor * factor, kernel_size=1)
        self.shuffle = nn.PixelShuffle(factor)

    def forward(self, x: Tensor) -> Tensor:
        B, P, W, R, _ = x.shape
        y = self.shuffle(self.proj(x.reshape(B * P, W, R, R)))
        return y.reshape(B, P, *y.shape[1:])

"""Triplane sampling: features of 3-D points from the planes [xy, xz, yz], bilinear, concatenated.

Plane p is an image [C, R, R] whose column axis is the first named coordinate and whose row axis the
second: plane xy is read at grid (x, y), xz at (x, z), yz at (y, z) — `grid_sample` with border padding and
`align_corners=False`, after dividing points by the scene-box half side (so the box maps to [-1, 1]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# (column coordinate, row coordinate) of each plane, indices into (x, y, z).
PLANE_AXES = ((0, 1), (0, 2), (1, 2))


def sample_triplane(planes: Tensor, points: Tensor, box: float) -> Tensor:
    """planes [B, 3, C, R, R], points [B, N, 3] (world units, box = half side) → features [B, N, 3·C]."""
    B, P, C, H, W = planes.shape
    if P != 3 or points.shape[0] != B or points.shape[-1] != 3 or points.ndim != 3:
        raise ValueError(f"planes [B,3,C,R,R] and points [B,N,3] expected, got {tuple(planes.shape)}, "
                         f"{tuple(points.shape)}")
    p = (points / box).to(planes.dtype)
    grid = torch.stack([p[..., list(ax)] for ax in PLANE_AXES], dim=1)  # [B, 3, N, 2]
    feats = F.grid_sample(planes.reshape(B * 3, C, H, W), grid.reshape(B * 3, 1, -1, 2), mode="bilinear",
                          padding_mode="border", align_corners=False)  # [B·3, C, 1, N]
    return feats.reshape(B, 3, C, -1).permute(0, 3, 1, 2).reshape(B, -1, 3 * C)

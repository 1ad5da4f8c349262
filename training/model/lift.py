"""Input views lifted onto the triplane: what each plane texel's line through the box sees in the input views.

Not in the paper or the released model: an option of the small CPU demo (`model.lift`, off in paper.yaml and
official.yaml). A from-scratch transformer has to learn which image patches see which plane texel from the
Plücker rays alone; in the demo's few thousand samples on 2 cores it does not, and renders one mean object for
every input (docs/training.md, "Rung 2"). This gives the planes that correspondence by projection instead
(pixel-aligned features, as PixelNeRF does per point); the features themselves have no parameters:

For plane texel (a, b) of plane p (PLANE_AXES: xy, xz, yz; texel centres as `sample_triplane` reads them) the
line along the plane's normal axis is sampled at `depth` points across the box. Each point is projected into
every input view (OpenCV pinhole, pixel centres at +0.5, as `training.cameras`); a point behind a camera or
outside its image sees background (mask 0, RGB = background). Per point: the visual hull h = min over views
of the mask, the mask mean, and the mask-weighted mean RGB. Per texel (the features, `FEATURES` + `depth`):

    max_d h                   the object's silhouette along the axis (the hull's orthographic shadow)
    mean_d h                  the hull's thickness along the line
    Σ_d h·rgb / Σ_d h         the colour the views agree on along the line (background where h = 0)
    mean_d mask mean          how many views see anything there
    h at each of the `depth` points   the hull's profile along the line

A 1×1 convolution (`ViewLift`) maps them to the plane channels and is added to the generated planes, so every
stage downstream (f_d / f_c, meshing, refinement, export) still reads planes only.

`model.lift_hull` (the demo's default) also hands f_d the hull itself: the `depth` profile values ride along as
extra plane channels (planes [B, 3, C + depth, R, R]; f_c and the generated part read the first C), and
`hull_at` reads each plane's sampled profile at a point (bilinear over its texels, linear along its normal), so f_d
sees three estimates of "inside every input view's silhouette" at that point. Through the 1×1 convolution
alone the triplane offers f_d only per-plane projections of the hull: the intersection of the three
orthographic shadows of the hull is a far looser shape (docs/training.md, "Lifting").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.model.triplane import PLANE_AXES, sample_triplane

FEATURES = 6  # per texel before the depth profile: silhouette, thickness, RGB (3), view coverage


def _project(points: Tensor, c2w: Tensor, K: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """points [B, N, 3] → grid_sample coordinates [B, V, N, 2] (align_corners=False) and in front [B, V, N]."""
    R, t = c2w[..., :3, :3], c2w[..., :3, 3]  # [B, V, 3, 3], [B, V, 3]
    cam = torch.einsum("bvji,bvnj->bvni", R, points[:, None] - t[:, :, None])  # R^T (p - t)
    z = cam[..., 2]
    front = z > 1e-6
    zs = torch.where(front, z, torch.ones_like(z))
    u = K[:, :, None, 0, 0] * cam[..., 0] / zs + K[:, :, None, 0, 2]  # pixels; pixel centres at +0.5
    v = K[:, :, None, 1, 1] * cam[..., 1] / zs + K[:, :, None, 1, 2]
    return torch.stack([u / width * 2 - 1, v / height * 2 - 1], dim=-1), front


def plane_points(res: int, depth: int, box: float, device=None, dtype=torch.float32) -> Tensor:
    """Sample points [3, res, res, depth, 3] (model frame): texel (row, col) of plane p, `depth` points along
    its normal axis at bin centres of [-box, box]."""
    c = ((torch.arange(res, device=device, dtype=dtype) + 0.5) / res * 2 - 1) * box  # texel centres
    d = ((torch.arange(depth, device=device, dtype=dtype) + 0.5) / depth * 2 - 1) * box
    pts = torch.empty(3, res, res, depth, 3, device=device, dtype=dtype)
    for p, (col_axis, row_axis) in enumerate(PLANE_AXES):
        normal = 3 - col_axis - row_axis
        pts[p, ..., col_axis] = c[None, :, None]
        pts[p, ..., row_axis] = c[:, None, None]
        pts[p, ..., normal] = d[None, None, :]
    return pts


@torch.no_grad()
def lift_views(rgb: Tensor, mask: Tensor, c2w: Tensor, K: Tensor, points: Tensor, background: float = 1.0
               ) -> Tensor:
    """rgb [B,V,3,H,W] (on the background), mask [B,V,1,H,W], c2w/K [B,V,4,4]/[B,V,3,3] (model frame, pixels of
    H×W), `points` = plane_points(res, depth, box) → features [B, 3, FEATURES + depth, res, res] (module
    docstring)."""
    B, V, _, H, W = rgb.shape
    _, res, _, depth, _ = points.shape
    pts = points.to(rgb).reshape(1, -1, 3).expand(B, -1, -1)
    grid, front = _project(pts, c2w.to(rgb.dtype), K.to(rgb.dtype), H, W)  # [B,V,N,2], [B,V,N]
    img = torch.cat([rgb - background, mask], dim=2).reshape(B * V, 4, H, W)  # zeros pad = background, mask 0
    s = F.grid_sample(img, grid.reshape(B * V, 1, -1, 2), mode="bilinear", padding_mode="zeros",
                      align_corners=False).reshape(B, V, 4, -1) * front[:, :, None]
    m = s[:, :, 3].clamp(0, 1)  # [B, V, N]
    hull = m.amin(1)  # [B, N]
    seen = m.mean(1)
    col = (s[:, :, :3] * m[:, :, None]).sum(1) / m.sum(1).clamp_min(1e-6)[:, None] + background  # [B, 3, N]
    hull, seen = hull.reshape(B, 3, res, res, depth), seen.reshape(B, 3, res, res, depth)
    col = col.reshape(B, 3, 3, res, res, depth).transpose(1, 2)  # [B, plane, RGB, R, R, D]
    w = hull.sum(-1)
    rgb_line = torch.where(w[:, :, None] > 1e-6, (col * hull[:, :, None]).sum(-1) / w.clamp_min(1e-6)[:, :, None],
                           torch.full_like(col[..., 0], background))
    feats = [hull.amax(-1)[:, :, None], hull.mean(-1)[:, :, None], rgb_line, seen.mean(-1)[:, :, None],
             hull.permute(0, 1, 4, 2, 3)]
    return torch.cat(feats, dim=2)  # [B, 3, FEATURES + depth, res, res]


def hull_at(lines: Tensor, points: Tensor, box: float) -> Tensor:
    """The lifted visual hull at points (`model.lift_hull`): lines [B, N, 3, D] (each plane's hull profile at
    the points' texels, the last `depth` channels of the planes sampled by `sample_triplane`), points
    [B, N, 3] (model frame) → [B, N, 3], one estimate per plane, linear along its normal axis between the bin
    centres (clamped beyond the first and last)."""
    D = lines.shape[-1]
    normal = [3 - a - b for a, b in PLANE_AXES]
    pos = ((points[..., normal] / box).to(lines.dtype) + 1) * 0.5 * D - 0.5  # bin coordinate [B, N, 3]
    pos = pos.clamp(0, D - 1)
    k0 = pos.floor().long().clamp(max=max(D - 2, 0))
    w = (pos - k0)[..., None]
    h0, h1 = lines.gather(-1, k0[..., None]), lines.gather(-1, (k0 + 1).clamp(max=D - 1)[..., None])
    return (h0 * (1 - w) + h1 * w)[..., 0]


def sample_hull(profile: Tensor, points: Tensor, box: float) -> Tensor:
    """`hull_at` from the profile planes [B, 3, D, R, R] (the last `depth` features of `lift_views`), read
    bilinearly over each plane's texels as `sample_triplane` reads planes."""
    B, _, D = profile.shape[:3]
    return hull_at(sample_triplane(profile, points, box).reshape(B, -1, 3, D), points, box)


class ViewLift(nn.Module):
    """`lift_views` features → plane channels by a shared 1×1 convolution (added to the generated planes), and
    the hull profile (the last `depth` features, for `sample_hull`)."""

    def __init__(self, channels: int, res: int, box: float, depth: int) -> None:
        super().__init__()
        # Fixed per model: computed once, moved with the module, not saved (no state-dict key).
        self.register_buffer("points", plane_points(res, depth, box), persistent=False)
        self.proj = nn.Conv2d(FEATURES + depth, channels, kernel_size=1)

    def forward(self, rgb: Tensor, mask: Tensor, c2w: Tensor, K: Tensor, background: float = 1.0
                ) -> tuple[Tensor, Tensor]:
        f = lift_views(rgb, mask, c2w, K, self.points, background)  # [B, 3, F, R, R]
        B = f.shape[0]
        y = self.proj(f.reshape(B * 3, *f.shape[2:]).to(self.proj.weight.dtype))
        return y.reshape(B, 3, *y.shape[1:]), f[:, :, FEATURES:]

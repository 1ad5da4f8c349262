"""Camera maths for the model, in torch: rays through pixel centres, Plücker channels, the 10-channel input,
OpenCV → clip space for a rasterizer, and the one fixed similarity into the released model's frame.

Every convention here is derived from the contract's single camera convention: `c2w` 4×4 in OpenCV axes (x right,
y down, z forward), `K` 3×3 in pixels, pixel (col i, row j) centred at (i + 0.5, j + 0.5). Each derived
convention lives in exactly one function:

- rays: `camera_rays` (unit directions in the world frame, origin = camera centre);
- Plücker: `plucker` (direction d, then the moment; ours o × d, the released model's d × o);
- model input: `build_input` (channel order by name, see `INPUT_ORDERS`);
- rasterizer clip space: `opencv_to_clip` (nvdiffrast: clip = P · w2c · p, rows of the output image = rows
  of the OpenCV image, no flip);
- released-model frame: `official_frame_matrix` / `to_official_frame` (ours Z-up, data in [-0.5, 0.5]^3 →
  theirs Y-up, data in [-1, 1]^3).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Channel layouts of the 10-channel model input ([B,V,10,H,W]).
#   rgb_mask_plucker    (ours):     RGB(3), mask(1), d(3), o × d(3)
#   rgb_dir_moment_mask (released): RGB(3), d(3), d × o(3), mask(1)
INPUT_ORDERS = ("rgb_mask_plucker", "rgb_dir_moment_mask")

# Patch of an image: (top row, left column, height, width) in pixels of the full image.
Patch = tuple[int, int, int, int]


def pixel_centres(height: int, width: int, patch: Patch | None = None, *, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel-centre coordinates (u, v) = (col + 0.5, row + 0.5) of an image or a patch of it: [h, w, 2]."""
    top, left, h, w = patch if patch is not None else (0, 0, height, width)
    if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > height or left + w > width:
        raise ValueError(f"patch {patch} does not fit a {height}x{width} image")
    v = torch.arange(top, top + h, device=device, dtype=dtype) + 0.5
    u = torch.arange(left, left + w, device=device, dtype=dtype) + 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv], dim=-1)


def camera_rays(c2w: Tensor, K: Tensor, height: int, width: int, patch: Patch | None = None
                ) -> tuple[Tensor, Tensor]:
    """World-frame rays through pixel centres.

    c2w: [..., 4, 4] OpenCV camera-to-world; K: [..., 3, 3] pixels of the (height, width) image.
    Returns origins [..., h, w, 3] (the camera centre, repeated) and unit directions [..., h, w, 3], where
    (h, w) is the patch size (or the image size without a patch).
    """
    _check_cameras(c2w, K)
    uv = pixel_centres(height, width, patch, device=c2w.device, dtype=c2w.dtype)  # [h, w, 2]
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    x = (uv[..., 0] - cx) / fx  # [..., h, w]
    y = (uv[..., 1] - cy) / fy
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [..., h, w, 3]
    R = c2w[..., None, None, :3, :3]  # [..., 1, 1, 3, 3]
    d = (R @ d_cam[..., None])[..., 0]
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    return o, d


def plucker(rays_o: Tensor, rays_d: Tensor, moment: str = "o_cross_d") -> Tensor:
    """Plücker coordinates [..., 6] = (d, m) of rays [..., 3]; m = o × d (ours) or d × o (the released model's).

    The moment does not depend on which point of the line is taken as o, which is what makes the pair a
    line coordinate; d is expected to be unit length (as `camera_rays` returns it).
    """
    if moment == "o_cross_d":
        m = torch.cross(rays_o, rays_d, dim=-1)
    elif moment == "d_cross_o":
        m = torch.cross(rays_d, rays_o, dim=-1)
    else:
        raise ValueError(f"unknown moment convention {moment!r} (o_cross_d | d_cross_o)")
    return torch.cat([rays_d, m], dim=-1)


def build_input(rgb: Tensor, mask: Tensor, c2w: Tensor, K: Tensor, order: str = "rgb_mask_plucker") -> Tensor:
    """The model's per-pixel input: rgb [B,V,3,H,W], mask [B,V,1,H,W], c2w [B,V,4,4], K [B,V,3,3] → [B,V,10,H,W].

    `order` names the channel layout (`INPUT_ORDERS`). RGB is expected already composited on the
    background (the loader does this).
    """
    if rgb.ndim != 5 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be [B,V,3,H,W], got {tuple(rgb.shape)}")
    B, V, _, H, W = rgb.shape
    if mask.shape != (B, V, 1, H, W):
        raise ValueError(f"mask must be [B,V,1,H,W] = {(B, V, 1, H, W)}, got {tuple(mask.shape)}")
    if c2w.shape != (B, V, 4, 4) or K.shape != (B, V, 3, 3):
        raise ValueError(f"c2w/K must be [B,V,4,4]/[B,V,3,3] with B,V = {B},{V}, got "
                         f"{tuple(c2w.shape)}/{tuple(K.shape)}")
    o, d = camera_rays(c2w.to(rgb.dtype), K.to(rgb.dtype), H, W)  # [B,V,H,W,3]
    if order == "rgb_mask_plucker":
        rays = plucker(o, d, "o_cross_d").permute(0, 1, 4, 2, 3)  # [B,V,6,H,W]
        return torch.cat([rgb, mask, rays], dim=2)
    if order == "rgb_dir_moment_mask":
        rays = plucker(o, d, "d_cross_o").permute(0, 1, 4, 2, 3)
        return torch.cat([rgb, rays, mask], dim=2)
    raise ValueError(f"unknown input order {order!r} (one of {', '.join(INPUT_ORDERS)})")


def intrinsics_from_fxfycxcy(fxfycxcy: Tensor) -> Tensor:
    """[..., 4] (fx, fy, cx, cy) → K [..., 3, 3] (the released code stores intrinsics this way)."""
    fx, fy, cx, cy = fxfycxcy.unbind(-1)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack([fx, zero, cx, zero, fy, cy, zero, zero, one], dim=-1).reshape(*fx.shape, 3, 3)


def opencv_to_clip(c2w: Tensor, K: Tensor, height: int, width: int, near: float = 0.1, far: float = 100.0
                   ) -> Tensor:
    """Model-view-projection [..., 4, 4] taking world points (homogeneous) to nvdiffrast clip space.

    nvdiffrast rasterizes pixel (col i, row j) at NDC x = (2i + 1)/W − 1, y = (2j + 1)/H − 1, and row 0 of
    its output is NDC y = −1. Mapping the OpenCV pixel coordinate (u, v) to NDC (2u/W − 1, 2v/H − 1) therefore
    puts the rasterized image in the same row order as our OpenCV images (no flip anywhere) and pixel centres
    on pixel centres. w_clip = z_camera (> 0 in front); NDC z runs from −1 at `near` to +1 at `far`.
    (The y-down NDC mirrors the image, so triangle winding flips; we rasterize without culling.)
    """
    _check_cameras(c2w, K)
    fx, fy, cx, cy = K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    a = torch.full_like(fx, (far + near) / (far - near))
    b = torch.full_like(fx, -2.0 * far * near / (far - near))
    proj = torch.stack([
        2 * fx / width, zero, 2 * cx / width - 1, zero,
        zero, 2 * fy / height, 2 * cy / height - 1, zero,
        zero, zero, a, b,
        zero, zero, one, zero,
    ], dim=-1).reshape(*fx.shape, 4, 4)
    return proj @ torch.linalg.inv(c2w)


# ----------------------------------------------------------------------------------------------------------
# The released model's frame.
# ----------------------------------------------------------------------------------------------------------

# Our Z-up world → their Y-up world: (x, y, z) ↦ (x, z, −y), a proper rotation (det +1); it is the same
# axis change as Blender's glTF exporter, so "up" goes to +Y and "front" (−Y in Blender) goes to +Z.
ZUP_TO_YUP = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def official_frame_matrix(scale: float = 2.0) -> Tensor:
    """The similarity S [4, 4] with p_theirs = S · p_ours: rotate Z-up to Y-up, then scale.

    `scale` = 2 takes our normalised data ([-0.5, 0.5]^3) to their [-1, 1]^3 box.
    """
    S = torch.eye(4)
    S[:3, :3] = scale * ZUP_TO_YUP
    return S


def to_official_frame(c2w: Tensor, scale: float = 2.0) -> Tensor:
    """Camera poses [..., 4, 4] from our frame into the released model's (the one place this is applied).

    Rotation R' = A·R and centre t' = s·A·t (A = `ZUP_TO_YUP`); the pose stays a rigid OpenCV c2w — only the
    world is rescaled, so K and the image are unchanged.
    """
    A = ZUP_TO_YUP.to(c2w)
    out = c2w.clone()
    out[..., :3, :3] = A @ c2w[..., :3, :3]
    out[..., :3, 3] = scale * (c2w[..., :3, 3] @ A.T)
    return out


def points_to_official_frame(points: Tensor, scale: float = 2.0) -> Tensor:
    """Points [..., 3] from our frame into the released model's: p' = s·A·p."""
    return scale * (points @ ZUP_TO_YUP.to(points).T)


def _check_cameras(c2w: Tensor, K: Tensor) -> None:
    if c2w.shape[-2:] != (4, 4) or K.shape[-2:] != (3, 3) or c2w.shape[:-2] != K.shape[:-2]:
        raise ValueError(f"c2w [...,4,4] and K [...,3,3] with matching leading dims expected, got "
                         f"{tuple(c2w.shape)} and {tuple(K.shape)}")

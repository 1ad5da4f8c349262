"""Training losses shared by both stages: MSE, LPIPS, mask, depth, the ray-opacity regulariser, and PSNR.

Images are [N, 3, H, W] in [0, 1] unless said otherwise. LPIPS takes [-1, 1] inputs (the lpips package's
convention); `LPIPSLoss` converts, so callers always pass [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from training.metrics import psnr  # noqa: F401 - the one PSNR (100 dB cap), imported by the objectives
from training.model.renderer import ray_box


def mse(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error; with `weight` (broadcastable, e.g. a mask [N,1,H,W]) the weighted mean."""
    err = (pred - target) ** 2
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1e-8)


def mask_loss(opacity: Tensor, mask: Tensor) -> Tensor:
    """MSE between rendered opacity and the ground-truth foreground mask (both [N,1,H,W] in [0,1])."""
    return F.mse_loss(opacity, mask)


def depth_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared depth error on foreground pixels only ([N,1,H,W]; target 0 = background, as stored).

    Background pixels have no depth to match; they are held by the mask loss instead.
    """
    fg = target > 0
    if mask is not None:
        fg = fg & (mask > 0.5)
    fg = fg.to(pred.dtype)
    return (((pred - target) ** 2) * fg).sum() / fg.sum().clamp_min(1.0)


class LPIPSLoss(torch.nn.Module):
    """LPIPS with its real ImageNet backbone (via `training.lpips_weights.load_lpips`), frozen.

    `size` > 0 resizes both images to size² first (the official config scores at 256²); 0 keeps them.
    """

    def __init__(self, net: str = "vgg", size: int = 0):
        super().__init__()
        from training.lpips_weights import load_lpips

        self.net = load_lpips(net)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.size = size

    def train(self, mode: bool = True) -> LPIPSLoss:
        # The backbone stays in eval mode whatever the trainer asks (it is a fixed metric, not a model).
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """pred, target [N,3,H,W] in [0,1] -> mean LPIPS (scalar)."""
        if self.size and pred.shape[-1] != self.size:
            pred = F.interpolate(pred, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                 antialias=True)
            target = F.interpolate(target, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.net(pred * 2 - 1, target * 2 - 1).mean()


def planar_to_ray_depth(depth: Tensor, rays_d: Tensor, forward: Tensor) -> Tensor:
    """Planar depth (camera z, as stored) -> distance along the ray: t = z / (d · forward).

    depth [...,1], rays_d [...,3] unit directions, forward [...,3] the camera's +z axis in world (c2w[:3,2]).
    """
    cos = (rays_d * forward).sum(-1, keepdim=True).clamp_min(1e-6)
    return depth / cos


def ray_opacity_regulariser(density_fn: Callable[[Tensor], Tensor], rays_o: Tensor, rays_d: Tensor,
                            depth_t: Tensor, box: float, delta: float | Tensor, near_min: float = 0.0,
                            u: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Opacity of one random point per ray in the known-empty space in front of the surface, L1 to 0.

    For each ray the point is drawn uniformly between the box entry and the ground-truth surface
    (`depth_t`, distance along the ray; 0 = background, then the box exit is used, as the whole chord is
    empty). Its opacity over one sample interval is 1 − exp(−σ·Δt) with Δt = `delta` (a float, or [B,N,1]
    per ray, e.g. `bin_length`: the renderer's spacing), and the loss is its mean (L1 towards 0, opacity
    being non-negative).

    rays_o, rays_d [B,N,3] (unit d), depth_t [B,N,1]; density_fn: points [B,N,3] -> σ [B,N,1] (≥ 0).
    `u` [B,N,1] in [0,1) fixes the draw (tests); otherwise it comes from `generator`.
    Rays that miss the box, or whose surface lies before the entry, contribute 0.
    """
    near, far, hit = ray_box(rays_o, rays_d, box, near_min)
    end = torch.where(depth_t > 0, depth_t, far)
    valid = hit & (end > near)
    if u is None:
        u = torch.rand(depth_t.shape, generator=generator, device=depth_t.device, dtype=depth_t.dtype)
    t = near + u * (end - near).clamp_min(0.0)
    sigma = density_fn(rays_o + rays_d * t)
    opacity = 1.0 - torch.exp(-sigma * delta)
    valid = valid.to(opacity.dtype)
    return (opacity * valid).sum() / valid.sum().clamp_min(1.0)


def bin_length(rays_o: Tensor, rays_d: Tensor, box: float, samples: int, near_min: float = 0.0) -> Tensor:
    """The renderer's bin length per ray, (far − near) / samples, [B,N,1] (0 for rays missing the box)."""
    near, far, _ = ray_box(rays_o, rays_d, box, near_min)
    return (far - near) / samples

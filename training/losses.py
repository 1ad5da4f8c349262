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


def depth_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, mean_over: str = "foreground") -> Tensor:
    """Squared depth error on foreground pixels only ([N,1,H,W]; target 0 = background, as stored).

    Background pixels have no depth to match; they are held by the mask loss instead. `mean_over`:
    "pixels" divides the sum by every pixel, the released `MeshRenderLoss` (mean((pd − gd)²·[gd > 0]));
    "foreground" by the foreground pixels only (then also restricted to mask > 0.5 when a mask is given),
    which weighs depth more on small silhouettes.
    """
    fg = target > 0
    if mean_over == "pixels":
        return (((pred - target) ** 2) * fg.to(pred.dtype)).mean()
    if mean_over != "foreground":
        raise ValueError(f"depth loss mean_over must be pixels or foreground, got {mean_over!r}")
    if mask is not None:
        fg = fg & (mask > 0.5)
    fg = fg.to(pred.dtype)
    return (((pred - target) ** 2) * fg).sum() / fg.sum().clamp_min(1.0)


def normal_losses(pred: Tensor, target: Tensor, pred_mask: Tensor, target_mask: Tensor) -> dict[str, Tensor]:
    """The released `MeshRenderLoss` normal terms (weight 0 in its config and in the paper; our stage 2 does
    not use them, the loader delivers no supervision normals): normals [N,3,H,W] (world, unit), masks
    [N,1,H,W]. With m = target_mask·pred_mask both normals are blended to (0, 0, 1) by 1 − m; `normal` is
    1 − mean over m > 0 of |⟨pred, target⟩|, `normal_l2` the mean over all pixels of m·mean_c (pred − target)²."""
    m = target_mask * pred_mask
    up = torch.tensor([0.0, 0.0, 1.0], device=pred.device, dtype=pred.dtype).view(1, 3, 1, 1)
    p, t = pred * m + (1 - m) * up, target * m + (1 - m) * up
    cos = (p * t).sum(1, keepdim=True).abs()
    return {"normal": 1 - cos[m > 0].mean(), "normal_l2": (m * ((p - t) ** 2).mean(1, keepdim=True)).mean()}


class LPIPSLoss(torch.nn.Module):
    """LPIPS with its real ImageNet backbone (via `training.lpips_weights.load_lpips`), frozen.

    `size` > 0 resizes both images to size² first, bilinear without antialiasing (`align_corners=False`),
    which is the released `MeshRenderLoss` call at 256²; 0 keeps them.
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
            pred = F.interpolate(pred, size=(self.size, self.size), mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(pred * 2 - 1, target * 2 - 1).mean()


def ray_opacity_samples(rays_o: Tensor, rays_d: Tensor, depth: Tensor, box: float, near_min: float = 0.0,
                        u: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Where the ray-opacity regulariser looks: one point per ray, uniform between the box entry and the end
    of the known-empty stretch (the released `MeshGen.base_forward`, lines 268–308 of snap_gtr 2916db7).

    rays_o, rays_d [B,N,3] in any frame and scale; `depth` [B,N,1] is the ground-truth surface as a
    parameter t along rays_d (0 = background). The released code passes directions with camera-z component
    1, so that t is the planar depth as stored. The stretch ends at the surface on foreground rays and at the
    box exit on background rays. Returns t [B,N,1] (near + u·(end − near)), end [B,N,1], points o + t·d
    [B,N,3] (points before a surface that lies in front of the entry fall outside the box, as released),
    length [B,N,1] = |t − end|·|d| (a length in rays_o's units, from the point to the surface or the exit)
    and valid [B,N,1] (rays that meet the box). Nothing here carries a gradient (released: `no_grad`).
    """
    with torch.no_grad():
        near, far, valid = ray_box(rays_o, rays_d, box, near_min)
        end = torch.where(depth > 0, depth, far)
        if u is None:
            u = torch.rand(depth.shape, generator=generator, device=depth.device, dtype=depth.dtype)
        t = u * (end - near) + near
        points = rays_o + t * rays_d
        length = (t - end).abs() * rays_d.norm(dim=-1, keepdim=True)
    return {"t": t, "end": end, "points": points, "length": length, "valid": valid}


def ray_opacity_regulariser(density_fn: Callable[[Tensor], Tensor], rays_o: Tensor, rays_d: Tensor,
                            depth: Tensor, box: float, near_min: float = 0.0, length_scale: float = 1.0,
                            u: Tensor | None = None, generator: torch.Generator | None = None,
                            details: dict | None = None) -> Tensor:
    """The stage-2 ray-opacity regulariser L_r as released: mean over ALL rays of 1 − exp(−σ(p)·‖p − p_end‖).

    One point p per ray (`ray_opacity_samples`), its opacity over the whole rest of the empty stretch
    (from p to the surface, or to the box exit on background rays), 0 on rays that miss the box, L1
    towards 0 averaged over every ray given (missed ones count as 0, as released). `length_scale` turns a
    length of the rays' frame into the density's units (`model.units_per_ours`). The gradient reaches
    only σ. `details` (a dict), when given, receives the samples, `density` and `opacity` (tests, logs).

    density_fn: points [B,N,3] -> σ [B,N,1] (≥ 0); shapes otherwise as in `ray_opacity_samples`.
    """
    smp = ray_opacity_samples(rays_o, rays_d, depth, box, near_min, u, generator)
    sigma = density_fn(smp["points"])
    opacity = 1.0 - torch.exp(-sigma * (smp["length"] * length_scale))
    opacity = torch.where(smp["valid"], opacity, torch.zeros_like(opacity))
    if details is not None:
        details.update(smp, density=sigma, opacity=opacity)
    return opacity.abs().mean()

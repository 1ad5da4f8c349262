"""Stage-1 objective (paper §3.2, NeRF stage): triplane from the input views, volume-rendered supervision
patches, loss MSE + λ_p·LPIPS (+ optional mask MSE). The generic loop (`training.loop`) drives it.

Batches are the loader's (docs/ARCHITECTURE.md "Loader batch"): each supervision view arrives as a random
`patch_size` window of the `render_size` view with K already shifted to the window, so rendering the window
is rendering an image of the window's size with that K. With `rays` > 0 and no window (`patch_size` 0: the
demo; the paper's 128² windows keep rendering windows) the supervision is instead
that many random pixels per asset, drawn over all its supervision views (whole views at `render_size`): the
rays cover every part of every view at the render resolution for the cost of a small window (LPIPS, which
needs images, is then off).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.config import NerfConfig
from training.cameras import camera_rays
from training.losses import LPIPSLoss, mask_loss, mse, psnr


class NerfObjective(nn.Module):
    """`forward(batch) -> (loss, scalars)`; `.model` is the GTR being trained (and checkpointed)."""

    def __init__(self, model: nn.Module, cfg: NerfConfig, lpips: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        # LPIPS is a frozen metric network; built only when it is weighted in.
        self.random_rays = cfg.rays > 0 and cfg.patch_size == 0
        self.lpips = (lpips if lpips is not None or cfg.lpips_weight == 0 or self.random_rays
                      else LPIPSLoss(cfg.lpips_net))

    def render(self, batch: dict) -> dict[str, Tensor]:
        """Triplane from the inputs, render the supervision windows: rgb [B,Vs,3,h,w], opacity [B,Vs,1,h,w]."""
        images = torch.cat([batch["input_rgb"], batch["input_mask"]], dim=2)  # [B,Vi,4,H,W]
        planes = self.model.triplane(images, batch["input_c2w"], batch["input_K"])
        h, w = batch["sup_rgb"].shape[-2:]
        return self.model.render_views(planes, batch["sup_c2w"], batch["sup_K"], h, w,
                                       background=batch["background"])

    def render_random_rays(self, batch: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """`cfg.rays` random pixels per asset over its supervision views: (rendered, ground truth), each
        rgb [B,N,3] and opacity / mask [B,N,1]."""
        images = torch.cat([batch["input_rgb"], batch["input_mask"]], dim=2)
        planes = self.model.triplane(images, batch["input_c2w"], batch["input_K"])
        B, Vs, _, h, w = batch["sup_rgb"].shape
        o, d = camera_rays(batch["sup_c2w"], batch["sup_K"], h, w)  # [B,Vs,h,w,3]
        pick = torch.randint(0, Vs * h * w, (B, self.cfg.rays), device=o.device)

        def take(x: Tensor) -> Tensor:  # [B, Vs·h·w, c] rows at `pick` -> [B, N, c]
            return torch.gather(x, 1, pick[..., None].expand(-1, -1, x.shape[-1]))

        def pixels(x: Tensor) -> Tensor:  # [B,Vs,c,h,w] -> [B, Vs·h·w, c]
            return x.permute(0, 1, 3, 4, 2).reshape(B, Vs * h * w, -1)

        out = self.model.render_rays(planes, take(o.reshape(B, -1, 3)), take(d.reshape(B, -1, 3)),
                                     background=batch["background"])
        gt = {"rgb": take(pixels(batch["sup_rgb"])), "mask": take(pixels(batch["sup_mask"]))}
        return out, gt

    def ray_losses(self, out: dict[str, Tensor], gt: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        terms = {"mse": mse(out["rgb"].float(), gt["rgb"].float())}
        loss = terms["mse"]
        if self.cfg.mask_weight > 0:
            terms["mask"] = mask_loss(out["opacity"].float(), gt["mask"].float())
            loss = loss + self.cfg.mask_weight * terms["mask"]
        terms["psnr"] = -10.0 * torch.log10(terms["mse"].detach().clamp_min(1e-10))
        return loss, terms

    def losses(self, batch: dict, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        pred = out["rgb"].flatten(0, 1).float()  # [B·Vs,3,h,w]
        gt = batch["sup_rgb"].flatten(0, 1).float()
        terms = {"mse": mse(pred, gt)}
        loss = terms["mse"]
        if self.cfg.lpips_weight > 0 and self.lpips is not None:
            terms["lpips"] = self.lpips(pred, gt)
            loss = loss + self.cfg.lpips_weight * terms["lpips"]
        if self.cfg.mask_weight > 0:
            terms["mask"] = mask_loss(out["opacity"].flatten(0, 1).float(), batch["sup_mask"].flatten(0, 1))
            loss = loss + self.cfg.mask_weight * terms["mask"]
        terms["psnr"] = psnr(pred.detach(), gt).mean()
        return loss, terms

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        if self.random_rays:
            loss, terms = self.ray_losses(*self.render_random_rays(batch))
        else:
            loss, terms = self.losses(batch, self.render(batch))
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def validate(self, batch: dict) -> dict[str, float]:
        """Loss terms and PSNR of the supervision windows of the fixed validation batch."""
        _, terms = self.losses(batch, self.render(batch))
        return {k: float(v) for k, v in terms.items()}

    @torch.no_grad()
    def images(self, batch: dict, assets: int = 2) -> dict[str, Tensor]:
        """Rows for TensorBoard: input views, rendered windows, ground-truth windows ([N,3,h,w] each)."""
        b = {k: (v[:assets] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
        out = self.render(b)
        return {"inputs": b["input_rgb"].flatten(0, 1), "render": out["rgb"].flatten(0, 1).float().clamp(0, 1),
                "ground_truth": b["sup_rgb"].flatten(0, 1), "opacity": out["opacity"].flatten(0, 1).float()}

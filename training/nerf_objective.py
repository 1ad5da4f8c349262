"""Stage-1 objective (paper §3.2, NeRF stage): triplane from the input views, volume-rendered supervision
patches, loss MSE + λ_p·LPIPS (+ optional mask MSE). The generic loop (`training.loop`) drives it.

Batches are the loader's (docs/ARCHITECTURE.md "Loader batch"): each supervision view arrives as a random
`patch_size` window of the `render_size` view with K already shifted to the window, so rendering the window
is rendering an image of the window's size with that K.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.config import NerfConfig
from training.losses import LPIPSLoss, mask_loss, mse, psnr


class NerfObjective(nn.Module):
    """`forward(batch) -> (loss, scalars)`; `.model` is the GTR being trained (and checkpointed)."""

    def __init__(self, model: nn.Module, cfg: NerfConfig, lpips: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        # LPIPS is a frozen metric network; built only when it is weighted in.
        self.lpips = lpips if lpips is not None or cfg.lpips_weight == 0 else LPIPSLoss(cfg.lpips_net)

    def render(self, batch: dict) -> dict[str, Tensor]:
        """Triplane from the inputs, render the supervision windows: rgb [B,Vs,3,h,w], opacity [B,Vs,1,h,w]."""
        images = torch.cat([batch["input_rgb"], batch["input_mask"]], dim=2)  # [B,Vi,4,H,W]
        planes = self.model.triplane(images, batch["input_c2w"], batch["input_K"])
        h, w = batch["sup_rgb"].shape[-2:]
        return self.model.render_views(planes, batch["sup_c2w"], batch["sup_K"], h, w,
                                       background=batch["background"])

    def losses(self, batch: dict, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        pred = out["rgb"].flatten(0, 1).float()  # [B·Vs,3,h,w]
        gt = batch["sup_rgb"].flatten(0, 1).float()
        terms = {"mse": mse(pred, gt)}
        loss = terms["mse"]
        if self.cfg.lpips_weight > 0:
            terms["lpips"] = self.lpips(pred, gt)
            loss = loss + self.cfg.lpips_weight * terms["lpips"]
        if self.cfg.mask_weight > 0:
            terms["mask"] = mask_loss(out["opacity"].flatten(0, 1).float(), batch["sup_mask"].flatten(0, 1))
            loss = loss + self.cfg.mask_weight * terms["mask"]
        terms["psnr"] = psnr(pred.detach(), gt).mean()
        return loss, terms

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
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

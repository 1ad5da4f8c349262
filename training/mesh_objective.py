"""Stage-2 objective (paper §3.2, "Geometry refinement with NeRF initialization"): the triplane of the input
views meshed by differentiable marching cubes on sdf = −(density − s), rasterized into the supervision
views and coloured by f_c (`training.mesh.render_mesh`), compared at the full supervision resolution.

Loss: w_rgb·MSE + w_p·LPIPS + w_d·depth + w_m·mask + w_r·ray-opacity regulariser (weights in `mesh.*`).
A step whose meshes are all empty (no level crossing) is counted (`empty_meshes`) and contributes zero loss,
still tied to every trainable parameter (what DDP needs). The generic loop (`training.loop`) drives it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.config import MeshConfig
from training.cameras import camera_rays
from training.losses import (
    LPIPSLoss,
    depth_loss,
    mask_loss,
    mse,
    psnr,
    ray_opacity_regulariser,
)
from training.mesh import extract_mesh, extract_options, mesh_backends, render_mesh
from training.mesh_level import mesh_level
from training.ops.raster import Rasterizer


def image_terms(pred: dict[str, Tensor], gt_rgb: Tensor, gt_mask: Tensor, gt_depth: Tensor,
                depth_mean_over: str = "foreground") -> dict[str, Tensor]:
    """The unweighted image terms of stage 2 (the released `MeshRenderLoss`, fixture `mesh_losses`):
    rgb = MSE over all pixels (background included), mask = MSE of the (antialiased) coverage, depth =
    squared error on ground-truth foreground (`training.losses.depth_loss`). pred {rgb, mask, depth} and the
    targets are [N,c,H,W]; depth planar, 0 = background."""
    return {"rgb": mse(pred["rgb"], gt_rgb), "mask": mask_loss(pred["mask"], gt_mask),
            "depth": depth_loss(pred["depth"], gt_depth, gt_mask, depth_mean_over)}


def regulariser_rays(c2w: Tensor, K: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Rays of the supervision pixels for the regulariser: origins and directions [..., h, w, 3] whose
    camera-z component is 1 (the released `get_cam_rays(norm=False)`), so that the parameter t along them
    is the planar depth the renders store."""
    o, d = camera_rays(c2w, K, height, width)
    forward = c2w[..., None, None, :3, 2]
    return o, d / (d * forward).sum(-1, keepdim=True)


class MeshObjective(nn.Module):
    """`forward(batch) -> (loss, scalars)` for the mesh stage; `.model` is the GTR being fine-tuned."""

    def __init__(self, model: nn.Module, cfg: MeshConfig, lpips: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.lpips = (lpips if lpips is not None or cfg.lpips_weight == 0
                      else LPIPSLoss(cfg.lpips_net, size=cfg.lpips_size))
        self._raster: Rasterizer | None = None
        self.empty_total = 0  # assets whose mesh came out empty, since construction
        self.levels: list[float] = []  # the mesh level of each asset of the last render

    def rasterizer(self, device: torch.device) -> Rasterizer:
        if self._raster is None or self._raster.ctx_device.type != device.type:
            self._raster = Rasterizer(mesh_backends(self.cfg)[1], device)
        return self._raster

    def render(self, batch: dict) -> tuple[list[dict[str, Tensor] | None], Tensor]:
        """Per asset: the mesh render of its supervision views (None when the mesh is empty); and planes."""
        images = torch.cat([batch["input_rgb"], batch["input_mask"]], dim=2)  # [B,Vi,4,H,W]
        planes = self.model.triplane(images, batch["input_c2w"], batch["input_K"])  # [B,3,C,R,R]
        h, w = batch["sup_rgb"].shape[-2:]
        outs: list[dict[str, Tensor] | None] = []
        self.levels = []
        for b in range(planes.shape[0]):
            pl = planes[b:b + 1].float()
            self.levels.append(mesh_level(self.model, pl, batch["input_c2w"][b], batch["input_K"][b],
                                          batch["input_rgb"].shape[-1], self.cfg, batch["input_mask"][b]))
            verts, faces = extract_mesh(self.model, pl, self.cfg.grid, self.levels[-1], mesh_backends(self.cfg)[0],
                                        self.cfg.query_chunk, **extract_options(self.cfg))
            if len(faces) == 0:
                outs.append(None)
                continue
            outs.append(render_mesh(self.model, pl, verts, faces, batch["sup_c2w"][b], batch["sup_K"][b], h, w,
                                    batch["background"][b], self.rasterizer(verts.device),
                                    antialias=self.cfg.antialias, chunk=self.cfg.query_chunk,
                                    hard_color=self.cfg.hard_color))
        return outs, planes

    def regulariser(self, batch: dict, planes: Tensor) -> Tensor:
        """The released ray-opacity regulariser (`training.losses.ray_opacity_regulariser`) over the
        supervision rays: `mesh.reg_rays` random rays per asset, or all of them (0, as released)."""
        B, Vs = batch["sup_c2w"].shape[:2]
        h, w = batch["sup_rgb"].shape[-2:]
        o, d = regulariser_rays(batch["sup_c2w"].float(), batch["sup_K"].float(), h, w)  # [B,Vs,h,w,3]
        depth = batch["sup_depth"].float().permute(0, 1, 3, 4, 2)  # [B,Vs,h,w,1] planar = t along d
        o, d, depth = (x.reshape(B, Vs * h * w, -1) for x in (o, d, depth))
        n = self.cfg.reg_rays
        if 0 < n < Vs * h * w:  # an unbiased subsample of the same mean
            pick = torch.stack([torch.randperm(Vs * h * w, device=d.device)[:n] for _ in range(B)])  # [B,n]
            o, d, depth = (torch.gather(x, 1, pick[..., None].expand(-1, -1, x.shape[-1])) for x in (o, d, depth))
        # Box, near plane and density units come from the model, in our frame (docs/model.md "Frames").
        return ray_opacity_regulariser(lambda p: self.model.query_density(planes, p), o, d, depth,
                                       self.model.box_half_size_ours(), self.model.near_min_ours(),
                                       self.model.units_per_ours)

    def losses(self, batch: dict, outs: list[dict[str, Tensor] | None], planes: Tensor
               ) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        keep = [i for i, o in enumerate(outs) if o is not None]
        dev = planes.device
        terms: dict[str, Tensor] = {"empty_meshes": torch.tensor(float(len(outs) - len(keep)), device=dev)}
        if not keep:
            # Nothing to rasterize: a zero loss tied to every trainable parameter, not just the planes. With
            # planes alone f_d / f_c would get no gradient, and DDP (find_unused_parameters=False) raises on
            # the next step because their all-reduce never ran; a zero grad for each keeps ranks in step.
            zero = sum((p.sum() for p in self.parameters() if p.requires_grad), planes.sum()) * 0.0
            return zero, terms
        pred = {k: torch.cat([outs[i][k] for i in keep]).float() for k in ("rgb", "depth", "mask")}
        gt_rgb = torch.cat([batch["sup_rgb"][i] for i in keep]).float()  # [N,3,h,w]
        gt_mask = torch.cat([batch["sup_mask"][i] for i in keep]).float()
        gt_depth = torch.cat([batch["sup_depth"][i] for i in keep]).float() * c.depth_units
        pred["depth"] = pred["depth"] * c.depth_units
        terms.update(image_terms(pred, gt_rgb, gt_mask, gt_depth, c.depth_mean_over))
        loss = c.rgb_weight * terms["rgb"] + c.mask_weight * terms["mask"] + c.depth_weight * terms["depth"]
        if c.lpips_weight > 0:
            terms["lpips"] = self.lpips(pred["rgb"].clamp(0, 1), gt_rgb)
            loss = loss + c.lpips_weight * terms["lpips"]
        if c.reg_weight > 0:
            idx = torch.tensor(keep, device=dev)
            sub = {k: batch[k].index_select(0, idx) for k in ("sup_c2w", "sup_K", "sup_rgb", "sup_depth")}
            terms["reg"] = self.regulariser(sub, planes.index_select(0, idx).float())
            loss = loss + c.reg_weight * terms["reg"]
        terms["psnr"] = psnr(pred["rgb"].detach().clamp(0, 1), gt_rgb).mean()
        return loss, terms

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        outs, planes = self.render(batch)
        self.empty_total += sum(o is None for o in outs)
        loss, terms = self.losses(batch, outs, planes)
        terms["empty_meshes_total"] = torch.tensor(float(self.empty_total))
        terms["sdf_level"] = torch.tensor(sum(self.levels) / max(1, len(self.levels)))
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def validate(self, batch: dict) -> dict[str, float]:
        outs, planes = self.render(batch)
        _, terms = self.losses(batch, outs, planes)
        return {k: float(v) for k, v in terms.items()}

    @torch.no_grad()
    def images(self, batch: dict) -> dict[str, Tensor]:
        """TensorBoard rows: renders, ground truth, normals, masks and depth of the first asset's views."""
        outs, _ = self.render(batch)
        gt = batch["sup_rgb"][0].float()
        o = outs[0]
        if o is None:
            return {"ground_truth": gt}
        far = batch["sup_depth"][0].max().clamp_min(1e-6)
        return {"render": o["rgb"].clamp(0, 1), "ground_truth": gt, "normal": (o["normal"] + 1) * 0.5,
                "mask": o["mask"].expand(-1, 3, -1, -1),
                "depth": (o["depth"] / far).clamp(0, 1).expand(-1, 3, -1, -1),
                "depth_gt": (batch["sup_depth"][0].float() / far).clamp(0, 1).expand(-1, 3, -1, -1)}

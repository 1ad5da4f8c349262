"""Stage 1's random-ray supervision (`nerf.rays`): each ray is one pixel of one supervision view."""

from __future__ import annotations

import torch

from core.cameras import random_views
from core.config import ModelConfig, NerfConfig
from training.model import GTR
from training.nerf_objective import NerfObjective


def _batch(B: int = 2, Vi: int = 2, Vs: int = 3, S: int = 32, s: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    c2w = torch.as_tensor(random_views("rays-test", Vi + Vs, (2.0, 2.6))["c2w"], dtype=torch.float32)
    K = torch.tensor([[S * 1.2, 0.0, S / 2], [0.0, S * 1.2, S / 2], [0.0, 0.0, 1.0]])
    Ks = K.clone()
    Ks[:2] *= s / S
    return {"input_rgb": torch.rand(B, Vi, 3, S, S, generator=g), "input_mask": torch.rand(B, Vi, 1, S, S, generator=g),
            "input_c2w": c2w[None, :Vi].expand(B, -1, -1, -1), "input_K": K.expand(B, Vi, 3, 3),
            "sup_rgb": torch.rand(B, Vs, 3, s, s, generator=g), "sup_mask": torch.rand(B, Vs, 1, s, s, generator=g),
            "sup_c2w": c2w[None, Vi:].expand(B, -1, -1, -1), "sup_K": Ks.expand(B, Vs, 3, 3),
            "background": torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.4, 0.6]])}


def test_random_rays_are_pixels_of_the_supervision_views():
    torch.manual_seed(0)
    cfg = ModelConfig(width=32, depth=1, heads=2, head_dim=16, plane_res=4, upsample=2, plane_channels=8,
                      samples_per_ray=8)
    obj = NerfObjective(GTR(cfg), NerfConfig(rays=50, patch_size=0, lpips_weight=0.0)).eval()  # eval: no jitter
    batch = _batch()
    B, Vs, _, h, w = batch["sup_rgb"].shape
    torch.manual_seed(123)
    out, gt = obj.render_random_rays(batch)
    torch.manual_seed(123)
    pick = torch.randint(0, Vs * h * w, (B, 50))  # the draw render_random_rays makes first
    v, y, x = pick // (h * w), (pick // w) % h, pick % w
    with torch.no_grad():
        images = torch.cat([batch["input_rgb"], batch["input_mask"]], dim=2)
        planes = obj.model.triplane(images, batch["input_c2w"], batch["input_K"])
        full = obj.model.render_views(planes, batch["sup_c2w"], batch["sup_K"], h, w, background=batch["background"])
    b = torch.arange(B)[:, None].expand_as(pick)
    torch.testing.assert_close(gt["rgb"], batch["sup_rgb"][b, v, :, y, x])
    torch.testing.assert_close(gt["mask"], batch["sup_mask"][b, v, :, y, x])
    torch.testing.assert_close(out["rgb"], full["rgb"][b, v, :, y, x], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["opacity"], full["opacity"][b, v, :, y, x], atol=1e-5, rtol=1e-4)


def test_ray_loss_is_mse_plus_mask_and_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(width=32, depth=1, heads=2, head_dim=16, plane_res=4, upsample=2, plane_channels=8,
                      samples_per_ray=8)
    obj = NerfObjective(GTR(cfg), NerfConfig(rays=64, patch_size=0, lpips_weight=0.5, mask_weight=2.0))
    assert obj.lpips is None  # LPIPS needs images: off with rays
    loss, terms = obj(_batch())
    torch.testing.assert_close(loss, terms["mse"] + 2.0 * terms["mask"])
    loss.backward()
    assert all(p.grad is not None for p in obj.model.upsampler.parameters())


def test_windows_keep_rendering_views():
    # the paper's 128² windows (patch_size > 0) are rendered as images, with LPIPS, whatever `rays` says
    obj = NerfObjective(GTR(ModelConfig(width=32, depth=1, heads=2, head_dim=16, plane_res=4, upsample=2)),
                        NerfConfig(rays=64, patch_size=8, lpips_weight=0.0))
    assert not obj.random_rays

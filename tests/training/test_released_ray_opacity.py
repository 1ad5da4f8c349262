"""The stage-2 ray-opacity regulariser (training/losses.py, training/mesh_objective.py) against the released
`MeshGen.base_forward` (fixture official-gtr-tiny-v2 `ray_opacity`, README "ray_opacity.safetensors"):
two 16×16 supervision views, 512 rays, the released random t injected.

Every key of the fixture is held below (`HELD`)."""

from __future__ import annotations

import math

import torch

from core.config import MeshConfig
from tests.training.released import fixture, tiny_io, tiny_model
from training import cameras
from training.losses import ray_opacity_regulariser, ray_opacity_samples
from training.mesh_objective import MeshObjective, regulariser_rays

F = fixture("ray_opacity")
HELD = {"c2w", "intrinsics", "gt_depth", "code", "rays_o", "rays_d", "near_raw", "far_raw", "is_ray_valid",
        "depth_mask", "near", "far", "t_rand", "samples", "ray_pts", "ray_len", "density", "opacity_unmasked",
        "ray_opacities", "loss_ray_opacity_raw", "loss_ray_opacity_weighted", "grad_code_loss_ray_opacity_weighted"}
BOX, NEAR_MIN, WEIGHT = 1.0, 0.2, 0.5  # the released box, min_near and loss_ray_opacity weight
VALID = F["is_ray_valid"].bool()
# Camera rays: the same pinhole maths (pixel centres, K⁻¹, R) in another order; |o| ≈ 3, |d| ≈ 1.1, so a
# float32 ulp is ~2e-7 and a handful of operations give ≤ 1e-6.
ATOL_RAY = 1e-6
# Depth-like values t ≤ 5: one ulp 5e-7; samples go through u·(end − near) + near like the released code.
ATOL_T = 2e-6
# Field values and their gradient: the released decoder vs ours (test_convert_official: a few ulps).
ATOL = 1e-5


def _rays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K = cameras.intrinsics_from_fxfycxcy(F["intrinsics"])
    o, d = regulariser_rays(F["c2w"], K, 16, 16)  # [2,16,16,3], flattened (view, v, u) as released
    return o.reshape(1, -1, 3), d.reshape(1, -1, 3), F["gt_depth"].reshape(1, -1, 1)


def test_every_fixture_key_is_held_here():
    assert set(F) == HELD


def test_rays_are_the_released_unnormalised_camera_rays():
    o, d, depth = _rays()
    torch.testing.assert_close(o[0], F["rays_o"], atol=ATOL_RAY, rtol=0)
    torch.testing.assert_close(d[0], F["rays_d"], atol=ATOL_RAY, rtol=0)
    # camera-z component 1: t along d is the planar depth gt_depth stores (0 = background)
    z = (d[0].reshape(2, 256, 3) * F["c2w"][:, None, :3, 2]).sum(-1)
    torch.testing.assert_close(z, torch.ones(2, 256), atol=1e-6, rtol=0)
    assert torch.equal(depth[0, :, 0] > 0, F["depth_mask"].bool())
    # the supervision views and the code the densities come from are the first fixture's
    torch.testing.assert_close(F["code"], tiny_io()["triplane"], atol=2e-6, rtol=0)


def test_samples_points_and_lengths():
    o, d, depth = _rays()
    s = ray_opacity_samples(F["rays_o"][None], F["rays_d"][None], depth, BOX, NEAR_MIN, u=F["t_rand"][None, :, None])
    assert torch.equal(s["valid"][0, :, 0], VALID)  # 372 of 512 meet the box
    assert int(VALID.sum()) == 372
    v = VALID
    # near/far before the released in-place edits, on the rays that meet the box
    from training.model.renderer import ray_box

    near, far, _ = ray_box(F["rays_o"], F["rays_d"], BOX, NEAR_MIN)
    torch.testing.assert_close(near[v, 0], F["near_raw"][v], atol=ATOL_T, rtol=0)
    torch.testing.assert_close(far[v, 0], F["far_raw"][v], atol=ATOL_T, rtol=0)
    assert (F["near_raw"][~v] == 1e10).all()  # the released marker of a miss; ours: valid = False
    # after the edits: near untouched on valid rays; far = the surface on foreground rays, the exit otherwise
    torch.testing.assert_close(F["near"][v], F["near_raw"][v], atol=0, rtol=0)
    torch.testing.assert_close(s["end"][0, v, 0], F["far"][v], atol=ATOL_T, rtol=0)
    # invalid rays: the released code borrows min near / max far of the batch; their opacity is then zeroed,
    # so what they sample never matters (ours draws on [near_min, near_min]).
    assert torch.equal(F["near"][~v], F["near"][v].min().expand(int((~v).sum())))
    torch.testing.assert_close(s["t"][0, v, 0], F["samples"][v], atol=ATOL_T, rtol=0)
    torch.testing.assert_close(s["points"][0, v], F["ray_pts"][v], atol=ATOL_T, rtol=0)
    torch.testing.assert_close(s["length"][0, v, 0], F["ray_len"][v], atol=ATOL_T, rtol=0)
    # every foreground ray meets the box, so the released far := gt_depth never lands on an invalid ray
    assert (F["depth_mask"].bool() <= v).all()
    # t_rand is the first torch.rand((1, 512, 1)) after torch.manual_seed(0) on the CPU generator
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1, 512, 1)[0, :, 0], F["t_rand"])


def test_density_opacity_loss_and_gradient():
    model = tiny_model()
    code = F["code"].clone().requires_grad_(True)
    details: dict = {}
    loss = ray_opacity_regulariser(lambda p: model.query_density(code, p), F["rays_o"][None], F["rays_d"][None],
                                   F["gt_depth"].reshape(1, -1, 1), BOX, NEAR_MIN, 1.0, u=F["t_rand"][None, :, None],
                                   details=details)
    v = VALID
    torch.testing.assert_close(details["density"][0, v, 0], F["density"][v], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(details["opacity"][0, v, 0], F["opacity_unmasked"][v], atol=ATOL, rtol=0)
    torch.testing.assert_close(details["opacity"][0, :, 0], F["ray_opacities"], atol=ATOL, rtol=0)
    assert (details["opacity"][0, ~v] == 0).all() and (F["ray_opacities"][~v] == 0).all()
    # the loss is the mean over all 512 rays (missed ones count as 0), not over the 372 valid ones
    torch.testing.assert_close(loss, F["loss_ray_opacity_raw"], atol=1e-6, rtol=0)
    torch.testing.assert_close(WEIGHT * loss, F["loss_ray_opacity_weighted"], atol=1e-6, rtol=0)
    (WEIGHT * loss).backward()
    # the gradient flows only through σ (t, points, lengths are constants): the code's gradient of 0.5·loss
    torch.testing.assert_close(code.grad, F["grad_code_loss_ray_opacity_weighted"], atol=1e-6, rtol=1e-4)


def test_the_mesh_objective_reproduces_the_released_loss():
    """MeshObjective.regulariser on the fixture's batch, every ray (reg_rays = 0) and the same seed as the
    released run: the same draw, the same number."""
    model = tiny_model()
    obj = MeshObjective(model, MeshConfig(reg_rays=0, lpips_weight=0.0))
    K = cameras.intrinsics_from_fxfycxcy(F["intrinsics"])[None]
    batch = {"sup_c2w": F["c2w"][None], "sup_K": K, "sup_rgb": torch.zeros(1, 2, 3, 16, 16),
             "sup_depth": F["gt_depth"][None, :, None]}
    torch.manual_seed(0)
    with torch.no_grad():
        loss = obj.regulariser(batch, F["code"])
    torch.testing.assert_close(loss, F["loss_ray_opacity_raw"], atol=1e-6, rtol=0)


def test_the_regulariser_is_the_opacity_of_the_whole_empty_stretch():
    """The harm the old Δ = bin length did: with σ constant the released opacity of a point at fraction u
    is 1 − exp(−σ·(1−u)·L) for an empty stretch L, whose mean over u is 1 − (1 − e^{−σL})/(σL); the renderer's
    bin of L/256 gave ~1/256 of it for small σ."""
    o = torch.tensor([[[-3.0, 0.0, 0.0]]]).expand(1, 4000, 3)
    d = torch.tensor([[[1.0, 0.0, 0.0]]]).expand(1, 4000, 3)
    sigma = 0.4
    depth = torch.full((1, 4000, 1), 3.5)  # surface at x = 0.5: the empty stretch is [2, 3.5], L = 1.5
    u = ((torch.arange(4000) + 0.5) / 4000).reshape(1, -1, 1)  # a midpoint rule for E_u
    loss = ray_opacity_regulariser(lambda p: torch.full(p.shape[:-1] + (1,), sigma), o, d, depth, BOX, 0.0, u=u)
    L = 1.5
    want = 1 - (1 - math.exp(-sigma * L)) / (sigma * L)
    assert abs(loss.item() - want) < 1e-6
    # length_scale converts our lengths to the density's units: doubling it is doubling σ
    loss2 = ray_opacity_regulariser(lambda p: torch.full(p.shape[:-1] + (1,), sigma / 2), o, d, depth, BOX, 0.0,
                                    2.0, u=u)
    assert abs(loss2.item() - want) < 1e-6

"""training/inference.py, the public inference API, on a model with a known surface: the mesh of an analytic
sphere, refinement raising input-view PSNR, the RGBA render eval scores against ray casting in closed form,
and the PSNR reconstruct reports reproduced by the same renderer eval uses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.config import Config, load_config
from training.inference import EmptyMeshError, reconstruct
from training.mesh import rasterize_mesh
from training.model import GTR
from training.ops.raster import Rasterizer
from training.refine import psnr as views_psnr

SMALL = ["loader.input_size=48", "refine.render_size=48", "mesh.grid=24", "refine.texture_size=64",
         "refine.steps=6", "mesh.level_mode=fixed"]  # the analytic sphere below is the level-10 set


class SphereGTR(GTR):
    """A real GTR whose density is replaced by an analytic sphere of radius 0.35 (colour stays f_c on the
    triplane), so the mesh is known in closed form and the texture path is the real one."""

    def query_density(self, planes, points):
        return 10.0 + 40.0 * (0.35 - points.norm(dim=-1, keepdim=True))  # level 10 at |p| = 0.35

    def query(self, planes, points):
        return self.query_density(planes, points), self.query_color(planes, points)


def fresh_model(model_cls=GTR, overrides=()) -> tuple[GTR, Config]:
    cfg = load_config(None, SMALL + list(overrides))
    torch.manual_seed(0)
    model = model_cls(cfg.model).eval()
    for layer in model.color_mlp.layers:  # He init: a default-init f_c is flat (see test_refine.py)
        torch.nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
        torch.nn.init.zeros_(layer.bias)
    return model, cfg


def sphere_views(size: int = 48):
    """4 eval-layout views of a two-coloured sphere (left half red, right half blue) with its mask."""
    import trimesh

    from training.recon_inputs import eval4_cameras

    m = trimesh.creation.icosphere(subdivisions=4, radius=0.35)
    c2w, K = (torch.tensor(a) for a in eval4_cameras(size))
    surf = rasterize_mesh(Rasterizer("torch"), torch.tensor(m.vertices, dtype=torch.float32),
                          torch.tensor(m.faces), c2w, K, size, size)
    rgb = torch.ones(4, size, size, 3)
    red = surf.points[..., 1] > 0
    rgb[surf.hit & red] = torch.tensor([0.9, 0.1, 0.1])
    rgb[surf.hit & ~red] = torch.tensor([0.1, 0.2, 0.9])
    mask = surf.hit.float()
    return torch.cat([rgb.permute(0, 3, 1, 2), mask[:, None]], 1), c2w, K


def test_api_feedforward_and_refined_on_a_known_surface():
    torch.set_num_threads(2)
    model, cfg = fresh_model(SphereGTR)
    images, c2w, K = sphere_views()
    ff = reconstruct(model, images, c2w, K, cfg, refine=False)
    # The mesh is the analytic sphere: every vertex at radius 0.35 (grid 24 over 1.1: cell 0.048).
    r = ff.verts.norm(dim=-1)
    assert abs(r.mean().item() - 0.35) < 0.01 and (r - 0.35).abs().max() < 0.03
    assert ff.psnr_before == ff.psnr_after and set(ff.timings) == {"triplane", "mesh", "refine"}
    ref = reconstruct(model, images, c2w, K, cfg, refine=True)
    assert ref.psnr_after > ref.psnr_before + 1.0, (ref.psnr_before, ref.psnr_after)
    assert abs(ref.psnr_before - ff.psnr_before) < 1e-4  # same feed-forward start
    # The PSNR reconstruct reports is the one the shared renderer (eval's) gives: re-rendering the input
    # views (refine.render_size = the input size here) through Result.render reproduces it.
    assert views_psnr(ref.render(model, c2w, K, 48)["rgb"], images[:, :3]) == pytest.approx(ref.psnr_after, abs=1e-4)
    assert views_psnr(ff.render(model, c2w, K, 48)["rgb"], images[:, :3]) == pytest.approx(ff.psnr_before, abs=1e-4)
    # Colours exported come from the refined planes and f_c: where a pixel is fully covered, the refined
    # render equals the colour function evaluated at that pixel's surface point.
    out = ref.render(model, c2w, K, 48)
    surf = rasterize_mesh(Rasterizer("torch"), ref.verts, ref.faces, c2w, K, 48, 48)
    inside = (out["mask"][:, 0] == 1) & surf.hit
    col = ref.color_fn(model)(surf.points[inside].numpy())
    np.testing.assert_allclose(out["rgb"].permute(0, 2, 3, 1)[inside].numpy(), col, atol=1e-5)
    ff_col = ff.color_fn(model)(surf.points[inside].numpy())
    assert np.abs(col - ff_col).max() > 0.05  # refined colours differ from the feed-forward ones
    t = reconstruct(model, images, c2w, K, cfg, refine=True, tune="triplane")
    assert t.refine is not None and t.refine.color_mlp is not model.color_mlp


def test_empty_field_is_a_clear_error():
    model, cfg = fresh_model()  # a fresh model's density (softplus of ~0) never reaches level 10
    images, c2w, K = sphere_views()
    with pytest.raises(EmptyMeshError, match="no surface at level 10"):
        reconstruct(model, images, c2w, K, cfg, refine=False)


class ColoredSphere(SphereGTR):
    """The sphere with a closed-form colour too: rgb = p + 0.5 (in [0.15, 0.85] on the surface)."""

    def query_color(self, planes, points):
        return (points + 0.5).clamp(0, 1)


def test_render_rgba_of_a_sphere_against_ray_casting():
    """What eval scores: straight-alpha RGBA views of the reconstructed textured mesh. Reference: the first
    hit of each pixel-centre ray with the sphere |p| = 0.35 (closed form): alpha 1 inside the silhouette, 0
    outside, colour p + 0.5 at the hit point; away from the one-pixel rim, up to the marching-cubes mesh's
    distance from the sphere (grid 24 over 1.1: < 0.03 in position, so < 0.03 in colour)."""
    torch.set_num_threads(2)
    model, cfg = fresh_model(ColoredSphere)
    images, c2w, K = sphere_views()
    res = reconstruct(model, images, c2w, K, cfg, refine=False)
    from core.cameras import intrinsics, orbit_views

    size = 64
    o_c2w = orbit_views(3)["c2w"].astype(np.float32)
    o_K = np.stack([intrinsics(40.0, size)] * 3).astype(np.float32)
    rgba = res.render_rgba(model, o_c2w, o_K, size)
    assert rgba.shape == (3, size, size, 4) and rgba.dtype == np.uint8
    v, u = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], -1).astype(np.float64)
    for i in range(3):
        d = pix @ np.linalg.inv(o_K[i].astype(np.float64)).T @ o_c2w[i, :3, :3].astype(np.float64).T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        o = o_c2w[i, :3, 3].astype(np.float64)
        b = d @ o
        disc = b * b - (o @ o - 0.35 ** 2)
        t = -b - np.sqrt(np.clip(disc, 0, None))
        hit_point = o + t[..., None] * d
        # pixels whose ray passes the centre farther than the mesh error (0.03) plus 1.5 pixels (0.03 each
        # at distance 2.6) inside or outside the rim: antialiasing and tessellation only touch the rest
        miss = np.sqrt(np.clip(o @ o - b * b, 0, None))
        margin = 0.03 + 1.5 * 2 * 2.6 * np.tan(np.radians(20.0)) / size
        inside, outside = miss < 0.35 - margin, miss > 0.35 + margin
        assert inside.sum() > 100 and outside.sum() > 100
        alpha = rgba[i, ..., 3] / 255.0
        assert (alpha[inside] == 1).all() and (alpha[outside] == 0).all()
        np.testing.assert_allclose(rgba[i][inside][:, :3] / 255.0, hit_point[inside] + 0.5, atol=0.03)

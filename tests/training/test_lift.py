"""The input views lifted onto the planes (`model.lift`): against a numpy pinhole projection and the closed-form
silhouette of a sphere's visual hull, texel for texel in the layout `sample_triplane` reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.cameras import intrinsics, look_at, project
from core.config import ModelConfig
from tests.analytic_views import sphere_mask
from training.model import GTR
from training.model.lift import FEATURES, lift_views, plane_points, sample_hull
from training.model.triplane import sample_triplane

BOX, RES, SIZE = 0.55, 16, 64


def sphere_views(centre: np.ndarray, radius: float, colour: tuple[float, float, float]):
    """Six cameras at distance 2 along ±x, ±y, ±z (with a tilt so no view looks straight along +Z), the
    sphere's analytic mask and its flat colour on white: rgb [1,6,3,S,S], mask [1,6,1,S,S], c2w, K."""
    eyes = [(2, 0, 0.1), (-2, 0, 0.1), (0, 2, 0.1), (0, -2, 0.1), (0.1, 0, 2), (0.1, 0, -2)]
    K = intrinsics(40.0, SIZE)
    c2ws = [look_at(np.array(eye, dtype=np.float64)) for eye in eyes]
    masks = [sphere_mask(c2w, K, SIZE, centre, radius) for c2w in c2ws]
    mask = torch.tensor(np.stack(masks))[None, :, None]
    rgb = torch.tensor(colour, dtype=torch.float32).view(1, 1, 3, 1, 1) * mask + (1 - mask)
    return rgb, mask, torch.tensor(np.stack(c2ws))[None], torch.tensor(K).expand(1, 6, 3, 3)


def texel_centres() -> np.ndarray:
    return ((np.arange(RES) + 0.5) / RES * 2 - 1) * BOX


def test_plane_points_sit_where_sample_triplane_reads_each_texel():
    pts = plane_points(RES, 3, BOX)  # [3, R, R, D, 3]
    planes = torch.zeros(1, 3, 1, RES, RES)
    planes[0, 1, 0, 5, 11] = 1.0  # plane xz, row 5, column 11
    got = sample_triplane(planes, pts.reshape(1, -1, 3), BOX).reshape(3, RES, RES, 3, 3)[..., 1]  # the xz part
    hits = (got > 0.999).nonzero().tolist()
    assert hits and all((r, c) == (5, 11) for _, r, c, _ in hits), hits  # every plane's line through that texel


def test_colour_is_the_view_pixel_under_the_projection():
    # One camera, an image whose R/G channels are the pixel coordinates (u/W, v/H): bilinear lookup of a
    # linear ramp is exact, so each texel's line colour (depth 1: the mid point) must be the numpy projection.
    c2w = look_at(np.array([1.6, -1.1, 0.9]))
    K = intrinsics(70.0, SIZE)
    v, u = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    rgb = torch.tensor(np.stack([u / SIZE, v / SIZE, np.zeros_like(u)]), dtype=torch.float32)[None, None]
    mask = torch.ones(1, 1, 1, SIZE, SIZE)
    f = lift_views(rgb, mask, torch.tensor(c2w)[None, None], torch.tensor(K)[None, None], plane_points(RES, 1, BOX))
    pts = plane_points(RES, 1, BOX).reshape(-1, 3).numpy()
    uv, z = project(pts, c2w, K)
    inside = ((uv > 1) & (uv < SIZE - 1)).all(1) & (z > 0)
    assert inside.mean() > 0.9
    got = f[0, :, 2:4].permute(0, 2, 3, 1).reshape(-1, 2).numpy()  # RGB's R, G at each texel
    np.testing.assert_allclose(got[inside], uv[inside] / SIZE, atol=1e-4)
    assert f.shape == (1, 3, FEATURES + 1, RES, RES)


def test_silhouette_is_the_visual_hulls_shadow_on_each_plane():
    centre, radius, colour = np.array([0.12, -0.07, 0.05]), 0.25, (0.2, 0.4, 0.7)
    f = lift_views(*sphere_views(centre, radius, colour), plane_points(RES, 32, BOX))[0]  # [3, F, R, R]
    c = texel_centres()
    for p, (col_axis, row_axis) in enumerate(((0, 1), (0, 2), (1, 2))):
        rho = np.hypot(c[None, :] - centre[col_axis], c[:, None] - centre[row_axis])  # [row, col]
        sil, thick, rgb = f[p, 0].numpy(), f[p, 1].numpy(), f[p, 2:5].numpy()
        inner, outer = rho < 0.8 * radius, rho > 1.25 * radius
        assert sil[inner].min() > 0.95 and sil[outer].max() < 0.05, (p, sil[inner].min(), sil[outer].max())
        # Thickness: the chord 2·sqrt(r² − ρ²) over the box side, to a few depth bins (the hull is a bit fatter).
        chord = 2 * np.sqrt(np.clip(radius**2 - rho**2, 0, None)) / (2 * BOX)
        assert np.abs(thick[inner] - chord[inner]).max() < 0.12, (p, np.abs(thick[inner] - chord[inner]).max())
        np.testing.assert_allclose(rgb[:, inner].T, np.broadcast_to(colour, (inner.sum(), 3)), atol=0.05)
        np.testing.assert_allclose(rgb[:, outer], 1.0, atol=1e-6)  # background where nothing is seen


def test_sampled_hull_is_the_visual_hull_at_any_point():
    # Six views along ±x, ±y, ±z: the sphere's visual hull is where every axis sees the disc (the Steinmetz
    # solid of three cylinders, up to the views' perspective and tilt, which the margins cover).
    centre, radius = np.array([0.12, -0.07, 0.05]), 0.25
    res = 32
    f = lift_views(*sphere_views(centre, radius, (0.5, 0.5, 0.5)), plane_points(res, 32, BOX))
    profile = f[:, :, FEATURES:]
    pts = np.random.default_rng(0).uniform(-BOX, BOX, (4000, 3))
    rel = pts - centre
    axis_distance = np.stack([np.hypot(rel[:, 1], rel[:, 2]), np.hypot(rel[:, 0], rel[:, 2]),
                              np.hypot(rel[:, 0], rel[:, 1])], 1).max(1) / radius
    h = sample_hull(profile, torch.tensor(pts, dtype=torch.float32)[None], BOX)[0].numpy()  # [N, 3 planes]
    inside, outside = axis_distance < 0.8, axis_distance > 1.25
    assert inside.sum() > 100 and outside.sum() > 1000
    assert h[inside].min() > 0.95, h[inside].min()
    assert h[outside].max() < 0.05, h[outside].max()


def test_lift_is_a_model_option_with_gradients_and_no_keys_when_off():
    cfg = ModelConfig(width=32, depth=1, heads=2, head_dim=16, plane_res=4, upsample=4, plane_channels=8, lift=False,
                      lift_hull=False)  # the hull's own test below
    assert not any(k.startswith("lift.") for k in GTR(cfg).state_dict())  # released checkpoints load as before
    model = GTR(ModelConfig(**{**cfg.__dict__, "lift": True, "lift_depth": 8}))
    rgb, mask, c2w, K = sphere_views(np.zeros(3), 0.3, (0.5, 0.5, 0.5))
    K = K.clone()
    K[..., :2, :] *= 32 / SIZE  # inputs at 32², a multiple of the encoder patch
    img = torch.cat([rgb, mask], 2)[:, :4]
    img = torch.nn.functional.interpolate(img.flatten(0, 1), size=(32, 32), mode="area").unflatten(0, (1, 4))
    planes = model.triplane(img, c2w[:, :4], K[:, :4])
    assert planes.shape == (1, 3, 8, 16, 16)
    planes.square().mean().backward()
    assert model.lift.proj.weight.grad.abs().sum() > 0
    # lift_hull: the hull profile rides along as plane channels and f_d reads it (3 more inputs)
    hull = GTR(ModelConfig(**{**cfg.__dict__, "lift": True, "lift_depth": 8, "lift_hull": True}))
    planes = hull.triplane(img, c2w[:, :4], K[:, :4])
    assert planes.shape == (1, 3, 8 + 8, 16, 16)
    hull.query_density(planes, torch.zeros(1, 5, 3)).sum().backward()
    assert hull.density_mlp.layers[0].weight.grad[:, -3:].abs().sum() > 0
    pts = torch.rand(1, 50, 3) - 0.5
    f_d, hull.density_mlp = hull.density_mlp, torch.nn.Identity()  # query_density now returns f_d's inputs
    with torch.no_grad():
        x = hull.query_density(planes, pts)
        torch.testing.assert_close(x[..., -3:], sample_hull(planes[:, :, 8:], pts, hull.cfg.scene_box))
        torch.testing.assert_close(x[..., :-3], sample_triplane(planes[:, :, :8], pts, hull.cfg.scene_box))
    hull.density_mlp = f_d
    assert hull.query_density(planes, torch.zeros(1, 0, 3)).shape == (1, 0, 1)  # an empty query (a mesh chunk)
    assert GTR(cfg).density_mlp.layers[0].weight.shape[1] + 3 == hull.density_mlp.layers[0].weight.shape[1]
    with pytest.raises(ValueError, match="16 .*lift_depth hull"):  # planes without the profile: refused, by name
        hull.query_density(planes[:, :, :8], pts)
    # lift_hull alone (on by default) without lift: no hull, as released checkpoints expect
    off = GTR(ModelConfig(**{**cfg.__dict__, "lift": False, "lift_hull": True}))
    assert off.density_mlp.layers[0].weight.shape == GTR(cfg).density_mlp.layers[0].weight.shape

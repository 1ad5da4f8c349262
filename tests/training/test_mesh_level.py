"""The agreeing mesh level, held against a sphere of linearly rising density in closed form.

Field: σ(p) = k·(R − |p|)₊. For a ray at impact parameter b the optical depth is k·I(b) with
I(b) = c·R − (b²/2)·ln((R + c)/(R − c)), c = √(R² − b²), so the volume render covers the disk b < b*,
k·I(b*) = ln 2; a level-s mesh (the sphere of radius R − s/k) covers b < R − s/k. The level that agrees is
s* = k·(R − b*), whatever the density scale k, while a fixed level agrees for one k only. On the central
ray the expected termination lies √(π/(2k)) below the surface (a Rayleigh distribution, for k·R² ≫ 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.cameras import intrinsics, look_at, spherical_position
from training.mesh import extract_mesh, render_mesh
from training.mesh_level import agreeing_level, camera_agreeing_level, first_crossing, ray_profile

R = 0.35


class RampSphere(torch.nn.Module):
    """A stand-in for GTR's frame and field API: σ = k·(R − |p|)₊, colour = the point mapped to [0, 1]."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k
        self.units_per_ours = 1.0

    def box_half_size_ours(self) -> float:
        return 0.55

    def near_min_ours(self) -> float:
        return 0.2

    def query_density(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.k * (R - points.norm(dim=-1, keepdim=True)).clamp(min=0)

    def query_color(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return (points + 0.5).clamp(0, 1)


def coverage_radius(k: float) -> float:
    """b* with k·I(b*) = ln 2, by bisection on the closed-form optical depth."""
    def depth(b: float) -> float:
        c = math.sqrt(max(R * R - b * b, 0.0))
        return k * (c * R - 0.5 * b * b * math.log((R + c) / max(R - c, 1e-300))) if c > 0 else 0.0

    lo, hi = 0.0, R
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if depth(mid) > math.log(2) else (lo, mid)
    return 0.5 * (lo + hi)


def parallel_rays(n: int = 160, half: float = 0.45) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthographic bundle along −z from z = 2 over [−half, half]² (pixel centres)."""
    x = (torch.arange(n) + 0.5) / n * 2 * half - half
    gx, gy = torch.meshgrid(x, x, indexing="ij")
    o = torch.stack([gx, gy, torch.full_like(gx, 2.0)], -1).reshape(-1, 3)
    return o, torch.tensor([0.0, 0.0, -1.0]).expand_as(o).contiguous()


PLANES = torch.zeros(1, 3, 1, 2, 2)


@pytest.mark.parametrize("k", [30.0, 300.0, 3000.0])
def test_agreeing_level_meets_the_closed_form_coverage(k: float) -> None:
    o, d = parallel_rays()
    b_star = coverage_radius(k)
    got = agreeing_level(RampSphere(k), PLANES, o, d, samples=128)
    # The level's mesh radius R − s/k meets the volume render's coverage radius to about a ray spacing (0.0056)
    # plus the candidates' 12 % spacing.
    assert abs((R - got["level"] / k) - b_star) < 0.008, (got["level"], k * (R - b_star))
    assert got["iou"] > 0.97


def test_profile_depth_on_the_central_ray_is_the_rayleigh_mean() -> None:
    k = 300.0
    o, d = torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    prof = ray_profile(RampSphere(k), PLANES, o, d, samples=1024)
    expected = (2.0 - R) + math.sqrt(math.pi / (2 * k))
    assert float(prof["depth"][0]) == pytest.approx(expected, abs=2e-3)  # bins are 1.1/1024 ≈ 1e-3 long
    assert float(prof["opacity"][0]) == pytest.approx(1.0, abs=1e-6)


def test_first_crossing_interpolates_between_samples() -> None:
    sigma = torch.tensor([[0.0, 4.0, 12.0, 30.0], [0.0, 1.0, 2.0, 3.0], [20.0, 30.0, 40.0, 50.0]])
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).expand(3, -1)
    depth, crossed = first_crossing(sigma, t, 10.0)
    assert crossed.tolist() == [True, False, True]
    assert float(depth[0]) == pytest.approx(2.75)  # 4 -> 12 crosses 10 three quarters of the way
    assert float(depth[2]) == pytest.approx(1.0)  # already above at the first sample


def test_empty_field_has_no_level() -> None:
    o, d = parallel_rays(16)
    got = agreeing_level(RampSphere(0.0), PLANES, o, d)
    assert math.isnan(got["level"]) and got["iou"] == 0.0


@pytest.mark.parametrize("k", [30.0, 3000.0])
def test_mesh_at_the_agreeing_level_has_the_volume_silhouette(k: float) -> None:
    """Through the real mesh path (marching cubes + rasterizer), on perspective cameras: the mesh at the
    agreeing level covers what the volume render covers (the closed-form disk, projected)."""
    field = RampSphere(k)
    size = 64
    c2w = torch.from_numpy(np.stack([look_at(spherical_position(a, 20.0, 2.6)) for a in (0.0, 120.0, 240.0)])).float()
    K = torch.from_numpy(intrinsics(40.0, size)).float().expand(3, 3, 3).contiguous()
    got = camera_agreeing_level(field, PLANES, c2w, K, size, size, samples=128)
    verts, faces = extract_mesh(field, PLANES, grid=96, level=got["level"], backend="torch")
    mesh_mask = render_mesh(field, PLANES, verts, faces, c2w, K, size, size, antialias=False)["mask"][:, 0] > 0.5
    # The volume render's coverage of a perspective view: rays whose closest approach b is below b*.
    from training.cameras import camera_rays

    ro, rd = camera_rays(c2w[None], K[None], size, size)
    b = torch.cross(ro[0], rd[0], dim=-1).norm(dim=-1)  # distance of the line from the centre (|d| = 1)
    vol_mask = b < coverage_radius(k)
    iou = float((mesh_mask & vol_mask).sum()) / float((mesh_mask | vol_mask).sum())
    assert iou > 0.97, (k, got["level"], iou)


@pytest.mark.parametrize("k", [30.0, 300.0])
def test_inputs_mode_meshes_at_the_level_that_covers_the_input_masks(k: float) -> None:
    """`level_mode: inputs`: the level whose coverage matches the input views' masks. Masks of a sphere of
    radius r < R (perspective views, closed form: rays passing closer than r to the centre) are covered by
    the level-s sphere R − s/k = r, i.e. s = k·(R − r), whatever the volume render shows."""
    from types import SimpleNamespace

    from training.cameras import camera_rays
    from training.mesh_level import mesh_level

    field, size, r = RampSphere(k), 64, 0.25
    c2w = torch.from_numpy(np.stack([look_at(spherical_position(a, 20.0, 2.6)) for a in (0.0, 120.0, 240.0)])).float()
    # a narrow field of view: the disk spans ~12 pixels of radius at the 32² the level is scored at
    K = torch.from_numpy(intrinsics(15.0, size)).float().expand(3, 3, 3).contiguous()
    ro, rd = camera_rays(c2w[None], K[None], size, size)
    masks = (torch.cross(ro[0], rd[0], dim=-1).norm(dim=-1) < r).float()[:, None]  # [V, 1, H, W]
    cfg = SimpleNamespace(level_mode="inputs", sdf_level=10.0)
    level = mesh_level(field, PLANES, c2w, K, size, cfg, masks)
    assert level == pytest.approx(k * (R - r), rel=0.13), (k, level)  # a neighbouring candidate (12 % apart)
    with pytest.raises(ValueError, match="masks"):
        mesh_level(field, PLANES, c2w, K, size, cfg)

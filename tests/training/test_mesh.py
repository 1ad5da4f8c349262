"""Mesh extraction and mesh rendering held against a sphere in closed form (ray casting, its radius)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.cameras import intrinsics, look_at, spherical_position
from core.config import ModelConfig
from training import cameras
from training.mesh import extract_mesh, render_mesh
from training.model import GTR
from training.ops.marching_cubes import EMPTY_EVENTS


class SphereField(torch.nn.Module):
    """A stand-in for GTR.query: density 10 + 40·(r − |p|) (so the level-10 set is the sphere of radius r),
    colour (p + 0.5) clamped. `planes` is added in so that gradients to it can be checked."""

    def __init__(self, r: float = 0.35) -> None:
        super().__init__()
        self.r = torch.nn.Parameter(torch.tensor(r))

    def box_half_size_ours(self) -> float:
        return 0.55

    def query(self, planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_density(planes, points), self.query_color(planes, points)

    def query_density(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        shift = planes.mean()  # 0 at the value used; carries gradients to the planes
        return 10.0 + 40.0 * (self.r + shift - points.norm(dim=-1, keepdim=True))

    def query_color(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return (points + 0.5).clamp(0, 1)


def _planes(requires_grad: bool = False) -> torch.Tensor:
    return torch.zeros(1, 3, 2, 4, 4, requires_grad=requires_grad)


def test_extract_sphere_and_gradient_of_radius() -> None:
    model = SphereField(0.35)
    planes = _planes(True)
    verts, faces = extract_mesh(model, planes, grid=40, level=10.0, backend="torch")
    r = verts.norm(dim=-1)
    assert (r - 0.35).abs().max() < 2e-3  # linear interpolation of an exact distance field scaled by 40
    # Outward winding: face normals point away from the centre.
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    n = torch.cross(v1 - v0, v2 - v0, dim=-1)
    assert ((n * (v0 + v1 + v2)).sum(-1) > 0).float().mean() > 0.999
    # d(mean radius)/d r = 1 and d/d(planes.mean) = 1 (closed form), through the surface-only recompute.
    r.mean().backward()
    assert model.r.grad.item() == pytest.approx(1.0, abs=1e-3)
    assert planes.grad.sum().item() == pytest.approx(1.0, abs=1e-3)


def test_empty_extraction_is_counted() -> None:
    before = EMPTY_EVENTS["empty"]
    verts, faces = extract_mesh(SphereField(0.35), _planes(), grid=16, level=1000.0, backend="torch")
    assert verts.shape == (0, 3) and faces.shape == (0, 3)
    assert EMPTY_EVENTS["empty"] == before + 1
    out = render_mesh(SphereField(), _planes(), verts, faces, torch.eye(4)[None], torch.eye(3)[None], 8, 8, 0.5)
    assert (out["rgb"] == 0.5).all() and (out["mask"] == 0).all() and (out["depth"] == 0).all()


def _ray_sphere(c2w: np.ndarray, K: np.ndarray, H: int, W: int, r: float) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:H, 0:W] + 0.5
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ c2w[:3, :3].T
    o = c2w[:3, 3]
    a, b, c = (d * d).sum(-1), 2 * (d @ o), o @ o - r * r
    disc = b * b - 4 * a * c
    hit = disc > 0
    t = np.where(hit, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), 0.0)  # d has unit camera z: t = depth
    return hit, t


def test_render_sphere_against_ray_casting() -> None:
    model = SphereField(0.35)
    planes = _planes()
    verts, faces = extract_mesh(model, planes, grid=48, level=10.0, backend="torch")
    H = W = 48
    poses = np.stack([look_at(spherical_position(az, el, 2.6)) for az, el in ((0.0, 20.0), (120.0, -30.0))])
    K = np.repeat(intrinsics(40.0, W)[None], 2, 0)
    with torch.no_grad():
        out = render_mesh(model, planes, verts, faces, torch.tensor(poses), torch.tensor(K), H, W, 1.0,
                          antialias=False)
    for i in range(2):
        hit, t = _ray_sphere(poses[i].astype(np.float64), K[i].astype(np.float64), H, W, 0.35)
        mask = out["mask"][i, 0].numpy() > 0.5
        iou = (mask & hit).sum() / (mask | hit).sum()
        assert iou > 0.97  # the polygonal silhouette lies just inside the sphere's
        both = mask & hit
        assert np.abs(out["depth"][i, 0].numpy()[both] - t[both]).max() < 0.02
        # colour = f_c at the surface point; the surface point is the ray hit up to the mesh error
        pts = poses[i][:3, 3] + t[..., None] * (np.stack(
            [(np.mgrid[0:H, 0:W][1] + 0.5 - K[i][0, 2]) / K[i][0, 0],
             (np.mgrid[0:H, 0:W][0] + 0.5 - K[i][1, 2]) / K[i][1, 1], np.ones((H, W))], -1) @ poses[i][:3, :3].T)
        rgb = out["rgb"][i].permute(1, 2, 0).numpy()
        assert np.abs(rgb[both] - np.clip(pts[both] + 0.5, 0, 1)).max() < 0.03
        assert (rgb[~mask] == 1.0).all()  # background
        nrm = out["normal"][i].permute(1, 2, 0).numpy()
        cos = (nrm[both] * pts[both] / 0.35).sum(-1)
        assert np.median(cos) > 0.995


def test_render_gradients_reach_geometry_and_colour() -> None:
    model = SphereField(0.3)
    planes = _planes(True)
    verts, faces = extract_mesh(model, planes, grid=32, level=10.0, backend="torch")
    pose = torch.tensor(look_at(spherical_position(30.0, 10.0, 2.6)))[None]
    K = torch.tensor(intrinsics(40.0, 32))[None]
    out = render_mesh(model, planes, verts, faces, pose, K, 32, 32, 1.0)
    # A larger sphere covers more pixels: d(mask area)/d r > 0 through the antialiased silhouette.
    out["mask"].sum().backward()
    assert model.r.grad.item() > 0


def _official_sphere_model(radius_ours: float, res: int = 64) -> tuple[GTR, torch.Tensor]:
    """A real GTR in the official frame (scale 2, scene box ±1 in THEIR frame = ±0.5 in ours) whose planes and
    f_d make density = 10 + 100·(ρ² − |p'|²) in the model's frame, ρ = 2·radius_ours: a sphere of radius
    `radius_ours` in our frame at level 10. Plane xy holds x'² + y'², plane xz holds z'² (bilinear
    interpolation of a quadratic errs by ≤ h²/4 per axis, h = 2/res); f_d is made linear by biases that keep
    every GELU input ≥ 20 (GELU(x) = x·Φ(x) = x up to 1e-80 there) and softplus(x) = x + log(1 + e^−x)
    shifts the level by 5e-5 at x = 10.
    """
    cfg = ModelConfig(width=16, depth=0, heads=2, head_dim=8, plane_res=4, plane_channels=2, upsample=res // 4,
                      mlp_hidden=4, official_frame=True, official_frame_scale=2.0, scene_box=1.0,
                      density_bias=0.0, lift_hull=False)  # pinned: f_d below is built for softplus(x) of the planes alone
    model = GTR(cfg).eval()
    u = (torch.arange(res, dtype=torch.float64) + 0.5) * 2 / res - 1  # pixel centres, align_corners=False
    planes = torch.zeros(1, 3, 2, res, res, dtype=torch.float64)
    planes[0, 0, 0] = u[None, :] ** 2 + u[:, None] ** 2  # plane xy: columns x', rows y'
    planes[0, 1, 0] = (u[:, None] ** 2).expand(res, res)  # plane xz: columns x', rows z'
    rho2, k = (2.0 * radius_ours) ** 2, 100.0
    with torch.no_grad():
        l1, l2, l3 = model.density_mlp.layers
        for layer in (l1, l2, l3):
            layer.weight.zero_()
            layer.bias.zero_()
        l1.weight[0, 0] = l1.weight[0, 2] = 1.0  # features: plane-major, xy channel 0 and xz channel 0
        l1.bias[0] = 20.0
        l2.weight[0, 0] = 1.0
        l3.weight[0, 0] = -k
        l3.bias[0] = 10.0 + k * (rho2 + 20.0)
    return model.double(), planes


def test_official_frame_extraction_is_in_our_frame_over_exactly_the_box():
    model, planes = _official_sphere_model(0.3)
    assert model.box_half_size_ours() == 0.5
    seen = []
    query = model.query_density

    def spy(pl: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        seen.append(pts.detach().reshape(-1, 3))
        return query(pl, pts)

    model.query_density = spy
    grid = 33
    with torch.no_grad():
        verts, faces = extract_mesh(model, planes, grid=grid, level=10.0, backend="torch", method="dense")
    pts = torch.cat(seen)
    assert len(pts) == grid ** 3  # the whole grid, evaluated once (no autograd pass)
    # Our frame: exactly [-0.5, 0.5]^3 (not ±scene_box = ±1, which would be 4x their box in their frame).
    assert pts.amin(0).tolist() == [-0.5] * 3 and pts.amax(0).tolist() == [0.5] * 3
    theirs = cameras.points_to_official_frame(pts, 2.0)
    torch.testing.assert_close(theirs.abs().amax(0), torch.ones(3, dtype=theirs.dtype))
    # The surface in our frame: radius 0.3 (grid step 1/32; the field is quadratic, so linear interpolation
    # along a cell edge errs by ≤ k·step²/4 / |∇| ≈ 1.2e-3 in their units, 6e-4 in ours).
    r = verts.double().norm(dim=-1)
    assert len(faces) > 500
    assert (r - 0.3).abs().max() < 2e-3
    assert abs(r.mean().item() - 0.3) < 1e-3

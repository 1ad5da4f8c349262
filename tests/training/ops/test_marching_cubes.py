"""The PyTorch marching cubes held against skimage, closed forms, finite differences and (on CUDA) diso."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes as sk_marching_cubes

from training.ops.marching_cubes import EMPTY_EVENTS, TorchDiffMC, marching_cubes


def _coords(n: int, half: float = 1.0) -> tuple[torch.Tensor, ...]:
    x = torch.linspace(-half, half, n, dtype=torch.float64)
    return torch.meshgrid(x, x, x, indexing="ij")


def sphere(n: int, r: float = 0.6) -> torch.Tensor:
    X, Y, Z = _coords(n)
    return (X**2 + Y**2 + Z**2).sqrt() - r


def torus(n: int, R: float = 0.55, r: float = 0.2) -> torch.Tensor:
    X, Y, Z = _coords(n)
    q = ((X**2 + Y**2).sqrt() - R)
    return (q**2 + Z**2).sqrt() - r


def box(n: int, b: tuple[float, float, float] = (0.5, 0.35, 0.6)) -> torch.Tensor:
    X, Y, Z = _coords(n)
    q = torch.stack([X.abs() - b[0], Y.abs() - b[1], Z.abs() - b[2]], -1)
    return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)


FIELDS = {"sphere": sphere, "torus": torus, "box": box}


def _to_world(v: np.ndarray, n: int) -> np.ndarray:
    return v / (n - 1) * 2.0 - 1.0  # index coordinates -> the [-1, 1] frame of _coords


def _watertight_and_oriented(faces: np.ndarray) -> bool:
    """Every directed edge appears once and its reverse once: closed, manifold, consistently wound."""
    directed = collections.Counter()
    for a, b, c in faces.tolist():
        for e in ((a, b), (b, c), (c, a)):
            directed[e] += 1
    return all(k == 1 and directed.get((e[1], e[0]), 0) == 1 for e, k in directed.items())


def _signed_volume(v: np.ndarray, f: np.ndarray) -> float:
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_same_surface_as_skimage(name: str) -> None:
    n = 48
    sdf = FIELDS[name](n)
    verts, faces = TorchDiffMC(torch.float64)(sdf, normalize=False)
    v, f = verts.numpy(), faces.numpy()
    sk_v, sk_f, _, _ = sk_marching_cubes(sdf.numpy(), level=0.0)
    # Both place vertices by linear interpolation on the same crossing edges: the same point sets.
    d_ours_to_sk, _ = cKDTree(sk_v).query(v)
    d_sk_to_ours, _ = cKDTree(v).query(sk_v)
    assert d_ours_to_sk.max() < 1e-4 and d_sk_to_ours.max() < 1e-4  # index units; float32 in skimage
    # Face counts differ only where a cell is ambiguous and the two tables split it differently.
    assert abs(len(f) - len(sk_f)) <= 0.01 * len(sk_f)
    # Vertices lie on the analytic surface up to the linear-interpolation error of the grid (h = 2/47).
    resid = np.abs(FIELDS_NP[name](_to_world(v, n)))
    h = 2.0 / (n - 1)
    assert resid.max() < 0.25 * h
    assert _watertight_and_oriented(f)


def _sphere_np(p: np.ndarray) -> np.ndarray:
    return np.linalg.norm(p, axis=1) - 0.6


def _torus_np(p: np.ndarray) -> np.ndarray:
    q = np.linalg.norm(p[:, :2], axis=1) - 0.55
    return np.sqrt(q**2 + p[:, 2] ** 2) - 0.2


def _box_np(p: np.ndarray) -> np.ndarray:
    q = np.abs(p) - np.array([0.5, 0.35, 0.6])
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)


FIELDS_NP = {"sphere": _sphere_np, "torus": _torus_np, "box": _box_np}


def test_winding_faces_positive_side_and_volume() -> None:
    """Normals point towards positive values (diso's winding): outward for an sdf, so volume > 0."""
    n = 64
    verts, faces = TorchDiffMC(torch.float64)(sphere(n), normalize=True)
    world = verts.numpy() * 2.0 - 1.0  # normalize=True maps the grid onto [0, 1]
    vol = _signed_volume(world, faces.numpy())
    assert vol == pytest.approx(4.0 / 3.0 * math.pi * 0.6**3, rel=0.01)
    # Every face, not just the sum: its right-hand normal points away from the centre (up the sdf).
    v, f = world, faces.numpy()
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    normal = np.cross(b - a, c - a)
    big = np.linalg.norm(normal, axis=1) > 1e-12  # skip degenerate slivers (a vertex on a grid point)
    assert (np.einsum("ij,ij->i", normal, (a + b + c) / 3)[big] > 0).all()


def test_isovalue_and_deform() -> None:
    n = 32
    sdf = sphere(n)
    v0, _ = TorchDiffMC(torch.float64)(sdf, isovalue=0.1, normalize=False)
    r = np.linalg.norm(_to_world(v0.numpy(), n), axis=1)
    assert np.abs(r - 0.7).max() < 0.01  # the 0.1 level set of |p| - 0.6
    shift = torch.zeros(n, n, n, 3, dtype=torch.float64)
    shift[..., 2] = 0.25
    v1, _ = TorchDiffMC(torch.float64)(sdf, deform=shift, normalize=False)
    va, _ = TorchDiffMC(torch.float64)(sdf, normalize=False)
    assert torch.allclose(v1, va + torch.tensor([0.0, 0.0, 0.25], dtype=torch.float64))


def test_gradients_match_finite_differences() -> None:
    """d(weighted vertex sum) / d grid from autograd against central differences on grid entries next to
    the surface; topology is fixed by keeping every value away from the isovalue by >> eps."""
    n = 10
    sdf = sphere(n, r=0.62)
    assert sdf.abs().min() > 1e-3
    w = torch.randn(4000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mc = TorchDiffMC(torch.float64)

    def loss(g: torch.Tensor) -> torch.Tensor:
        v, _ = mc(g, normalize=True)
        return (v * w[: len(v)]).sum()

    g = sdf.clone().requires_grad_(True)
    loss(g).backward()
    grad = g.grad.reshape(-1)
    picked = torch.nonzero(grad.abs() > 0)[:, 0]
    picked = picked[torch.randperm(len(picked), generator=torch.Generator().manual_seed(1))[:16]]
    assert len(picked) == 16
    eps = 1e-6
    for i in picked.tolist():
        gp, gm = sdf.clone().reshape(-1), sdf.clone().reshape(-1)
        gp[i] += eps
        gm[i] -= eps
        fd = (loss(gp.reshape(sdf.shape)) - loss(gm.reshape(sdf.shape))) / (2 * eps)
        assert float(fd) == pytest.approx(float(grad[i]), rel=1e-5, abs=1e-8)
    # Entries far from the surface do not move any vertex.
    far = sdf.reshape(-1).abs() > 2.5 * (2.0 / (n - 1))
    assert (grad[far] == 0).all()


def test_empty_grid_is_counted() -> None:
    before = EMPTY_EVENTS["empty"]
    for g in (torch.ones(8, 8, 8), -torch.ones(8, 8, 8)):
        v, f = marching_cubes(g, backend="torch")
        assert v.shape == (0, 3) and f.shape == (0, 3)
    assert EMPTY_EVENTS["empty"] == before + 2


def test_field_touching_the_border_is_closed() -> None:
    """diso pads the grid with +1, so a region cut by the border is capped: still watertight."""
    n = 24
    X, Y, Z = _coords(n)
    sdf = (X**2 + Y**2 + Z**2).sqrt() - 1.2  # the corners stick out of [-1, 1]^3
    v, f = TorchDiffMC(torch.float64)(sdf, normalize=False)
    assert _watertight_and_oriented(f.numpy())
    assert v.min() >= -1.0 and v.max() <= n  # caps lie in the padding cell


def test_runs_at_128() -> None:
    n = 128
    sdf = torus(n).float()
    v, f = marching_cubes(sdf, backend="torch", normalize=False)
    sk_v, sk_f, _, _ = sk_marching_cubes(sdf.numpy(), level=0.0)
    assert len(v) == len(sk_v)
    assert abs(len(f) - len(sk_f)) <= 0.01 * len(sk_f)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="grid must be"):
        TorchDiffMC()(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="backend"):
        marching_cubes(torch.zeros(4, 4, 4), backend="cubes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(FIELDS))
def test_twin_matches_diso(name: str) -> None:
    from training.ops.marching_cubes import cuda_marching_cubes

    n = 96
    sdf = FIELDS[name](n).float().cuda()
    g1 = sdf.clone().requires_grad_(True)
    g2 = sdf.clone().requires_grad_(True)
    v1, f1 = TorchDiffMC(torch.float32)(g1, normalize=True)
    v2, f2 = cuda_marching_cubes(torch.float32)(g2, normalize=True)
    # Same vertices in the same order (diso's order), positions to float32 rounding.
    assert v1.shape == v2.shape
    torch.testing.assert_close(v1, v2, rtol=0, atol=1e-5)
    assert abs(len(f1) - len(f2)) <= 0.01 * len(f2)
    vol1 = _signed_volume(v1.detach().cpu().double().numpy(), f1.cpu().numpy())
    vol2 = _signed_volume(v2.detach().cpu().double().numpy(), f2.long().cpu().numpy())
    assert vol1 == pytest.approx(vol2, rel=1e-3)  # same winding, same enclosed volume
    w = torch.randn_like(v1)
    (v1 * w).sum().backward()
    (v2 * w).sum().backward()
    # diso's backward uses the same analytic dt/dd; atomics reorder float32 sums.
    torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-4, atol=1e-5)

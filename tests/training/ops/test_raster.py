"""The PyTorch rasterizer held against closed forms, finite differences, Blender's render of the same
mesh and camera, and (on CUDA) nvdiffrast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.cameras import intrinsics, look_at, spherical_position
from training.cameras import opencv_to_clip
from training.ops.raster import Rasterizer, antialias, interpolate, rasterize


def _box_mesh(half: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    import trimesh

    m = trimesh.creation.box((2 * half,) * 3)
    return torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces, dtype=torch.long)


def _clip(verts: torch.Tensor, c2w: np.ndarray, K: np.ndarray, H: int, W: int) -> torch.Tensor:
    mvp = opencv_to_clip(torch.tensor(c2w, dtype=verts.dtype)[None], torch.tensor(K, dtype=verts.dtype)[None],
                         H, W, 0.1, 10.0)
    return torch.cat([verts, torch.ones(len(verts), 1, dtype=verts.dtype)], 1) @ mvp.transpose(-1, -2)


def _camera_z(verts: torch.Tensor, c2w: np.ndarray) -> torch.Tensor:
    w2c = torch.linalg.inv(torch.tensor(c2w, dtype=verts.dtype))
    return (verts @ w2c[:3, :3].T + w2c[:3, 3])[:, 2:3]


def test_single_triangle_closed_form() -> None:
    """w = 1: coverage is 'pixel centre inside the triangle', (u, v) the affine barycentrics, z/w = z."""
    H, W = 16, 20
    pos = torch.tensor([[[-0.8, -0.6, 0.1, 1.0], [0.7, -0.5, 0.3, 1.0], [-0.2, 0.9, -0.5, 1.0]]],
                       dtype=torch.float64)
    rast, _ = rasterize(None, pos, torch.tensor([[0, 1, 2]]), (H, W))
    xs = (torch.arange(W, dtype=torch.float64) + 0.5) / W * 2 - 1
    ys = (torch.arange(H, dtype=torch.float64) + 0.5) / H * 2 - 1  # row 0 is NDC y = -1
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    A = torch.tensor([[p[0], p[1], 1.0] for p in pos[0].tolist()], dtype=torch.float64).T  # [3, 3]
    bary = torch.linalg.solve(A, torch.stack([X, Y, torch.ones_like(X)], 0).reshape(3, -1)).T.reshape(H, W, 3)
    inside = (bary >= 0).all(-1)
    assert torch.equal(rast[0, ..., 3] > 0, inside)
    assert torch.allclose(rast[0, ..., 0][inside], bary[..., 0][inside], atol=1e-9)
    assert torch.allclose(rast[0, ..., 1][inside], bary[..., 1][inside], atol=1e-9)
    z = (bary * pos[0, :, 2]).sum(-1)
    assert torch.allclose(rast[0, ..., 2][inside], z[inside], atol=1e-9)
    assert (rast[0][~inside] == 0).all()


def _ray_box(c2w: np.ndarray, K: np.ndarray, H: int, W: int, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed form: planar depth of the axis-aligned box seen through each pixel centre (slab test)."""
    v, u = np.mgrid[0:H, 0:W] + 0.5
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)  # z = 1
    d = d_cam @ c2w[:3, :3].T
    o = c2w[:3, 3]
    with np.errstate(divide="ignore"):
        t1, t2 = (-half - o) / d, (half - o) / d
    tn, tf = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
    hit = tf >= tn
    return hit, np.where(hit, tn, 0.0)  # t along d_cam with unit z = planar depth


def test_box_matches_ray_casting() -> None:
    H = W = 64
    verts, faces = _box_mesh(0.5)
    for az, el in ((30.0, 25.0), (200.0, -20.0)):
        c2w = look_at(spherical_position(az, el, 2.6)).astype(np.float64)
        K = intrinsics(40.0, W).astype(np.float64)
        rast, _ = rasterize(None, _clip(verts, c2w, K, H, W), faces, (H, W))
        depth, _ = interpolate(_camera_z(verts, c2w)[None], rast, faces)
        hit, z = _ray_box(c2w, K, H, W, 0.5)
        mask = (rast[0, ..., 3] > 0).numpy()
        assert (mask != hit).sum() <= 2  # only pixel centres exactly on a silhouette may differ
        both = mask & hit
        np.testing.assert_allclose(depth[0, ..., 0].numpy()[both], z[both], atol=1e-9)


def test_gradients_through_barycentrics() -> None:
    """d(rasterized, interpolated, antialiased image)/d(clip positions) vs central differences."""
    H = W = 24
    verts, faces = _box_mesh(0.5)
    c2w = look_at(spherical_position(40.0, 30.0, 2.4)).astype(np.float64)
    K = intrinsics(40.0, W).astype(np.float64)
    pos0 = _clip(verts, c2w, K, H, W)
    attr = torch.randn(1, len(verts), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    wimg = torch.randn(1, H, W, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(pos: torch.Tensor) -> torch.Tensor:
        rast, _ = rasterize(None, pos, faces, (H, W))
        img, _ = interpolate(attr, rast, faces)
        aa = antialias(img, rast, pos, faces)
        return (aa * wimg).sum() + rast[..., 2].sum()

    pos = pos0.clone().requires_grad_(True)
    loss(pos).backward()
    eps = 1e-7  # small enough that no pixel centre changes triangle
    for vi in range(len(verts)):
        for c in (0, 1, 3):
            p, m = pos0.clone(), pos0.clone()
            p[0, vi, c] += eps
            m[0, vi, c] -= eps
            fd = float((loss(p) - loss(m)) / (2 * eps))
            assert fd == pytest.approx(float(pos.grad[0, vi, c]), rel=1e-4, abs=1e-5)
    assert pos.grad.abs().sum() > 0


def test_range_mode_and_tiling() -> None:
    H = W = 32
    verts, faces = _box_mesh(0.4)
    c2w = look_at(spherical_position(10.0, 15.0, 2.5)).astype(np.float64)
    K = intrinsics(40.0, W).astype(np.float64)
    pos = _clip(verts, c2w, K, H, W)
    inst, _ = rasterize(None, pos, faces, (H, W))
    # Range mode: two images from two triangle ranges of one vertex buffer; triangle ids stay global.
    rng, _ = rasterize(None, pos[0], faces, (H, W), ranges=torch.tensor([[0, 6], [6, 6]]))
    for k, (start, count) in enumerate(((0, 6), (6, 6))):
        alone, _ = rasterize(None, pos, faces[start:start + count], (H, W))
        hit = alone[0, ..., 3] > 0
        assert torch.equal(rng[k, ..., 3] > 0, hit)
        assert torch.equal(rng[k, ..., 3][hit], alone[0, ..., 3][hit] + start)
        assert torch.allclose(rng[k, ..., :3], alone[0, ..., :3])
    # Tiny chunks give the same image as one big chunk.
    from training.ops.raster import TorchRasterizeContext

    tiled, _ = rasterize(TorchRasterizeContext(max_pairs=7), pos, faces, (H, W))
    assert torch.equal(tiled, inst)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="tri must be"):
        rasterize(None, torch.zeros(1, 3, 4), torch.zeros(3, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="backend"):
        Rasterizer("opengl")
    with pytest.raises(ValueError, match="CUDA"):
        Rasterizer("nvdiffrast", "cpu")


@pytest.mark.blender
def test_masks_and_depth_match_blender(tmp_path) -> None:
    """A mesh rendered by the render stage (Cycles) and by our rasterizer with the stored cameras."""
    pytest.importorskip("bpy")
    import trimesh
    from PIL import Image

    from core.config import RenderConfig
    from render.blender import render_asset

    mesh = trimesh.util.concatenate([trimesh.creation.torus(0.6, 0.25),
                                     trimesh.creation.box((0.5, 0.7, 0.9)).apply_translation((0.2, 0.1, 0.4))])
    src = tmp_path / "shape.ply"
    mesh.export(src)
    cfg = RenderConfig(resolution=128, samples=16, adaptive_threshold=0.0, threads=2)
    poses = np.stack([look_at(spherical_position(az, el, 2.6)) for az, el in ((20.0, 25.0), (135.0, -15.0))])
    row = render_asset({"uid": "shape", "path": str(src), "format": "ply"}, tmp_path / "out", cfg, {"": poses})
    assert row["status"] == "ok", row
    out = tmp_path / "out"
    cams, geo = np.load(out / "cameras.npz"), np.load(out / "geometry.npz")
    verts = torch.tensor(geo["vertices"], dtype=torch.float64)
    faces = torch.tensor(geo["faces"], dtype=torch.long)
    H, W = int(cams["height"]), int(cams["width"])
    scale = 10000.0
    for i in range(len(poses)):
        c2w, K = cams["c2w"][i].astype(np.float64), cams["K"][i].astype(np.float64)
        rast, _ = rasterize(None, _clip(verts, c2w, K, H, W), faces, (H, W))
        depth, _ = interpolate(_camera_z(verts, c2w)[None], rast, faces)
        ours = (rast[0, ..., 3] > 0).numpy()
        alpha = np.asarray(Image.open(out / f"{i:02d}.rgba.png"))[..., 3] / 255.0
        theirs = alpha > 0.5
        iou = (ours & theirs).sum() / (ours | theirs).sum()
        assert iou >= 0.99, iou
        bz = np.asarray(Image.open(out / f"{i:02d}.depth.png")).astype(np.float64) / scale
        # Compare away from silhouettes (Blender's pixel filter mixes surfaces there).
        from scipy.ndimage import binary_erosion

        inner = binary_erosion(ours & theirs & (alpha > 0.999), iterations=1)
        dz = np.abs(depth[0, ..., 0].numpy()[inner] - bz[inner])
        assert np.median(dz) < 2e-3 and np.quantile(dz, 0.95) < 2e-2, (np.median(dz), np.quantile(dz, 0.95))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_twin_matches_nvdiffrast() -> None:
    import trimesh

    s = trimesh.creation.icosphere(4)
    verts = torch.tensor(s.vertices * 0.5, dtype=torch.float32, device="cuda")
    faces = torch.tensor(s.faces, dtype=torch.long, device="cuda")
    H = W = 256
    c2w = np.stack([look_at(spherical_position(az, 20.0, 2.6)) for az in (0.0, 100.0, 230.0)])
    K = np.repeat(intrinsics(40.0, W)[None], 3, 0)
    mvp = opencv_to_clip(torch.tensor(c2w).cuda(), torch.tensor(K).cuda(), H, W, 0.1, 10.0)
    pos = torch.cat([verts, torch.ones(len(verts), 1, device="cuda")], 1) @ mvp.transpose(-1, -2)
    nv, tw = Rasterizer("nvdiffrast", "cuda"), Rasterizer("torch", "cuda")
    attr = torch.rand(1, len(verts), 3, device="cuda")
    with torch.no_grad():  # which pixels both rasterizers give to the same triangle
        ids = [r.rasterize(pos, faces, (H, W))[0][..., 3] for r in (nv, tw)]
        same = (ids[0] == ids[1]) & (ids[0] > 0)
    outs = {}
    for name, r in (("nv", nv), ("tw", tw)):
        p = pos.clone().requires_grad_(True)
        rast, _ = r.rasterize(p, faces, (H, W))
        img, _ = r.interpolate(attr, rast, faces)
        aa = r.antialias(img, rast, p, faces)
        # Gradients from the pixels both assign to the same triangle: at edge ties the two pick different
        # triangles and send gradient to different vertices, which says nothing about the derivatives.
        (img * same[..., None]).sum().backward()
        outs[name] = (rast.detach(), img.detach(), aa.detach(), p.grad)
    (r1, i1, a1, g1), (r2, i2, a2, g2) = outs["nv"], outs["tw"]
    c1, c2 = r1[..., 3] > 0, r2[..., 3] > 0
    assert (c1 ^ c2).float().sum() / (c1 | c2).float().sum() < 1e-3  # coverage: ties on edges only
    # Barycentrics and interpolated values agree where both chose the same triangle. nvdiffrast's CUDA
    # rasterizer sets its edge functions up in fixed point (snapped vertex positions), which moved one
    # barycentric of 132,726 by 1.0002e-4 on an H200 (2026-11-28); 3e-4 allows that rounding, while a
    # wrong triangle, perspective correction or vertex order is off by more than 1e-2.
    torch.testing.assert_close(r1[same][:, :3], r2[same][:, :3], rtol=0, atol=3e-4)
    torch.testing.assert_close(i1[same], i2[same], rtol=0, atol=3e-4)
    cos = float(torch.nn.functional.cosine_similarity(g1.flatten(), g2.flatten(), dim=0))
    rel = float((g1 - g2).norm() / g1.norm())
    # Same derivatives up to the fixed-point barycentric rounding above.
    assert cos > 0.999 and rel < 0.05, f"vertex gradients differ: cosine {cos:.5f}, relative L2 {rel:.4f}"
    # Antialiasing is approximate in the twin (silhouettes against empty pixels only).
    assert (a1 - a2).abs().mean() < 0.01


def test_fast_coverage_equals_the_float64_reference_on_a_marching_cubes_mesh() -> None:
    """The batched float32 pass (what `rasterize` runs) against the first twin (one view at a time, coverage
    in float64, itself held against the closed forms and Blender above): the same triangle at every pixel
    of 4 views of a 50 k-face torus, the same (u, v, z/w), and no cracks between neighbouring triangles."""
    from bench.mesh import raster_inputs
    from training.ops.raster import rasterize_reference

    pos, faces = raster_inputs("cpu", size=256)
    pos = pos[::2]
    fast, _ = rasterize(None, pos, faces, 256)
    ref = rasterize_reference(pos, faces, 256)
    assert (ref[..., 3] > 0).sum() > 4 * 256 * 256 * 0.05  # the torus covers ~7 % of each view
    assert torch.equal(fast[..., 3], ref[..., 3])
    torch.testing.assert_close(fast[..., :3], ref[..., :3], rtol=0, atol=1e-6)


def test_a_pixel_centre_on_a_shared_edge_is_covered() -> None:
    """Two triangles of a square split along its diagonal, with pixel centres exactly on the diagonal:
    float32 coverage must not leave a crack there (each edge test is the exact negation of its neighbour's)."""
    H = W = 16
    # NDC corners chosen so the diagonal passes through pixel centres (x = y in pixel units).
    p = torch.tensor([[-0.75, -0.75, 0.0, 1.0], [0.75, -0.75, 0.0, 1.0], [0.75, 0.75, 0.0, 1.0],
                      [-0.75, 0.75, 0.0, 1.0]])[None]
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast, _ = rasterize(None, p, faces, (H, W))
    covered = rast[0, ..., 3] > 0
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[2:14, 2:14] = True  # pixel centres 2.5 .. 13.5 lie in [2, 14] = NDC [-0.75, 0.75]
    assert torch.equal(covered, inside)


CENTRE = np.array([0.1, 0.05, -0.03])


def _sphere_view(side: int, subdivisions: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Clip positions [1, V, 4] and faces of an icosphere (20·4^s faces, radius 0.5, centred at CENTRE) seen
    from one camera into side² pixels, and that camera (c2w, K)."""
    import trimesh

    m = trimesh.creation.icosphere(subdivisions, 0.5)
    verts = torch.tensor(m.vertices + CENTRE, dtype=torch.float64)
    c2w = look_at(spherical_position(35.0, 20.0, 2.2)).astype(np.float64)
    K = intrinsics(40.0, side).astype(np.float64)
    return _clip(verts, c2w, K, side, side), torch.tensor(m.faces, dtype=torch.long), c2w, K


def _sphere_area(c2w: np.ndarray, K: np.ndarray, side: int, s: int = 16) -> float:
    """Closed form: the true sphere's projected area in pixels, by the ray-sphere test at s × s samples."""
    v, u = (np.mgrid[0 : side * s, 0 : side * s] + 0.5) / s
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    oc = c2w[:3, 3] - CENTRE
    b = d @ oc
    return float((b * b - (oc @ oc - 0.25) > 0).sum()) / s**2


@pytest.mark.parametrize("subdivisions", [2, 5])
def test_antialiased_coverage_keeps_the_silhouette_area(subdivisions: int) -> None:
    """Antialiased coverage of a mesh sums to its projected area, for coarse triangles (the silhouette edge
    is the covering triangle's own) and for sub-pixel ones (marching cubes' meshes: the covering triangle
    ends before the silhouette). The area: the same mesh's pixel-centre coverage (held against closed forms
    above) at 16 × 16 samples per pixel; for the fine sphere also the true sphere's (its facets lie within
    0.1 % of the radius). The twin before the silhouette walk (`silhouette_hops=0`) lost 0.95 % and 3.3 %."""
    H, s = 96, 16
    pos, faces, c2w, K = _sphere_view(H, subdivisions)
    rast, _ = rasterize(None, pos, faces, (H, H))
    hit = (rast[..., 3:] > 0).to(pos.dtype)
    fine, _ = rasterize(None, _sphere_view(H * s, subdivisions)[0], faces, (H * s, H * s))
    areas = [float((fine[0, ..., 3] > 0).sum()) / s**2] + ([_sphere_area(c2w, K, H)] if subdivisions == 5 else [])
    covered = float(antialias(hit, rast, pos, faces).sum())
    for area in areas:
        assert abs(covered - area) / area < 0.005, (covered, area)
    before = float(antialias(hit, rast, pos, faces, silhouette_hops=0).sum())
    assert (areas[0] - before) / areas[0] > 0.008, before  # what the walk fixes


def test_antialias_walk_stops_at_faces_the_rasterizer_drops() -> None:
    """A neighbour with a vertex at w = 0 (dropped by `rasterize`, as nvdiffrast clips it) is a silhouette to
    the walk: the blended image stays finite and equals the lone triangle's."""
    pos = torch.tensor([[[-0.6, -0.6, 0.0, 1.0], [0.6, -0.6, 0.0, 1.0], [0.0, 0.6, 0.0, 1.0],
                         [0.6, 0.6, 0.0, 0.0]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    rast, _ = rasterize(None, pos, faces, (16, 16))
    hit = (rast[..., 3:] > 0).to(pos.dtype)
    both = antialias(hit, rast, pos, faces)
    lone = antialias(hit, rast, pos, faces[:1])
    assert torch.isfinite(both).all() and torch.equal(both, lone)


def test_face_neighbours_of_closed_and_open_meshes() -> None:
    """Every face of a closed mesh has three neighbours, each sharing exactly the edge opposite vertex k, and
    the relation is symmetric; edges of one face (an open mesh) have none."""
    import trimesh

    from training.ops.raster import face_neighbours

    faces = torch.tensor(trimesh.creation.icosphere(2).faces, dtype=torch.long)
    nb = face_neighbours(faces)
    assert (nb >= 0).all()
    for f in range(len(faces)):
        for k in range(3):
            g = int(nb[f, k])
            edge = {int(faces[f, (k + 1) % 3]), int(faces[f, (k + 2) % 3])}
            assert edge <= set(faces[g].tolist()) and g != f
            assert f in nb[g].tolist()
    assert (face_neighbours(torch.tensor([[0, 1, 2]])) == -1).all()
    two = face_neighbours(torch.tensor([[0, 1, 2], [2, 1, 3]]))  # share the edge (1, 2)
    assert two.tolist() == [[1, -1, -1], [-1, -1, 0]]

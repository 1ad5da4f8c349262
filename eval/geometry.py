"""Geometry metrics of the paper's protocol: normalisation, surface sampling, ICP, Chamfer, F-score, volume IoU.

Protocol (paper §4.1 after InstantMesh; docs/CONTRACTS.md "Evaluation"): both meshes are centred on their bounding-box
centre and scaled so the largest half-side is 1 (they fit [-1, 1]^3); the prediction is aligned to the
ground truth with rigid point-to-point ICP; 16,000 area-weighted surface points are drawn from each (seeded).

Conventions stated here and in docs/eval.md:
- Chamfer `cd` = mean_p min_q |p-q|² + mean_q min_p |q-p|² (squared L2, the sum of both directions, the
  convention of pytorch3d / kaolin `chamfer_distance`); reports print it ×100 like the paper's tables.
  `cd_l2` = the same with unsquared distances, averaged over both directions (0.5·(P→Q + Q→P)).
- F-score at distance τ (config `eval.fscore_threshold`, in the [-1, 1] frame): harmonic mean of precision
  (share of predicted points within τ of the ground truth) and recall (the converse).
- `iou_points`, the paper's IoU "from the 16000 surface points": the IoU of the voxel sets the two point
  samples occupy on an `eval.iou_points_resolution`³ grid over [-1, 1]^3 (docs/eval.md gives its floor).
- IoU of the two solids on a voxel grid over [-1, 1]^3 (voxel centres), inside = |generalised winding number|
  > 0.5 (Jacobson et al. 2013; the absolute value forgives meshes whose faces all point inwards). Winding numbers are exact for closed meshes and degrade gracefully for open,
  non-watertight ones, so those are scored too (with a note). Evaluated coarse-to-fine (fine voxels only
  where the coarse grid straddles 0.5 or meets the surface) with a Barnes–Hut far field (triangle clusters
  far from a query contribute by their area-weighted dipole), so large grids stay affordable on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree


class GeometryError(ValueError):
    """A mesh that cannot be scored; the message is the reason written into the report."""


@dataclass
class Mesh:
    vertices: np.ndarray  # [N,3] float64
    faces: np.ndarray  # [F,3] int64


def check_mesh(vertices: np.ndarray, faces: np.ndarray, name: str = "mesh") -> Mesh:
    """Validate and convert; raise GeometryError with a readable reason for anything unusable."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise GeometryError(f"{name}: vertices must be [N,3], got {v.shape}")
    if f.size == 0:
        raise GeometryError(f"{name}: has no faces")
    if f.ndim != 2 or f.shape[1] != 3:
        raise GeometryError(f"{name}: faces must be [F,3] triangles, got {f.shape}")
    if not np.issubdtype(f.dtype, np.integer) or f.min() < 0 or f.max() >= len(v):
        raise GeometryError(f"{name}: face indices out of range for {len(v)} vertices")
    if not np.isfinite(v).all():
        raise GeometryError(f"{name}: vertices contain NaN or inf")
    f = f.astype(np.int64)
    if triangle_areas(v, f).sum() <= 0:
        raise GeometryError(f"{name}: all faces are degenerate (zero area)")
    return Mesh(v, f)


def load_mesh(path: str | Path, name: str | None = None) -> Mesh:
    """A .glb/.obj/.ply/... (all geometry of the scene, transforms applied) or a geometry.npz."""
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise GeometryError(f"{name}: file not found ({path})")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "vertices" not in z or "faces" not in z:
                raise GeometryError(f"{name}: geometry.npz needs 'vertices' and 'faces'")
            return check_mesh(z["vertices"], z["faces"], name)
    import trimesh

    try:
        scene = trimesh.load(path, force="scene", process=False)
        mesh = scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(concatenate=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a reason in the report
        raise GeometryError(f"{name}: could not be read ({type(e).__name__}: {e})") from None
    if not hasattr(mesh, "faces") or len(mesh.faces) == 0:
        raise GeometryError(f"{name}: has no faces")
    return check_mesh(mesh.vertices, mesh.faces, name)


def triangle_areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    t = v[f]
    return 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)


def is_watertight(mesh: Mesh) -> bool:
    """Every undirected edge shared by exactly two faces, after merging vertices at the same position."""
    _, remap = np.unique(np.round(mesh.vertices, 9), axis=0, return_inverse=True)
    faces = remap.reshape(-1)[mesh.faces]
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return bool((counts == 2).all())


def is_closed(mesh: Mesh) -> bool:
    """Every undirected edge used as often in one direction as in the other, after merging vertices at the
    same position: a closed, consistently oriented surface (watertight, or with the non-manifold edges that
    marching cubes leaves at ambiguous cells), whose winding numbers are exact integers."""
    if len(mesh.faces) == 0:
        return False
    _, remap = np.unique(np.round(mesh.vertices, 9), axis=0, return_inverse=True)
    faces = remap.reshape(-1)[mesh.faces]
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, inv = np.unique(np.sort(e, axis=1), axis=0, return_inverse=True)
    balance = np.zeros(int(inv.max()) + 1)
    np.add.at(balance, inv.reshape(-1), np.where(e[:, 0] < e[:, 1], 1.0, -1.0))
    return bool((balance == 0).all())


def normalize(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre on the bounding-box centre, scale the largest half-side to 1. -> (v', centre [3], scale)."""
    lo, hi = vertices.min(0), vertices.max(0)
    centre = 0.5 * (lo + hi)
    half = 0.5 * float((hi - lo).max())
    if half <= 0:
        raise GeometryError("mesh has zero extent")
    return (vertices - centre) / half, centre, 1.0 / half


def sample_surface(mesh: Mesh, n: int, seed: int = 0) -> np.ndarray:
    """`n` points uniform by area over the surface (faces by area, then uniform barycentrics). -> [n,3]."""
    rng = np.random.default_rng(seed)
    areas = triangle_areas(mesh.vertices, mesh.faces)
    face = rng.choice(len(areas), size=n, p=areas / areas.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)  # sqrt makes the barycentric draw uniform over the triangle
    t = mesh.vertices[mesh.faces[face]]
    return (1 - s)[:, None] * t[:, 0] + (s * (1 - r2))[:, None] * t[:, 1] + (s * r2)[:, None] * t[:, 2]


def nearest_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each point of a [N,3], the L2 distance to its nearest point of b [M,3]. -> [N]."""
    return cKDTree(b).query(a, k=1, workers=1)[0]


def chamfer(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Both directions; see the module docstring for the conventions. pred [N,3], gt [M,3]."""
    d_pg, d_gp = nearest_distances(pred, gt), nearest_distances(gt, pred)
    return {"cd": float((d_pg ** 2).mean() + (d_gp ** 2).mean()),
            "cd_l2": float(0.5 * (d_pg.mean() + d_gp.mean()))}


def fscore(pred: np.ndarray, gt: np.ndarray, threshold: float) -> dict[str, float]:
    precision = float((nearest_distances(pred, gt) < threshold).mean())
    recall = float((nearest_distances(gt, pred) < threshold).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"fscore": f, "precision": precision, "recall": recall}


def kabsch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R [3,3] (det +1) and translation t [3] minimising Σ|R·src + t − dst|² (paired points)."""
    cs, cd = src.mean(0), dst.mean(0)
    h = (src - cs).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cd - r @ cs


def icp(src: np.ndarray, dst: np.ndarray, iterations: int = 50, tol: float = 1e-7) -> dict:
    """Rigid point-to-point ICP of src [N,3] onto dst [M,3].

    -> {"R" [3,3], "t" [3], "residual": RMS nearest distance after alignment, "residual_before",
    "iterations"}. Starts from the identity (both clouds are already normalised and roughly aligned).
    """
    tree = cKDTree(dst)
    r, t = np.eye(3), np.zeros(3)
    before = float(np.sqrt((tree.query(src, workers=1)[0] ** 2).mean()))
    prev, it = math.inf, 0
    for it in range(1, iterations + 1):  # noqa: B007 - the count is reported
        cur = src @ r.T + t
        dist, idx = tree.query(cur, workers=1)
        err = float(np.sqrt((dist ** 2).mean()))
        if prev - err < tol:
            break
        prev = err
        dr, dt = kabsch(cur, dst[idx])
        r, t = dr @ r, dr @ t + dt
    residual = float(np.sqrt((tree.query(src @ r.T + t, workers=1)[0] ** 2).mean()))
    return {"R": r, "t": t, "residual": residual, "residual_before": before, "iterations": it}


# ----------------------------------------------------------------------------------------------------------
# Generalised winding numbers.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Clusters:
    tris: torch.Tensor  # [K,L,3,3] triangles per cluster, padded with zero-area triangles (contribute 0)
    centre: torch.Tensor  # [K,3] area-weighted centroid
    normal: torch.Tensor  # [K,3] Σ area·unit normal (the dipole moment)
    radius: torch.Tensor  # [K] max distance from the centre to a vertex of the cluster


def _build_clusters(v: np.ndarray, f: np.ndarray, leaf: int) -> _Clusters:
    """Median-split triangle centroids (a k-d tree) until leaves hold ≤ `leaf` triangles."""
    tri = v[f]  # [F,3,3]
    cen = tri.mean(1)
    order, stack = [], [np.arange(len(f))]
    while stack:
        idx = stack.pop()
        if len(idx) <= leaf:
            order.append(idx)
            continue
        pts = cen[idx]
        axis = int(np.argmax(pts.max(0) - pts.min(0)))
        srt = idx[np.argsort(pts[:, axis], kind="stable")]
        stack += [srt[len(srt) // 2:], srt[:len(srt) // 2]]
    k = len(order)
    padded = np.zeros((k, leaf, 3, 3))
    centre, normal, radius = np.zeros((k, 3)), np.zeros((k, 3)), np.zeros(k)
    for i, idx in enumerate(order):
        t = tri[idx]
        area_n = 0.5 * np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])  # [n,3] area-weighted normals
        w = np.linalg.norm(area_n, axis=1)
        c = (t.mean(1) * w[:, None]).sum(0) / w.sum() if w.sum() > 0 else t.mean((0, 1))
        centre[i], normal[i] = c, area_n.sum(0)
        radius[i] = np.linalg.norm(t - c, axis=2).max()
        padded[i, :len(idx)] = t
        padded[i, len(idx):] = t[0, 0]  # a triangle collapsed to a point has zero solid angle
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return _Clusters(as_t(padded), as_t(centre), as_t(normal), as_t(radius))


def _solid_angle(q: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Signed solid angle / 4π of triangles tri [...,3,3] seen from q [...,3] (Van Oosterom & Strackee)."""
    a, b, c = (tri[..., i, :] - q for i in range(3))
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
    det = (a * torch.cross(b, c, dim=-1)).sum(-1)
    den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return torch.atan2(det, den) / (2 * math.pi)


def _exact_winding(q: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Σ over all triangles, no approximation. q [Q,3], tri [T,3,3] -> [Q]."""
    return _solid_angle(q[:, None], tri[None]).sum(-1)


def winding_numbers(points: np.ndarray, mesh: Mesh, beta: float = 2.5, leaf: int = 16,
                    chunk: int = 2048, pair_chunk: int = 4096) -> np.ndarray:
    """Generalised winding number of `mesh` at points [Q,3] -> [Q] (≈1 inside, ≈0 outside a closed mesh).

    Barnes–Hut: a cluster farther than `beta`·radius from a query contributes its dipole
    n·(c − q) / (4π|c − q|³) (error O((radius/distance)²) of its small solid angle); nearer clusters are
    summed exactly, as (query, cluster) pairs in chunks. float64 throughout.
    """
    cl = _build_clusters(mesh.vertices, mesh.faces, leaf)
    q = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64))
    out = torch.zeros(len(q), dtype=torch.float64)
    for i in range(0, len(q), chunk):
        qc = q[i:i + chunk]
        d = cl.centre[None] - qc[:, None]  # [Qc,K,3]
        dist = d.norm(dim=-1)  # [Qc,K]
        near = dist <= beta * cl.radius[None]
        far_term = (d * cl.normal[None]).sum(-1) / (4 * math.pi * dist.clamp_min(1e-12) ** 3)
        w = torch.where(near, torch.zeros_like(far_term), far_term).sum(1)
        pairs = torch.nonzero(near)  # [P,2] (query row, cluster)
        for j in range(0, len(pairs), pair_chunk):
            qi, ki = pairs[j:j + pair_chunk].unbind(1)
            w.index_add_(0, qi, _solid_angle(qc[qi][:, None], cl.tris[ki]).sum(-1))
        out[i:i + chunk] = w
    return out.numpy()


def voxel_centres(resolution: int) -> np.ndarray:
    """Centres of a resolution³ grid over [-1, 1]^3, axis 0 = x. -> [R,R,R,3]."""
    g = (np.arange(resolution) + 0.5) * (2.0 / resolution) - 1.0
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), -1)


def _surface_blocks(pts: np.ndarray, n: int, size: float) -> np.ndarray:
    """bool [n,n,n]: which blocks of side `size` over [-1,1]^3 hold any of the points pts [P,3]."""
    ib = np.floor((pts + 1.0) / size).astype(np.int64)
    ib = ib[((ib >= 0) & (ib < n)).all(1)]
    out = np.zeros((n,) * 3, bool)
    out[ib[:, 0], ib[:, 1], ib[:, 2]] = True
    return out


def _differs(inside: np.ndarray) -> np.ndarray:
    """bool, same shape: cells whose inside-ness differs from a face neighbour's."""
    out = np.zeros_like(inside)
    for ax in range(3):
        diff = np.diff(inside.astype(np.int8), axis=ax) != 0
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        out[tuple(lo)] |= diff
        out[tuple(hi)] |= diff
    return out


def occupancy(mesh: Mesh, resolution: int, coarse: int = 4, seed: int = 0) -> np.ndarray:
    """Inside-ness (winding number > 0.5) at the voxel centres of a resolution³ grid over [-1,1]^3. -> bool [R,R,R].

    Coarse-to-fine, as an octree: winding numbers at the centres of `coarse`³ blocks first; a block that
    holds surface, or whose answer differs from a face neighbour's, is split into its 8 children, which are
    evaluated at their centres; the others pass their answer to every voxel they cover. Repeated down to
    single voxels, whose centres are the grid's. Surface blocks are found from dense surface samples.
    `coarse` must be a power of two dividing the resolution (otherwise every voxel is evaluated).
    """
    r = resolution
    centres = voxel_centres(r)
    if coarse <= 1 or r % coarse or coarse & (coarse - 1):
        return (np.abs(winding_numbers(centres.reshape(-1, 3), mesh)) > 0.5).reshape(r, r, r)
    h = 2.0 / r
    area = triangle_areas(mesh.vertices, mesh.faces).sum()
    n = int(min(2e6, max(1e4, 16 * area / h ** 2)))  # samples ≤ a quarter voxel apart
    pts = np.concatenate([sample_surface(mesh, n, seed), mesh.vertices])

    def block_centres(b: int, idx: np.ndarray) -> np.ndarray:  # centres of blocks of b voxels at idx [K,3]
        return (idx + 0.5) * (h * b) - 1.0

    b = coarse
    nb = r // b
    idx = np.argwhere(np.ones((nb,) * 3, bool))
    inside = (np.abs(winding_numbers(block_centres(b, idx), mesh)) > 0.5).reshape(nb, nb, nb)
    live = np.ones_like(inside)  # blocks evaluated at this level (the others inherited a final answer)
    while b > 1:
        split = live & (_surface_blocks(pts, nb, h * b) | _differs(inside))
        b, nb = b // 2, nb * 2
        inside = np.repeat(np.repeat(np.repeat(inside, 2, 0), 2, 1), 2, 2)
        live = np.repeat(np.repeat(np.repeat(split, 2, 0), 2, 1), 2, 2)
        idx = np.argwhere(live)
        if len(idx):
            inside[idx[:, 0], idx[:, 1], idx[:, 2]] = np.abs(winding_numbers(block_centres(b, idx), mesh)) > 0.5
    return inside


def point_voxel_iou(a: np.ndarray, b: np.ndarray, resolution: int) -> float:
    """IoU of the voxel sets two surface samples a [N,3], b [M,3] occupy on a resolution³ grid over [-1, 1]^3
    (points outside are clamped to the border voxels): the paper's IoU "from 16000 surface points"."""
    def occupied(p: np.ndarray) -> np.ndarray:
        i = np.clip(np.floor((p + 1.0) * 0.5 * resolution).astype(np.int64), 0, resolution - 1)
        return np.unique((i[:, 0] * resolution + i[:, 1]) * resolution + i[:, 2])

    va, vb = occupied(np.asarray(a, np.float64)), occupied(np.asarray(b, np.float64))
    union = np.union1d(va, vb).size
    return float(np.intersect1d(va, vb).size / union) if union else 0.0


def ray_occupancy(mesh: Mesh, resolution: int, max_pairs: int = 50_000_000) -> np.ndarray:
    """Exact winding number > 0.5 at the voxel centres of a resolution³ grid over [-1,1]^3 for a closed,
    consistently oriented mesh, by casting one ray along +x per (y, z) column of centres. -> bool [R,R,R].

    The winding number of a closed oriented surface at p is the signed count of its crossings by any ray from
    p (+1 where the surface's normal has n_x > 0): one pass over triangle/ray pairs (each triangle only meets
    the rays inside its y-z bounding box), then a cumulative sum along x. Overlapping closed parts count 2,
    as winding numbers do. The rays are offset by 1e-4 voxel so that none passes exactly through an edge or
    a vertex of a mesh whose vertices sit on a lattice. Not for open meshes (volume_iou uses winding numbers
    there). Raises GeometryError past `max_pairs` candidate pairs (a mesh of huge triangles at a huge grid).
    """
    r, h = resolution, 2.0 / resolution
    y0, z0 = -1.0 + 0.5 * h + 1e-4 * h * np.sqrt(2.0), -1.0 + 0.5 * h + 1e-4 * h * np.sqrt(3.0)
    t = mesh.vertices[mesh.faces]  # [F,3,3]
    ty, tz = t[:, :, 1], t[:, :, 2]
    j0 = np.clip(np.ceil((ty.min(1) - y0) / h), 0, r).astype(np.int64)
    j1 = np.clip(np.floor((ty.max(1) - y0) / h) + 1, 0, r).astype(np.int64)
    k0 = np.clip(np.ceil((tz.min(1) - z0) / h), 0, r).astype(np.int64)
    k1 = np.clip(np.floor((tz.max(1) - z0) / h) + 1, 0, r).astype(np.int64)
    nj, nk = np.maximum(j1 - j0, 0), np.maximum(k1 - k0, 0)
    count = nj * nk
    if count.sum() > max_pairs:
        raise GeometryError(f"{int(count.sum())} ray/triangle pairs for the IoU grid (cap {max_pairs})")
    tri = np.repeat(np.arange(len(t)), count)
    local = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    j = j0[tri] + local // np.maximum(nk[tri], 1)
    k = k0[tri] + local % np.maximum(nk[tri], 1)
    py, pz = y0 + j * h, z0 + k * h
    (ay, by, cy), (az, bz, cz) = ty[tri].T, tz[tri].T
    area = (by - ay) * (cz - az) - (bz - az) * (cy - ay)  # twice the signed y-z area = 2·n_x of the face
    w0 = (by - py) * (cz - pz) - (bz - pz) * (cy - py)  # edge functions: the point's barycentrics × area
    w1 = (cy - py) * (az - pz) - (cz - pz) * (ay - py)
    w2 = area - w0 - w1
    sign = np.sign(area)
    hit = (area != 0) & (w0 * sign > 0) & (w1 * sign > 0) & (w2 * sign > 0)
    tri, j, k, area, w0, w1 = tri[hit], j[hit], k[hit], area[hit], w0[hit], w1[hit]
    tx = t[tri, :, 0]
    x = (w0 * tx[:, 0] + w1 * tx[:, 1] + (area - w0 - w1) * tx[:, 2]) / area  # the crossing's x
    below = np.clip(np.ceil((x - (-1.0 + 0.5 * h)) / h), 0, r).astype(np.int64)  # centres with x_i < x
    acc = np.zeros((r * r, r + 1))
    keep = below > 0
    np.add.at(acc, ((j * r + k)[keep], below[keep] - 1), np.sign(area[keep]))
    winding = np.cumsum(acc[:, ::-1], axis=1)[:, ::-1][:, :r]  # crossings beyond each centre, signed
    return (np.abs(winding) > 0.5).reshape(r, r, r).transpose(2, 0, 1)


def solid_occupancy(mesh: Mesh, resolution: int) -> np.ndarray:
    """Inside-ness at the voxel centres: exact by rays for a closed mesh (is_closed), generalised winding
    numbers (approximate) else."""
    return ray_occupancy(mesh, resolution) if is_closed(mesh) else occupancy(mesh, resolution)


def volume_iou(a: Mesh, b: Mesh, resolution: int) -> float:
    """IoU of the two solids on a resolution³ voxel grid over [-1, 1]^3 (winding numbers: solid_occupancy)."""
    oa, ob = solid_occupancy(a, resolution), solid_occupancy(b, resolution)
    union = np.logical_or(oa, ob).sum()
    return float(np.logical_and(oa, ob).sum() / union) if union else 0.0


# ----------------------------------------------------------------------------------------------------------
# The whole protocol for one pair.
# ----------------------------------------------------------------------------------------------------------


def evaluate_geometry(pred: Mesh, gt: Mesh, points: int = 16000, fscore_threshold: float = 0.02,
                      iou_resolution: int = 64, icp_iterations: int = 50, seed: int = 0,
                      iou_points_resolution: int = 32) -> dict:
    """Normalise both, ICP-align pred onto gt, then Chamfer, F-score, IoU. -> flat dict of numbers + notes.

    Returns cd (raw; ×100 in reports), cd_l2, fscore, precision, recall, iou (solids, winding numbers),
    iou_points (the paper's: voxels the two surface samples occupy, `point_voxel_iou`), icp_residual (RMS
    nearest distance after ICP, [-1,1] frame), icp_residual_before, pred_watertight, gt_watertight, notes.
    """
    pv, _, _ = normalize(pred.vertices)
    gv, _, _ = normalize(gt.vertices)
    pred_n, gt_n = Mesh(pv, pred.faces), Mesh(gv, gt.faces)
    gt_pts = sample_surface(gt_n, points, seed)
    pred_pts = sample_surface(pred_n, points, seed + 1)
    reg = icp(pred_pts, gt_pts, icp_iterations)
    pred_al = Mesh(pv @ reg["R"].T + reg["t"], pred.faces)
    pred_pts = pred_pts @ reg["R"].T + reg["t"]
    out = {**chamfer(pred_pts, gt_pts), **fscore(pred_pts, gt_pts, fscore_threshold)}
    out["iou"] = volume_iou(pred_al, gt_n, iou_resolution)
    out["iou_points"] = point_voxel_iou(pred_pts, gt_pts, iou_points_resolution)
    out["icp_residual"], out["icp_residual_before"] = reg["residual"], reg["residual_before"]
    out["pred_watertight"], out["gt_watertight"] = is_watertight(pred), is_watertight(gt)
    notes = [f"{n} mesh is not closed: IoU uses generalised winding numbers (approximate inside)"
             for n, m in (("predicted", pred), ("ground-truth", gt)) if not is_closed(m)]
    out["notes"] = "; ".join(notes)
    return out

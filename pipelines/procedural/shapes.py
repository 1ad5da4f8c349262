"""Shapes of procedural world parts, each in its own frame: primitives, polyhedron edges as wire-frame beams,
and bump / height-field displacement, all as manifold3d solids (Apache-2.0: it does every boolean).

A part's frame is centred on its bounding box, with the part's extents along the axes; placing, cutting,
projecting UVs and the union of the parts are `pipelines.procedural.solid`'s.
"""

from __future__ import annotations

import manifold3d as m3d
import numpy as np

from pipelines.procedural.recipe import Part

DISPLACED_TRIANGLES = 1200  # refinement budget of one displaced part: the union's cost follows its triangles
# (displaced parts were 3/4 of it at 2000); a wave spans >= 6 edges when the budget allows


# ---------------------------------------------------------------------------------------------- primitives


def polyhedron_points(kind: str, shape: float) -> np.ndarray:
    """Vertices of the polyhedral kinds, in the unit cube [-0.5, 0.5]^3."""
    if kind == "tetrahedron":
        return 0.5 * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
    if kind == "octahedron":
        return 0.5 * np.concatenate([np.eye(3), -np.eye(3)])
    if kind == "pyramid":
        return np.array([[-0.5, -0.5, -0.5], [0.5, -0.5, -0.5], [0.5, 0.5, -0.5], [-0.5, 0.5, -0.5], [0, 0, 0.5]])
    if kind == "icosahedron":
        g = (1 + 5**0.5) / 2
        p = np.array([[0, a, b * g] for a in (-1, 1) for b in (-1, 1)], float)
        p = np.concatenate([p, np.roll(p, 1, 1), np.roll(p, 2, 1)])
        return 0.5 * p / g
    if kind == "box":
        return 0.5 * np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    raise ValueError(f"no vertex list for '{kind}'")


def primitive(kind: str, size: np.ndarray, segments: int, shape: float) -> m3d.Manifold:
    """Primitive `kind` with bounding box `size` centred at the origin (its own frame)."""
    M = m3d.Manifold
    size = np.asarray(size, float)
    if kind == "box":
        return M.cube(tuple(size), True)
    if kind == "rounded_box":
        r = shape * size.min()
        inner = np.maximum(size / 2 - r, 1e-4)
        ball = M.sphere(r, max(8, segments // 2))
        return M.batch_hull([ball.translate(tuple(c * inner)) for c in polyhedron_points("box", 0) * 2])
    if kind == "sphere":
        return M.sphere(0.5, segments).scale(tuple(size))
    if kind in ("cylinder", "cone", "frustum", "prism"):
        top = {"cylinder": 0.5, "cone": 0.0, "frustum": 0.5 * shape, "prism": 0.5}[kind]
        n = int(shape) if kind == "prism" else segments
        return M.cylinder(1.0, 0.5, top, n, True).scale(tuple(size))
    if kind == "tube":
        outer = M.cylinder(1.0, 0.5, 0.5, segments, True)
        inner = M.cylinder(1.2, 0.5 * shape, 0.5 * shape, segments, True)
        return (outer - inner).scale(tuple(size))
    if kind == "torus":
        ring = 0.5 / (1.0 + shape)  # ring radius so that the outer diameter is 1
        circle = m3d.CrossSection.circle(shape * ring, max(8, segments // 2)).translate((ring, 0.0))
        torus = M.revolve(circle, segments)
        return torus.scale((size[0], size[1], size[2] / (2 * shape * ring)))
    if kind == "capsule":
        r = 0.5 * min(size[0], size[1])
        half = max(size[2] / 2 - r, 1e-3)
        ball = M.sphere(1.0, segments).scale((size[0] / 2, size[1] / 2, r))
        return M.batch_hull([ball.translate((0, 0, -half)), ball.translate((0, 0, half))])
    if kind in ("tetrahedron", "octahedron", "pyramid", "icosahedron"):
        return M.hull_points(polyhedron_points(kind, shape) * size)
    raise ValueError(f"unknown primitive '{kind}'")


def manifold_arrays(man: m3d.Manifold) -> tuple[np.ndarray, np.ndarray]:
    mesh = man.to_mesh()
    return np.asarray(mesh.vert_properties), np.asarray(mesh.tri_verts).astype(np.int64)


def feature_edges(man: m3d.Manifold) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] and edges [E, 2] of a polyhedron: the triangle edges between non-coplanar faces."""
    vp, tri = manifold_arrays(man)
    v = vp[:, :3]
    n = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    e = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), axis=1)
    face = np.tile(np.arange(len(tri)), 3)
    order = np.lexsort((e[:, 1], e[:, 0]))  # each edge twice in a closed mesh, adjacent after sorting
    e, face = e[order], face[order]
    a, b = face[0::2], face[1::2]
    sharp = np.einsum("ij,ij->i", n[a], n[b]) < 0.999
    return v, e[0::2][sharp]


def _align_z(d: np.ndarray) -> np.ndarray:
    """A rotation [3, 3] that takes +Z to the unit vector `d`."""
    a = np.array([1.0, 0, 0]) if abs(d[0]) < 0.9 else np.array([0, 1.0, 0])
    u = np.cross(a, d)
    u /= np.linalg.norm(u)
    return np.stack([u, np.cross(d, u), d], 1)


def affine_3x4(rot: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(rot, float), np.asarray(t, float).reshape(3, 1)], 1)


def wire_frame(part: Part, radius: float, sides: int, rng: np.random.Generator) -> m3d.Manifold:
    """Beams of about `radius` (`sides`-sided tubes) along the edges of the part's polyhedron, as one solid.

    Each beam runs `radius` past both corners, so the beams of a corner overlap and the union closes it
    (a ball per corner would double the booleans for what a 1-3 % thick corner shows). Every beam gets
    its own twist and a radius within 3 %: beams in exact alignment would leave faces coplanar and
    vertices of different surfaces at one position.
    """
    v, edges = feature_edges(primitive(part.kind, np.asarray(part.size), part.segments, part.shape))
    M = m3d.Manifold
    pieces = []
    for i, j in edges:
        d = v[j] - v[i]
        length = float(np.linalg.norm(d))
        d = d / length
        r = radius * rng.uniform(0.97, 1.03)
        beam = M.cylinder(length + 2 * r, r, r, sides).rotate((0.0, 0.0, float(rng.uniform(0, 360))))
        pieces.append(beam.transform(affine_3x4(_align_z(d), v[i] - r * d)))
    return M.batch_boolean(pieces, m3d.OpType.Add)


def _waves(rng: np.random.Generator, dims: int, k: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sum of `k` sines with random directions, phases and weights summing to 1: smooth noise in [-1, 1]."""
    w = rng.standard_normal((k, dims))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    w *= rng.uniform(0.6, 1.4, (k, 1))
    amp = rng.uniform(0.3, 1.0, k)
    return w, rng.uniform(0, 2 * np.pi, k), amp / amp.sum()


def displace(man: m3d.Manifold, part: Part, rng: np.random.Generator) -> m3d.Manifold:
    """Bump (along the smooth normals) or height-field (along the part's up axis, on upward faces) displacement.

    The part (no vertex properties) is first refined so that a wave spans at least ~6 edges (within
    DISPLACED_TRIANGLES); the normals used are smooth everywhere, one per position, so the solid stays
    closed.
    """
    size = np.asarray(part.size)
    length = size.max() / (6 * part.frequency)
    length = max(length, float(np.sqrt(man.surface_area() / (0.433 * DISPLACED_TRIANGLES))))
    man = man.refine_to_length(length).calculate_normals(0, 179.0)
    mesh = man.to_mesh()
    vp = np.array(mesh.vert_properties, np.float64)  # x y z nx ny nz, one normal per position (all smooth)
    p, n = vp[:, :3], vp[:, 3:6]
    amp = part.amplitude * size.min()
    phase_scale = 2 * np.pi * part.frequency / size.max()
    if part.displacement == "bump":
        w, ph, a = _waves(rng, 3)
        h = np.sin(p @ w.T * phase_scale + ph) @ a
        p = p + n * (amp * h)[:, None]
    else:
        w, ph, a = _waves(rng, 2)
        h = np.sin(p[:, :2] @ w.T * phase_scale + ph) @ a
        up = np.clip(n[:, 2], 0, 1) ** 2  # only the upward-facing surface rises: a height field on top
        p = p.copy()
        p[:, 2] += amp * h * up
    out = m3d.Mesh(vert_properties=p.astype(np.float32),
                   tri_verts=np.ascontiguousarray(np.asarray(mesh.tri_verts), np.uint32))
    return m3d.Manifold(out)

"""Geometry of a procedural world asset: every part built, cut and displaced in its own frame, placed, and
all parts unioned by manifold3d; then per-part cube-projected UVs and normals with sharp edges.

UVs are projected after the booleans, per triangle, in the frame of the part the triangle came from
(manifold3d's `run_original_id` says which: each finished part is made an "original" before placement),
so a composite's UVs are never stretched by another part's scale, and the faces a cutter leaves get the
projection of the part they were cut from. The union is a closed oriented 2-manifold unless a part could
not be made one: that part is kept as a plain shell beside the solid, and the asset is recorded as not
watertight. What is undone or left out on the way is recorded in `Geometry.fallbacks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import manifold3d as m3d
import numpy as np

from pipelines.procedural.recipe import Part, Recipe
from pipelines.procedural.shapes import (
    affine_3x4,
    displace,
    manifold_arrays,
    polyhedron_points,
    primitive,
    wire_frame,
)

SHARP_DEG = 40.0  # dihedral angle above which an edge stays sharp in the written normals
MIN_KEPT_VOLUME = 0.3  # a cut that leaves less of its part than this is undone (the part stays whole)
SLIVER = 1e-5  # of the object's size: edges shorter than this are collapsed after the union

Tile = tuple[float, float, float]  # (u0, v0, side) of a material's square in the atlas, in UV units


class ProceduralError(ValueError):
    """An asset that cannot be built; the message is the manifest reason."""

    reason_only = True  # the executor writes the message without the class name


@dataclass
class Geometry:
    """The built asset in the object frame (Z up), centred, largest side 1."""

    positions: np.ndarray  # [V, 3] float32
    normals: np.ndarray  # [V, 3] float32, unit
    uvs: np.ndarray  # [V, 2] float32, image convention (v down, as glTF)
    faces: np.ndarray  # [F, 3] uint32
    face_material: np.ndarray  # [F] int64, index into Recipe.materials
    watertight: bool  # one closed oriented 2-manifold (possibly of several components)
    components: int  # connected pieces of the solid (+ any plain shells)
    genus: int  # handles summed over the solid's components
    fallbacks: list[str] = field(default_factory=list)  # what was undone or kept aside, and why
    undone: set[tuple[int, str]] = field(default_factory=set)  # (part, augmentation or "part") not applied


@dataclass
class Log:
    """What the build undid or left out: readable reasons, and (part, what) pairs for the description."""

    fallbacks: list[str] = field(default_factory=list)
    undone: set[tuple[int, str]] = field(default_factory=set)

    def undo(self, part: int, what: str, why: str) -> None:
        self.undone.add((part, what))
        self.fallbacks.append(f"part {part}: {why}")


# ---------------------------------------------------------------------------------------------- UVs


def _face_axes(tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dominant normal axis [F] (0, 1, 2) and its sign [F] (+-1) of triangles [F, 3, 3]."""
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    axis = np.abs(n).argmax(1)
    return axis, np.where(n[np.arange(len(n)), axis] >= 0, 1, -1)


def project(points: np.ndarray, axis: np.ndarray, sign: np.ndarray, lo: np.ndarray, span: np.ndarray,
            tile: np.ndarray) -> np.ndarray:
    """Cube projection of points [N, 3] (in their part's frame) on the plane of `axis` [N] into `tile` [N, 3].

    `sign` [N] is the normal's sign along `axis`; `lo` [N, 3] and `span` [N] are the part's box corner and
    largest extent (isotropic: no stretch). The in-plane axis flips with the sign so that no side shows its
    image mirrored from outside: +X: u=y, -X: u=-y; +Y: u=-x, -Y: u=x; +Z: u=x, -Z: u=-x; v is the
    remaining axis, up in the image. A margin of 1/64 of the tile keeps texture filtering inside it.
    Returns UVs [N, 2] in glTF's image convention (v down).
    """
    p = (points - lo) / span[:, None]
    rows = np.arange(len(p))
    u = p[rows, np.array([1, 0, 0])[axis]]
    v = p[rows, np.array([2, 2, 1])[axis]]
    u = np.where(np.where(axis == 1, -sign, sign) > 0, u, 1 - u)
    u0, v0, side = tile[:, 0], tile[:, 1], tile[:, 2]
    margin = side / 64
    scale = side - 2 * margin
    return np.stack([u0 + margin + np.clip(u, 0, 1) * scale, v0 + margin + (1 - np.clip(v, 0, 1)) * scale], -1)


@dataclass
class Frames:
    """Per part: placement (x = R p + t), box corner and largest extent in its frame, and its material's tile."""

    rotation: np.ndarray  # [P, 3, 3]
    translation: np.ndarray  # [P, 3]
    lo: np.ndarray  # [P, 3]
    span: np.ndarray  # [P]
    tile: np.ndarray  # [P, 3]

    @classmethod
    def of(cls, recipe: Recipe, tiles: list[Tile], boxes: dict[int, np.ndarray]) -> Frames:
        """`boxes[i]`: part i's bounding box [6] in its frame as built (a displaced or wire-frame part
        reaches past its recipe extents); parts without one use their recipe extents."""
        parts = recipe.parts
        size = np.array([p.size for p in parts], float)
        lo, hi = -size / 2, size / 2
        for i, b in boxes.items():
            lo[i], hi[i] = b[:3], b[3:]
        return cls(rotation=np.array([p.rotation for p in parts], float).reshape(-1, 3, 3),
                   translation=np.array([p.position for p in parts], float), lo=lo,
                   span=np.maximum((hi - lo).max(1), 1e-12), tile=np.array([tiles[p.material] for p in parts], float))

    def local(self, x: np.ndarray, part: np.ndarray) -> np.ndarray:
        """Object-frame points [N, 3] in the frames of their parts [N]: p = R^T (x - t)."""
        return np.einsum("nj,njk->nk", x - self.translation[part], self.rotation[part])


def textured(pos: np.ndarray, nrm: np.ndarray, tri: np.ndarray, face_part: np.ndarray,
             frames: Frames) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Give every corner its part's cube projection: (positions, normals, uvs, faces) with a vertex per
    (input vertex, part, projection plane) used, so seams split vertices and nothing else does."""
    n_parts = len(frames.span)
    local = frames.local(pos[tri].reshape(-1, 3), np.repeat(face_part, 3)).reshape(-1, 3, 3)
    axis, sign = _face_axes(local)
    plane = face_part * 6 + 2 * axis + (sign > 0)
    uniq, inverse = np.unique(tri * (6 * n_parts) + plane[:, None], return_inverse=True)
    vert, rest = uniq // (6 * n_parts), uniq % (6 * n_parts)
    part, plane = rest // 6, rest % 6
    p_local = frames.local(pos[vert], part)
    uv = project(p_local, plane // 2, np.where(plane % 2 == 1, 1, -1), frames.lo[part], frames.span[part],
                 frames.tile[part])
    return pos[vert], nrm[vert], uv, inverse.reshape(-1, 3)


# ---------------------------------------------------------------------------------------------- parts


def _ok(man: m3d.Manifold) -> bool:
    return man.status() == m3d.Error.NoError and not man.is_empty()


def _why(man: m3d.Manifold) -> str:
    """manifold3d's reason for a result that is no solid: its error status, or `empty`."""
    return "empty" if man.status() == m3d.Error.NoError else man.status().name


def solid_part(part: Part, rng: np.random.Generator, log: Log, i: int) -> m3d.Manifold:
    """One solid part in its own frame: the primitive, its cut (undone if it fails or leaves too little) and
    its displacement (undone if it fails). A primitive that is no solid is returned as it is (its status
    says why) and the caller keeps it as a shell."""
    man = primitive(part.kind, np.asarray(part.size), part.segments, part.shape)
    if not _ok(man):
        return man
    if part.cut is not None:
        c = part.cut
        cutter = primitive(c.kind, np.asarray(c.size), 24, 0.5).transform(
            affine_3x4(np.asarray(c.rotation).reshape(3, 3), c.offset))
        cut = man - cutter
        if not _ok(cut) or cut.volume() < MIN_KEPT_VOLUME * man.volume():
            kept = cut.volume() / max(man.volume(), 1e-12) if _ok(cut) else 0.0
            what = "hole" if c.through else "cut"
            log.undo(i, what, f"{what} by a {c.kind} left {kept:.0%} of the {part.kind}; kept uncut")
        else:
            man = cut
    if part.displacement:
        shaped = displace(man, part, rng)
        if _ok(shaped):
            man = shaped
        else:
            log.undo(i, part.displacement, f"{part.displacement} displacement failed ({_why(shaped)}); kept flat")
    return man


PartFn = Callable[[Part, np.random.Generator, Log, int], m3d.Manifold]


def build(recipe: Recipe, tiles: list[Tile], part_fn: PartFn = solid_part) -> Geometry:
    """All parts of `recipe`, unioned, textured by `tiles[material]`, centred and scaled to a largest side of 1.

    Wire-frames are built last: their beam diameter is a fraction of the size of everything else. Raises
    ProceduralError (with the reason) when nothing could be built or the union fails.
    """
    log = Log()
    placed: list[m3d.Manifold] = []
    owner: dict[int, int] = {}  # manifold3d original id -> part index
    boxes: dict[int, np.ndarray] = {}  # part index -> its bounding box in its own frame, as built
    shells: list[tuple[np.ndarray, int]] = []  # (triangles [F, 3, 3] in the object frame, part index)

    def place(man: m3d.Manifold, i: int) -> None:
        part = recipe.parts[i]
        orig = man.as_original()
        owner[orig.original_id()] = i
        boxes[i] = np.asarray(orig.bounding_box(), float)
        placed.append(orig.transform(affine_3x4(np.asarray(part.rotation).reshape(3, 3), part.position)))

    for i, part in enumerate(recipe.parts):
        if part.wire:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, recipe.index, 2, i]))
        man = part_fn(part, rng, log, i)
        if _ok(man):
            place(man, i)
            continue
        shell = _shell(part)
        kept = "kept as a shell, uncut and flat" if shell is not None else "left out"
        log.undo(i, "solid", f"{part.kind} is not a closed 2-manifold ({_why(man)}); {kept}")
        if shell is not None:
            shells.append((shell, i))
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for man in placed:
        b = np.asarray(man.bounding_box(), float)
        lo, hi = np.minimum(lo, b[:3]), np.maximum(hi, b[3:])
    for tri, _ in shells:
        lo, hi = np.minimum(lo, tri.reshape(-1, 3).min(0)), np.maximum(hi, tri.reshape(-1, 3).max(0))
    for part in recipe.parts:  # wire-frames: their boxes count towards the object's size
        if part.wire:
            corners = (polyhedron_points("box", 0) * np.asarray(part.size)) @ np.asarray(part.rotation).reshape(3, 3).T
            lo, hi = np.minimum(lo, (corners + part.position).min(0)), np.maximum(hi, (corners + part.position).max(0))
    object_size = float((hi - lo).max())
    for i, part in enumerate(recipe.parts):
        if part.wire:
            rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, recipe.index, 2, i]))
            frame = wire_frame(part, 0.5 * part.wire * object_size, 4 + part.segments % 2, rng)
            if _ok(frame):
                place(frame, i)
            else:
                log.undo(i, "wire", f"wire-frame of a {part.kind} failed ({_why(frame)}); left out")
    return _assemble(recipe, Frames.of(recipe, tiles, boxes), placed, owner, shells, log)


def _shell(part: Part) -> np.ndarray | None:
    """The primitive's triangles [F, 3, 3] placed in the object frame, when it has any."""
    vp, tri = manifold_arrays(primitive(part.kind, np.asarray(part.size), part.segments, part.shape))
    if len(tri) == 0:
        return None
    t = vp[:, :3][tri]
    return t @ np.asarray(part.rotation).reshape(3, 3).T + np.asarray(part.position)


def _assemble(recipe: Recipe, frames: Frames, placed: list[m3d.Manifold], owner: dict[int, int],
              shells: list[tuple[np.ndarray, int]], log: Log) -> Geometry:
    """Union the placed parts, add the shells, project UVs; centre and scale to a largest side of 1."""
    if not placed and not shells:
        raise ProceduralError("no part could be built: " + ("; ".join(log.fallbacks) or "empty recipe"))
    out: list[tuple[np.ndarray, ...]] = []
    components, genus = 0, 0
    if placed:
        union = m3d.Manifold.batch_boolean(placed, m3d.OpType.Add)
        if not _ok(union):
            raise ProceduralError(f"union of {len(placed)} parts failed ({_why(union)})")
        if any(p.wire for p in recipe.parts):
            # Collapse the slivers where beams meet beams and parts: vertices closer than float32 keeps apart
            # would be one position in the file while the topology says two (not watertight when read back).
            # Without beams they are rare enough for `open_edges` below to record instead.
            b = np.asarray(union.bounding_box(), float)
            union = union.simplify(SLIVER * float((b[3:] - b[:3]).max()))
        mesh = union.calculate_normals(0, SHARP_DEG).to_mesh()
        vp = np.asarray(mesh.vert_properties, np.float64)  # x y z nx ny nz
        tri = np.asarray(mesh.tri_verts).astype(np.int64)
        runs = np.diff(np.asarray(mesh.run_index).astype(np.int64)) // 3
        face_part = np.repeat([owner[int(o)] for o in np.asarray(mesh.run_original_id)], runs)
        out.append(textured(vp[:, :3], vp[:, 3:6], tri, face_part, frames) + (face_part,))
        pieces = union.decompose()
        components = len(pieces)
        genus = int(sum(max(0, p.genus()) for p in pieces))
    for t, i in shells:  # plain triangles: flat normals, no shared corners
        n = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
        tri = np.arange(3 * len(t)).reshape(-1, 3)
        face_part = np.full(len(t), i)
        out.append(textured(t.reshape(-1, 3), np.repeat(n, 3, 0), tri, face_part, frames) + (face_part,))
        components += 1
    offsets = np.cumsum([0] + [len(o[0]) for o in out[:-1]])
    p = np.concatenate([o[0] for o in out])
    if not np.isfinite(p).all():
        raise ProceduralError("the built asset has non-finite vertices: " + ("; ".join(log.fallbacks) or "union"))
    lo, hi = p.min(0), p.max(0)
    side = float((hi - lo).max())
    if not side > 1e-9:
        raise ProceduralError("the built asset has a zero-size bounding box")
    n = np.concatenate([o[1] for o in out])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    material = np.array([q.material for q in recipe.parts], np.int64)
    positions = ((p - (lo + hi) / 2) / side).astype(np.float32)
    faces = np.concatenate([o[3] + k for o, k in zip(out, offsets)]).astype(np.uint32)
    watertight = not shells
    if watertight:  # what a reader welding the written positions sees, not only manifold3d's topology
        bad = open_edges(positions, faces)
        if bad:
            watertight = False
            log.fallbacks.append(f"{bad} edge{'s are' if bad > 1 else ' is'} not shared by exactly two faces once "
                                 "written (vertices of two surfaces at one float32 position): not watertight")
    return Geometry(positions=positions, normals=n.astype(np.float32),
                    uvs=np.concatenate([o[2] for o in out]).astype(np.float32), faces=faces,
                    face_material=material[np.concatenate([o[4] for o in out])], watertight=watertight,
                    components=components, genus=genus, fallbacks=log.fallbacks, undone=log.undone)


def open_edges(positions: np.ndarray, faces: np.ndarray) -> int:
    """Edges not shared by exactly two faces once corners at the same (exact) position are welded."""
    _, weld = np.unique(np.ascontiguousarray(positions).view(np.dtype((np.void, 12))).ravel(), return_inverse=True)
    f = weld.reshape(-1)[faces.astype(np.int64)]
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)
    _, counts = np.unique(e[:, 0] * (int(weld.max()) + 1) + e[:, 1], return_counts=True)
    return int((counts != 2).sum())

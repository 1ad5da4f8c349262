"""Textured mesh export: quadric decimation, xatlas UV unwrap, a texture baked from a colour function at the
surface, GLB out.

The mesh comes out of marching cubes in the canonical normalised frame (docs/CONTRACTS.md: Z up, the asset inside
[-0.5, 0.5]^3). glTF is Y up, so the GLB stores every position as

    p_gltf = (x, z, -y)          for p = (x, y, z) in our frame (a proper rotation, det +1)

which is exactly the inverse of what Blender's glTF importer does on import ((X, Y, Z)_gltf -> (X, -Z, Y)),
so importing `mesh.glb` into Blender puts the asset back where it was rendered from, and any glTF viewer
shows it upright. `load_glb` undoes the rotation for readers in Python (trimesh itself keeps glTF's axes).

Speed: a marching-cubes mesh has far more faces than its shape needs (250 k at 256³), and xatlas's chart
growing costs more than linearly in the faces of a chart. So the mesh is first decimated by quadric edge
collapse (`fast-simplification`, MIT) to at most `max_faces` (`refine.export_faces`), and charts are capped
at about `FACES_PER_CHART` faces' worth of area; the colour detail lives in the baked texture, not in the
vertices, so the re-rendered textured mesh loses almost nothing (tests/training/test_export.py holds it
against a dense vertex-coloured mesh on an analytic sphere; docs/benchmarks.md has the times).

Texture: the colour function (f_c at the surface points) gives colours in the 8-bit sRGB-encoded space of
the training images; the baked PNG stores those values directly, which is what glTF's sRGB baseColorTexture
expects. Texels are baked at their centres: for every texel whose centre falls inside a UV triangle, the 3D
point is the barycentric interpolation of that triangle's corners; empty texels are filled with the nearest
baked texel so that bilinear lookups across chart borders (seams) do not bleed in background colour.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.io import atomic_write_bytes
from training.cameras import ZUP_TO_YUP

# Rows of the rotation our frame -> glTF's frame (Y up): (x, y, z) -> (x, z, -y). The same axis change as
# into the released model's frame, so it is that one matrix (training.cameras.ZUP_TO_YUP), as float64 numpy.
CANONICAL_TO_GLTF = ZUP_TO_YUP.double().numpy().copy()
CANONICAL_TO_GLTF.setflags(write=False)

# A colour function: points [N,3] float32 (canonical frame) -> colours [N,3] in [0,1] (anything array-like).
ColorFn = Callable[[np.ndarray], np.ndarray]


class ExportError(ValueError):
    """A mesh that cannot be exported (empty, bad indices, non-finite positions)."""


def to_gltf_frame(points: np.ndarray) -> np.ndarray:
    """Canonical (Z-up) points [...,3] -> glTF (Y-up) points [...,3]."""
    return np.asarray(points, dtype=np.float64) @ CANONICAL_TO_GLTF.T


def from_gltf_frame(points: np.ndarray) -> np.ndarray:
    """glTF (Y-up) points [...,3] -> canonical (Z-up) points [...,3]."""
    return np.asarray(points, dtype=np.float64) @ CANONICAL_TO_GLTF


def check_mesh(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and cast a triangle mesh: verts [N,3] float32, faces [F,3] int32."""
    verts = np.asarray(verts, dtype=np.float32)
    faces = np.asarray(faces)
    if verts.ndim != 2 or verts.shape[1] != 3 or len(verts) == 0:
        raise ExportError(f"vertices must be a non-empty [N,3] array, got shape {verts.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ExportError(f"faces must be a non-empty [F,3] array, got shape {faces.shape} (empty mesh?)")
    if not np.isfinite(verts).all():
        raise ExportError("vertices contain NaN or inf")
    if faces.min() < 0 or faces.max() >= len(verts):
        raise ExportError(f"face indices out of range [0, {len(verts)})")
    return verts, faces.astype(np.int32)


@dataclass
class UVMesh:
    """A mesh cut along its UV seams: vertex i of the cut mesh is `verts[vmap[i]]` of the input."""

    verts: np.ndarray  # [M,3] float32, canonical frame
    faces: np.ndarray  # [F,3] int32 into the cut vertices
    uv: np.ndarray  # [M,2] float32 in [0,1], v up (OpenGL / trimesh convention; glTF export flips it)
    vmap: np.ndarray  # [M] int64 index of each cut vertex in the input vertices


def decimate(verts: np.ndarray, faces: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation to at most `max_faces` faces (0 = keep the mesh as it is).

    verts [N,3], faces [F,3] -> verts [M,3] float32, faces [<=max_faces,3] int32, with unreferenced vertices
    and collapsed (zero-area index) triangles removed. A mesh already small enough comes back unchanged.
    """
    verts, faces = check_mesh(verts, faces)
    if max_faces <= 0 or len(faces) <= max_faces:
        return verts, faces
    import fast_simplification

    v, f = fast_simplification.simplify(verts, faces, target_count=int(max_faces))
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    used, f = np.unique(f.reshape(-1), return_inverse=True)
    return np.asarray(v, dtype=np.float32)[used], f.reshape(-1, 3).astype(np.int32)


FACES_PER_CHART = 100  # chart area cap, in faces' worth of the mesh's mean face area: xatlas's chart growing
# is superlinear in chart size (20 k faces: 11 s uncapped, 1.0 s at ~100 faces per chart; same atlas use)
MAX_CHART_COST = 4.0  # xatlas's chart-growing cost bound (its default 2): on the demo's fragmented meshes (300+
# components, 20 k faces) the unwrap takes 1.17 s instead of 2.12 s, with the same texture error against the
# colour function (docs/benchmarks.md, "Export"); fewer, slightly less planar charts


def uv_unwrap(verts: np.ndarray, faces: np.ndarray, texture_size: int = 1024, padding: int = 2,
              faces_per_chart: int = FACES_PER_CHART, chart_cost: float = MAX_CHART_COST) -> UVMesh:
    """xatlas charts packed into a `texture_size`² atlas with `padding` texels between charts; each chart
    covers at most about `faces_per_chart` mean faces of area (0 = no cap, xatlas's default) and grows while
    its distortion cost stays below `chart_cost` (xatlas's `max_cost`)."""
    import xatlas

    verts, faces = check_mesh(verts, faces)
    atlas = xatlas.Atlas()
    atlas.add_mesh(verts, faces)
    charts = xatlas.ChartOptions()
    charts.max_cost = float(chart_cost)
    if faces_per_chart > 0:
        e1, e2 = verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]]
        area = 0.5 * float(np.linalg.norm(np.cross(e1, e2), axis=1).sum())
        charts.max_chart_area = area * min(1.0, faces_per_chart / len(faces))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True  # keep a texel of gap so bilinear lookups stay inside a chart
    atlas.generate(charts, pack)
    vmap, new_faces, uv = atlas[0]
    return UVMesh(verts=verts[vmap], faces=new_faces.astype(np.int32), uv=uv.astype(np.float32),
                  vmap=vmap.astype(np.int64))


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int,
                 max_candidates: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Which UV triangle covers each texel centre, and where.

    uv [M,2] in [0,1] (v up), faces [F,3]. Texel (row r, column c) has its centre at
    u = (c + 0.5) / size, v = 1 - (r + 0.5) / size (row 0 is the top of the image, v = 1).
    Returns face_id [size,size] int64 (-1 = no triangle) and bary [size,size,3] float32.
    Vectorised over each triangle's texel bounding box, in chunks of at most `max_candidates` texels.
    """
    S = int(size)
    px = np.empty((len(uv), 2), dtype=np.float64)
    px[:, 0] = uv[:, 0] * S - 0.5  # texel-centre coordinates: centre of column c sits at c
    px[:, 1] = (1.0 - uv[:, 1]) * S - 0.5
    tri = px[faces]  # [F,3,2]
    lo = np.clip(np.ceil(tri.min(axis=1)), 0, S - 1).astype(np.int64)  # [F,2]
    hi = np.clip(np.floor(tri.max(axis=1)), 0, S - 1).astype(np.int64)
    w = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0)
    h = np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    inside_box = (tri.max(axis=1) >= 0).all(1) & (tri.min(axis=1) <= S - 1).all(1)
    count = np.where(inside_box, w * h, 0)

    face_id = np.full((S, S), -1, dtype=np.int64)
    bary = np.zeros((S, S, 3), dtype=np.float32)
    cum = np.cumsum(count)
    start = 0
    while start < len(faces):
        base = cum[start - 1] if start > 0 else 0
        stop = int(np.searchsorted(cum, base + max_candidates, side="right"))
        stop = max(stop, start + 1)
        f = np.arange(start, stop)
        n = count[f]
        fi = np.repeat(f, n)
        if len(fi):
            k = np.arange(len(fi)) - np.repeat(np.cumsum(n) - n, n)
            cx = lo[fi, 0] + k % w[fi]
            cy = lo[fi, 1] + k // w[fi]
            a, b, c = tri[fi, 0], tri[fi, 1], tri[fi, 2]
            # Barycentrics by signed areas; a triangle of zero area covers nothing.
            area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
            ok = np.abs(area) > 1e-12
            safe = np.where(ok, area, 1.0)
            l1 = ((c[:, 0] - b[:, 0]) * (cy - b[:, 1]) - (c[:, 1] - b[:, 1]) * (cx - b[:, 0])) / safe
            l2 = ((a[:, 0] - c[:, 0]) * (cy - c[:, 1]) - (a[:, 1] - c[:, 1]) * (cx - c[:, 0])) / safe
            l3 = 1.0 - l1 - l2
            eps = -1e-6  # texel centres exactly on a shared edge belong to either triangle
            hit = ok & (l1 >= eps) & (l2 >= eps) & (l3 >= eps)
            face_id[cy[hit], cx[hit]] = fi[hit]
            bary[cy[hit], cx[hit]] = np.stack([l1[hit], l2[hit], l3[hit]], axis=1)
        start = stop
    return face_id, bary


def fill_empty(image: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Copy the nearest filled texel into every empty one (seam padding). image [S,S,C], filled [S,S] bool."""
    from scipy.ndimage import distance_transform_edt

    if filled.all() or not filled.any():
        return image
    _, (iy, ix) = distance_transform_edt(~filled, return_indices=True)
    return image[iy, ix]


def query_colors(color_fn: ColorFn, points: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """color_fn over points [N,3] in chunks -> float32 [N,3] clipped to [0,1]."""
    out = np.empty((len(points), 3), dtype=np.float32)
    for s in range(0, len(points), chunk):
        c = color_fn(points[s:s + chunk].astype(np.float32))
        c = c.detach().cpu().numpy() if hasattr(c, "detach") else np.asarray(c)
        if c.shape != (min(chunk, len(points) - s), 3):
            raise ExportError(f"colour function returned shape {c.shape} for {min(chunk, len(points) - s)} points")
        out[s:s + chunk] = c
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


def bake_texture(uvmesh: UVMesh, color_fn: ColorFn, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Texture [size,size,3] uint8 (row 0 = v 1) with colour_fn at each covered texel's 3D point.

    Returns the padded texture and the coverage mask [size,size] bool (before padding).
    """
    face_id, bary = rasterize_uv(uvmesh.uv, uvmesh.faces, size)
    filled = face_id >= 0
    tex = np.zeros((size, size, 3), dtype=np.float32)
    if filled.any():
        corners = uvmesh.verts[uvmesh.faces[face_id[filled]]].astype(np.float64)  # [T,3,3]
        points = np.einsum("tk,tkd->td", bary[filled].astype(np.float64), corners)
        tex[filled] = query_colors(color_fn, points)
    tex = fill_empty(tex, filled)
    return np.round(tex * 255.0).astype(np.uint8), filled


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [N,3] of counter-clockwise faces (+Z for a vertex no face touches)."""
    v = np.asarray(verts, dtype=np.float64)
    n = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])  # [F,3], length = 2 area
    out = np.zeros_like(v)
    for k in range(3):
        np.add.at(out, faces[:, k], n)
    length = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(length > 0, out / np.maximum(length, 1e-30), [0.0, 0.0, 1.0])


def glb_bytes(verts: np.ndarray, faces: np.ndarray, uv: np.ndarray | None = None,
              texture: np.ndarray | None = None, vertex_colors: np.ndarray | None = None,
              normals: np.ndarray | None = None) -> bytes:
    """A GLB of one mesh (canonical-frame verts [N,3], faces [F,3]) in glTF's Y-up frame.

    Either `uv` [N,2] (v up) + `texture` [S,S,3] uint8 (PBR baseColorTexture, metallic 0, roughness 1),
    or `vertex_colors` [N,3] in [0,1] (COLOR_0, with a plain white material), or neither. `normals` [N,3]
    (canonical frame; default: `vertex_normals` of this mesh) make viewers shade it smooth instead of
    faceted (glTF's rule without NORMAL).
    """
    import trimesh
    from PIL import Image

    verts, faces = check_mesh(verts, faces)
    pos = to_gltf_frame(verts).astype(np.float32)
    nrm = to_gltf_frame(vertex_normals(verts, faces) if normals is None else normals).astype(np.float32)
    if uv is not None and texture is not None:
        material = trimesh.visual.material.PBRMaterial(
            name="baked", baseColorTexture=Image.fromarray(np.ascontiguousarray(texture)),
            metallicFactor=0.0, roughnessFactor=1.0, doubleSided=True)
        visual = trimesh.visual.TextureVisuals(uv=np.asarray(uv, dtype=np.float64), material=material)
        mesh = trimesh.Trimesh(pos, faces, visual=visual, vertex_normals=nrm, process=False)
    elif vertex_colors is not None:
        vc = np.round(np.clip(np.asarray(vertex_colors, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
        rgba = np.concatenate([vc, np.full((len(vc), 1), 255, np.uint8)], axis=1)
        mesh = trimesh.Trimesh(pos, faces, vertex_colors=rgba, vertex_normals=nrm, process=False)
    else:
        mesh = trimesh.Trimesh(pos, faces, vertex_normals=nrm, process=False)
    return mesh.export(file_type="glb", include_normals=True)


@dataclass
class ExportInfo:
    """What `export_glb` wrote: paths and sizes, for the run's timings/summary JSON."""

    path: str
    vertices: int  # after the UV cut (seam vertices duplicated)
    faces: int  # after decimation
    texture_size: int
    coverage: float  # fraction of texels inside a UV triangle
    vertex_color_path: str = ""
    input_faces: int = 0  # of the mesh given (before decimation)
    seconds: dict[str, float] = field(default_factory=dict)  # decimate, unwrap, bake, write


def export_glb(path: str | Path, verts: np.ndarray, faces: np.ndarray, color_fn: ColorFn,
               texture_size: int = 1024, vertex_colors: bool = False, texture_png: bool = True,
               max_faces: int = 20_000, chart_cost: float = MAX_CHART_COST) -> ExportInfo:
    """Decimate to `max_faces` (0 = keep all), unwrap (`chart_cost`: `uv_unwrap`), bake and write `path`
    (GLB with a UV texture) atomically; optionally `<stem>_vc.glb` too (the full mesh, colours at its vertices).

    The vertex-colour variant is a separate file because glTF multiplies COLOR_0 into the base colour, so
    one file with both would darken the texture. With `texture_png` the texture is also written beside the
    GLB as `<stem>_texture.png` (for looking at it).
    """
    path = Path(path)
    verts, faces = check_mesh(verts, faces)
    t = [time.perf_counter()]

    def lap() -> float:
        t.append(time.perf_counter())
        return round(t[-1] - t[-2], 4)

    low_v, low_f = decimate(verts, faces, max_faces)
    seconds = {"decimate": lap()}
    uvmesh = uv_unwrap(low_v, low_f, texture_size, chart_cost=chart_cost)
    seconds["unwrap"] = lap()
    texture, filled = bake_texture(uvmesh, color_fn, texture_size)
    seconds["bake"] = lap()
    normals = vertex_normals(low_v, low_f)[uvmesh.vmap]  # of the uncut mesh: no shading seam along UV cuts
    atomic_write_bytes(path, glb_bytes(uvmesh.verts, uvmesh.faces, uv=uvmesh.uv, texture=texture, normals=normals))
    if texture_png:
        atomic_write_bytes(path.with_name(f"{path.stem}_texture.png"), _png(texture))
    seconds["write"] = lap()
    info = ExportInfo(path=str(path), vertices=len(uvmesh.verts), faces=len(uvmesh.faces),
                      texture_size=int(texture_size), coverage=float(filled.mean()), input_faces=len(faces),
                      seconds=seconds)
    if vertex_colors:
        vc_path = path.with_name(f"{path.stem}_vc.glb")
        colors = query_colors(color_fn, verts)
        atomic_write_bytes(vc_path, glb_bytes(verts, faces, vertex_colors=colors))
        info.vertex_color_path = str(vc_path)
    return info


def load_glb(path: str | Path):
    """Read a GLB written here back as one `trimesh.Trimesh` in the canonical (Z-up) frame."""
    import trimesh

    scene = trimesh.load(str(path), file_type="glb", force="scene", process=False)
    meshes = list(scene.dump(concatenate=False)) if hasattr(scene, "dump") else [scene]
    if len(meshes) != 1:
        raise ExportError(f"{path}: expected one mesh, found {len(meshes)}")
    mesh = meshes[0]
    mesh.vertices = from_gltf_frame(mesh.vertices)
    return mesh

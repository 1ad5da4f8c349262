"""The Blender scene of one asset: reset, import by format, bounds, normalisation and texture checks.

Untrusted files stay data: Python auto-execution is off and .blend files are appended datablock by
datablock (never opened as a main file), refused when they carry scripts. Per-asset problems raise
`RenderError`, whose message becomes the manifest reason. bpy is imported on first use.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from core.config import RenderConfig
from render.files import count_nonfinite_vertices, header_size

GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "FONT", "META"}
FORMATS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".fbx", ".blend")


class RenderError(Exception):
    """A per-asset problem; its message becomes the `reason` of a failed row."""


def _blender_scripts_path(entry: str) -> bool:
    parts = Path(entry).parts
    return "scripts" in parts and ("bpy" in parts or "blender" in parts)


def bpy_module() -> Any:
    """The bpy module, imported on first use so that importing the renderer (e.g. for FORMATS) costs nothing.

    A spawned worker process starts with its parent's sys.path; if the parent had imported bpy, that holds
    Blender's scripts folders, whose pure-Python `bpy` package would shadow the wheel's and fail (no module
    `_bpy`). Those entries are dropped before the first import; the wheel adds them back itself.
    """
    if "bpy" not in sys.modules:
        sys.path[:] = [p for p in sys.path if not _blender_scripts_path(p)]
    import bpy

    return bpy


# ----------------------------------------------------------------------------------------------------------
# Scene reset and import
# ----------------------------------------------------------------------------------------------------------


def reset_scene() -> None:
    """Back to factory settings with an empty scene; drops every datablock of the previous asset."""
    bpy = bpy_module()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    # Factory settings restore the preferences too; auto-execution must stay off for every asset.
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    bpy.data.orphans_purge(do_local_ids=True, do_linked_ids=True, do_recursive=True)


def datablock_counts() -> dict[str, int]:
    """Number of datablocks per bpy.data collection (to prove that a reset leaks nothing)."""
    bpy = bpy_module()
    out = {}
    for name in dir(bpy.data):
        coll = getattr(bpy.data, name, None)
        if type(coll).__name__ == "bpy_prop_collection":
            out[name] = len(coll)
    return out


def _import_blend(path: Path) -> None:
    """Append objects of a .blend into the current scene without ever running its scripts."""
    bpy = bpy_module()
    with bpy.data.libraries.load(str(path), link=False) as (src, dst):
        if len(src.texts):
            raise RenderError(f".blend holds {len(src.texts)} Python text block(s); refused, nothing executed")
        dst.objects = list(src.objects)
    for obj in dst.objects:
        if obj is not None:
            bpy.context.scene.collection.objects.link(obj)


def import_asset(path: str | Path, fmt: str | None = None) -> None:
    """Import a file into the (reset) scene with Blender's importer for its format."""
    bpy = bpy_module()
    path = Path(path)
    ext = ("." + fmt.lower().lstrip(".")) if fmt else path.suffix.lower()
    if ext not in FORMATS:
        raise RenderError(f"unsupported format '{ext}' (supported: {', '.join(FORMATS)})")
    if not path.is_file():
        raise RenderError(f"not a regular file: {path}")
    p = str(path)
    try:
        if ext in (".glb", ".gltf"):
            bpy.ops.import_scene.gltf(filepath=p)
        elif ext == ".obj":
            bpy.ops.wm.obj_import(filepath=p)  # Y-up file -> Blender Z-up; MTL and map_Kd textures load
        elif ext == ".ply":
            bpy.ops.wm.ply_import(filepath=p)
        elif ext == ".stl":
            bpy.ops.wm.stl_import(filepath=p)
        elif ext == ".fbx":
            bpy.ops.import_scene.fbx(filepath=p)
        else:
            _import_blend(path)
    except RenderError:
        raise
    except Exception as e:  # importers raise RuntimeError with Blender's report text
        msg = str(e).strip().splitlines()
        raise RenderError(f"import failed ({ext}): {msg[-1] if msg else type(e).__name__}") from None


def _match_viewport_to_render() -> None:
    """Make the viewport depsgraph (the one Python can read) evaluate what the render evaluates."""
    bpy = bpy_module()
    for obj in bpy.data.objects:
        obj.hide_viewport = obj.hide_render
        for mod in obj.modifiers:
            mod.show_viewport = mod.show_render
            if mod.type == "SUBSURF":
                mod.levels = mod.render_levels
            elif mod.type == "MULTIRES":
                mod.levels = mod.render_levels
    bpy.context.view_layer.update()


def raw_face_count() -> int:
    """Polygons of all mesh datablocks before evaluation: a cheap early bound on work."""
    bpy = bpy_module()
    return sum(len(m.polygons) for m in bpy.data.meshes)


def scene_geometry(max_triangles: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The evaluated, triangulated scene in world coordinates: vertices [N,3] float64, faces [F,3] int64.

    Covers every geometry object and instance after modifiers and parent transforms (what Cycles renders).
    """
    bpy = bpy_module()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    verts, faces, offset, n_tris = [], [], 0, 0
    for inst in depsgraph.object_instances:
        obj = inst.object
        if obj.type not in GEOMETRY_TYPES:
            continue
        mesh = obj.to_mesh()
        try:
            mesh.calc_loop_triangles()
            nv, nt = len(mesh.vertices), len(mesh.loop_triangles)
            n_tris += nt
            if max_triangles is not None and n_tris > max_triangles:
                raise RenderError(f"too many faces: more than {max_triangles} triangles")
            if nv == 0 or nt == 0:
                continue
            co = np.empty(nv * 3, np.float64)
            mesh.vertices.foreach_get("co", co)
            tri = np.empty(nt * 3, np.int64)
            mesh.loop_triangles.foreach_get("vertices", tri)
        finally:
            obj.to_mesh_clear()
        m = np.array(inst.matrix_world, dtype=np.float64)
        co = co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
        verts.append(co)
        faces.append(tri.reshape(-1, 3) + offset)
        offset += nv
    if not verts:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    return np.concatenate(verts), np.concatenate(faces)


def normalise_scene() -> tuple[np.ndarray, float]:
    """Centre the scene on its bounding-box centre and scale its largest side to 1 (docs/CONTRACTS.md).

    The box covers all geometry of all roots after every parent transform. Returns (center [3], scale) with
    p_normalised = scale * (p_imported - center); the transform is applied to every root object.
    """
    bpy = bpy_module()
    from mathutils import Matrix

    v, f = scene_geometry()
    if len(f) == 0:
        raise RenderError("empty scene: no renderable faces after import")
    if not np.isfinite(v).all():
        raise RenderError(f"non-finite vertex coordinates ({int((~np.isfinite(v)).any(1).sum())} vertices)")
    lo, hi = v.min(0), v.max(0)
    side = float((hi - lo).max())
    if not side > 1e-12:
        raise RenderError("degenerate scene: zero-size bounding box")
    center, scale = (lo + hi) / 2.0, 1.0 / side
    T = Matrix.Diagonal((scale, scale, scale, 1.0)) @ Matrix.Translation(tuple(-center))
    for obj in bpy.context.scene.objects:
        if obj.parent is None:
            obj.matrix_world = T @ obj.matrix_world
    bpy.context.view_layer.update()
    return center, scale


def check_textures(max_pixels: int, folder: str | Path | None = None) -> list[str]:
    """Textures that could not be used: not found, unreadable, or (with `folder`) outside `folder`.

    A glTF `uri` or an MTL `map_Kd` can name any file on disk (`/home/u/secret.png`, `../../x.png`);
    Blender would load it. Every file-backed image that is not packed is resolved (symlinks too), and
    one outside `folder` is recorded as missing (`outside the asset folder: <path>`) and removed from the
    scene before anything renders, so no pixel of it reaches the output. Sizes come from the file header
    (PIL) before `img.size`, which decodes the whole image; raises RenderError above `max_pixels`.
    """
    bpy = bpy_module()
    root = Path(folder).resolve() if folder is not None else None
    missing = []
    for img in list(bpy.data.images):  # a copy: outside images are removed while iterating
        if img.source not in ("FILE", "TILED") or img.type not in ("IMAGE", "UV_TEST"):  # UV_TEST: failed load
            continue
        label = img.filepath or img.name
        if img.packed_file is None:
            fp = bpy.path.abspath(img.filepath, library=img.library)
            real = Path(fp).resolve() if fp else None
            if root is not None and real is not None and not real.is_relative_to(root):
                missing.append(f"outside the asset folder: {label}")
                bpy.data.images.remove(img)
                continue
            if real is None or not real.is_file():
                missing.append(label)
                continue
            source: str | bytes = str(real)
        else:
            source = bytes(img.packed_file.data)
        try:
            head = header_size(source)
        except ValueError as e:
            raise RenderError(f"texture '{img.name}': {e}") from None
        if head is not None and head[0] * head[1] > max_pixels:
            raise RenderError(f"texture '{img.name}' is {head[0]}x{head[1]}, above the {max_pixels}-pixel bound")
        w, h = img.size  # decodes the image: only after the header said its size is within bounds
        if w * h == 0:
            missing.append(label)
        elif w * h > max_pixels:
            raise RenderError(f"texture '{img.name}' is {w}x{h}, above the {max_pixels}-pixel bound")
    return missing


def prepare_scene(path: str | Path, fmt: str | None, cfg: RenderConfig, folder: str | Path | None = None,
                  max_file_bytes: int = 0) -> dict[str, Any]:
    """Reset, import, check bounds, normalise. Returns normalisation, geometry and missing textures.

    A file above `max_file_bytes` (data.max_file_bytes; 0 = no bound) fails unopened. Textures outside
    `folder` (default: the file's own folder) are not loaded (`check_textures`)."""
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if max_file_bytes and size > max_file_bytes:
        raise RenderError(f"file is {size} bytes, above the {max_file_bytes}-byte bound")
    ext = ("." + fmt.lower().lstrip(".")) if fmt else Path(path).suffix.lower()
    bad = count_nonfinite_vertices(path, ext) if Path(path).is_file() else 0
    if bad:
        raise RenderError(f"non-finite vertex coordinates ({bad} vertices)")
    reset_scene()
    import_asset(path, fmt)
    _match_viewport_to_render()
    faces = raw_face_count()
    if faces > cfg.max_faces:
        raise RenderError(f"too many faces: {faces} > {cfg.max_faces}")
    missing = check_textures(cfg.max_texture_pixels, folder if folder is not None else Path(path).resolve().parent)
    center, scale = normalise_scene()
    v, f = scene_geometry(max_triangles=4 * cfg.max_faces)
    if len(f) > 2 * cfg.max_faces:  # after triangulation (quads count twice)
        raise RenderError(f"too many faces: {len(f)} triangles > {2 * cfg.max_faces}")
    return {"center": center, "scale": scale, "vertices": v.astype(np.float32), "faces": f.astype(np.int32),
            "missing_textures": missing}

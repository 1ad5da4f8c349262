"""The Blender scene of one asset: reset, import by format, bounds, normalisation and texture checks.

Untrusted files stay data. Before Blender opens anything, `render.references` lists every file the asset
may read (inside its folder only) and builds a private sandbox folder holding exactly those; the import
runs from there (working directory too), with the importers' own packing and image search off, and the
sandbox is removed once every image it provided is packed. Sizes are bounded before the work they
bound: texture sizes from their headers (unknown = refused) against a per-texture and a per-asset pixel
budget, glTF/FBX triangles after instancing and subdivision from the file's own counts, then modifiers
before the first evaluation and every instance before it is materialised. Python auto-execution is off
and .blend files are appended datablock by datablock (never opened as a main file), refused when they
carry scripts, link libraries or read cache files. Per-asset problems raise `RenderError`, whose message
becomes the manifest reason. bpy is imported on first use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.config import RenderConfig
from render.files import count_nonfinite_vertices, header_size
from render.references import AssetFiles, ContainmentError, asset_files, build_sandbox

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
    others = [lib.filepath for lib in bpy.data.libraries if Path(bpy.path.abspath(lib.filepath)).resolve() != path.resolve()]
    if others:  # linked data would be read from those files: outside the asset
        raise RenderError(f".blend links {len(others)} other library file(s); refused")
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
            # images stay file-backed (in the sandbox) so check_textures sees where each came from; the
            # default packs them at import, before any check
            bpy.ops.import_scene.gltf(filepath=p, import_pack_images=False)
        elif ext == ".obj":
            bpy.ops.wm.obj_import(filepath=p)  # Y-up file -> Blender Z-up; MTL and map_Kd textures load
        elif ext == ".ply":
            bpy.ops.wm.ply_import(filepath=p)
        elif ext == ".stl":
            bpy.ops.wm.stl_import(filepath=p)
        elif ext == ".fbx":
            # no recursive search for textures through the file's folder (and everything below it)
            bpy.ops.import_scene.fbx(filepath=p, use_image_search=False)
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


# Modifiers whose output has no more faces than their input (deformers, cleanups); anything else that is not
# bounded below (geometry nodes, particles, remesh, screw, skin, boolean, caches that read other files, ...)
# is refused before the first evaluation could materialise it.
_SAME_FACES = {"ARMATURE", "TRIANGULATE", "DECIMATE", "WELD", "EDGE_SPLIT", "WEIGHTED_NORMAL", "NORMAL_EDIT",
               "DATA_TRANSFER", "SMOOTH", "LAPLACIANSMOOTH", "CORRECTIVE_SMOOTH", "DISPLACE", "CAST", "WAVE",
               "SIMPLE_DEFORM", "HOOK", "LATTICE", "CURVE", "SHRINKWRAP", "MESH_DEFORM", "SURFACE_DEFORM",
               "UV_PROJECT", "UV_WARP", "VERTEX_WEIGHT_EDIT", "VERTEX_WEIGHT_MIX", "VERTEX_WEIGHT_PROXIMITY",
               "MASK", "LAPLACIANDEFORM", "WARP"}


def _modifier_factor(obj: Any, mod: Any) -> int:
    """How many times more triangles `mod` can output than it takes in (RenderError if it cannot be bounded)."""
    t = mod.type
    if t in _SAME_FACES:
        return 1
    if t in ("SUBSURF", "MULTIRES"):
        return 4 ** max(0, min(int(mod.render_levels), 32))
    if t == "ARRAY" and mod.fit_type == "FIXED_COUNT":
        return max(1, int(mod.count)) + 2  # + start / end caps
    if t == "MIRROR":
        return 2 ** sum(bool(a) for a in mod.use_axis)
    if t == "SOLIDIFY":
        return 3  # both shells and the rim
    if t == "BEVEL":
        return 4 * (int(mod.segments) + 1) ** 2
    raise RenderError(f"modifier {t} on '{obj.name}': its output cannot be bounded before evaluation; refused")


def estimated_triangles() -> int:
    """An upper bound of the triangles the first evaluation will produce, from the original data only (no
    evaluation): mesh triangles times each render-enabled modifier's factor, per object. Objects that
    instance others (verts / faces / collections, particle systems) are refused: their count is unbounded."""
    bpy = bpy_module()
    total = 0
    for obj in bpy.data.objects:
        if obj.instance_type != "NONE" or len(getattr(obj, "particle_systems", ())):
            raise RenderError(f"object '{obj.name}' instances geometry ({obj.instance_type}); refused")
        if obj.type != "MESH" or obj.data is None:
            continue
        n = max(0, len(obj.data.loops) - 2 * len(obj.data.polygons))  # sum over polygons of (corners - 2)
        for mod in obj.modifiers:
            if mod.show_render:
                n *= _modifier_factor(obj, mod)
        total += n
    return total


def scene_geometry(max_triangles: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The evaluated, triangulated scene in world coordinates: vertices [N,3] float64, faces [F,3] int64.

    Covers every geometry object and instance after modifiers and parent transforms (what Cycles renders).
    With `max_triangles`, a first pass counts the triangles of every evaluated mesh instance without
    copying any (RenderError above the bound), so no instance is materialised past the cap.
    """
    bpy = bpy_module()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    if max_triangles is not None:
        n = 0
        for inst in depsgraph.object_instances:
            data = inst.object.data if inst.object.type == "MESH" else None
            if data is not None:
                n += max(0, len(data.loops) - 2 * len(data.polygons))
                if n > max_triangles:
                    raise RenderError(f"too many faces: more than {max_triangles} triangles after instancing")
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


def normalise_scene(max_triangles: int | None = None) -> tuple[np.ndarray, float]:
    """Centre the scene on its bounding-box centre and scale its largest side to 1 (docs/CONTRACTS.md).

    The box covers all geometry of all roots after every parent transform. Returns (center [3], scale) with
    p_normalised = scale * (p_imported - center); the transform is applied to every root object.
    """
    bpy = bpy_module()
    from mathutils import Matrix

    v, f = scene_geometry(max_triangles)
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


def check_textures(max_pixels: int, folder: str | Path | None = None, max_total_pixels: int = 0) -> list[str]:
    """Textures that could not be used: not found, unreadable, or (with `folder`) outside `folder`.

    Every file-backed image that is not packed is resolved (symlinks too, relative paths from the working
    directory as Blender would); one outside `folder` (the sandbox) is recorded as missing (`outside the
    asset folder: <path>`) and removed from the scene before anything decodes it, and one inside gets its
    absolute path, so no later change of directory can make it name another file. Sizes come from the
    header (render.files.header_size, no pixel decoded) before `img.size`, which decodes the whole image:
    an image whose header names no size is refused, and RenderError is raised above `max_pixels` for one
    texture or above `max_total_pixels` (0 = no bound) for all of them together.
    """
    bpy = bpy_module()
    root = Path(folder).resolve() if folder is not None else None
    missing = []
    total = 0

    def label_of(img: Any, real: Path | None) -> str:
        if real is not None and root is not None and real.is_relative_to(root):
            return real.relative_to(root).as_posix()
        return img.filepath or img.name

    for img in list(bpy.data.images):  # a copy: outside images are removed while iterating
        if img.source not in ("FILE", "TILED") or img.type not in ("IMAGE", "UV_TEST"):  # UV_TEST: failed load
            continue
        if img.packed_file is None:
            fp = bpy.path.abspath(img.filepath, library=img.library)
            real = Path(fp).resolve() if fp else None
            if root is not None and real is not None and not real.is_relative_to(root):
                missing.append(f"outside the asset folder: {img.filepath or img.name}")
                bpy.data.images.remove(img)
                continue
            if real is None or not real.is_file():
                missing.append(label_of(img, real))
                continue
            img.filepath = str(real)
            source: str | bytes = str(real)
        else:
            real = None
            source = bytes(img.packed_file.data)
        total = _count_texture(img.name, source, max_pixels, total, max_total_pixels)
        w, h = img.size  # decodes the image: only after the header said its size is within bounds
        if w * h == 0:
            missing.append(label_of(img, real))
        elif w * h > max_pixels:
            raise RenderError(f"texture '{img.name}' is {w}x{h}, above the {max_pixels}-pixel bound")
    return missing


def _count_texture(label: str, source: str | bytes, max_pixels: int, total: int, max_total_pixels: int) -> int:
    """`total` + the texture's pixels, read from its header (file path or bytes) before anything decodes it;
    RenderError when the header gives no size, the texture is above `max_pixels` or the asset's textures
    together above `max_total_pixels` (0 = no bound)."""
    try:
        head = header_size(source)
    except ValueError as e:
        raise RenderError(f"texture '{label}': {e}") from None
    if head is None:
        raise RenderError(f"texture '{label}': no size in its header (unknown format); refused, not decoded")
    if head[0] * head[1] > max_pixels:
        raise RenderError(f"texture '{label}' is {head[0]}x{head[1]}, above the {max_pixels}-pixel bound")
    total += head[0] * head[1]
    if max_total_pixels and total > max_total_pixels:
        raise RenderError(f"textures of this asset hold more than {max_total_pixels} pixels "
                          "(render.max_asset_texture_pixels)")
    return total


def check_before_import(files: AssetFiles, cfg: RenderConfig) -> None:
    """The bounds that need no Blender: every texture the asset may load sized from its header (unknown =
    refused) against render.max_texture_pixels and, summed, render.max_asset_texture_pixels; the glTF's
    triangles after instancing (and FBX's after subdivision) against 2 x render.max_faces."""
    total = 0
    for label, src in files.images:
        total = _count_texture(label, src() if callable(src) else src, cfg.max_texture_pixels, total,
                               cfg.max_asset_texture_pixels)
    cap = 2 * cfg.max_faces
    if files.triangles is not None and files.triangles > cap:
        raise RenderError(f"too many faces: the file declares {files.triangles} triangles after instancing "
                          f"and subdivision > {cap}")
    if files.instances is not None and files.instances > cfg.max_faces:
        raise RenderError(f"too many mesh instances: {files.instances} > {cfg.max_faces}")


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """Importers try some paths relative to the process's working directory first: make that the sandbox."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def prepare_scene(path: str | Path, fmt: str | None, cfg: RenderConfig, folder: str | Path | None = None,
                  max_file_bytes: int = 0, sandbox_parent: str | Path | None = None) -> dict[str, Any]:
    """Reset, import, check bounds, normalise. Returns normalisation, geometry and missing textures.

    A file above `max_file_bytes` (data.max_file_bytes; 0 = no bound) fails unopened. The asset may read
    files inside `folder` only (None: none but itself, a single-file asset); they are linked into a private
    sandbox folder created under `sandbox_parent` (default: the system's temporary folder) and imported
    from there; the sandbox is gone when this returns (every image it provided is packed)."""
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if max_file_bytes and size > max_file_bytes:
        raise RenderError(f"file is {size} bytes, above the {max_file_bytes}-byte bound")
    ext = ("." + fmt.lower().lstrip(".")) if fmt else Path(path).suffix.lower()
    if ext not in FORMATS:
        raise RenderError(f"unsupported format '{ext}' (supported: {', '.join(FORMATS)})")
    if ext == ".fbx":
        bpy_module()  # Blender's FBX parser (render.references) is importable once bpy is
    try:
        files = asset_files(path, ext, folder) if ext != ".blend" else None
    except ContainmentError as e:
        raise RenderError(str(e)) from None
    if files is not None:
        check_before_import(files, cfg)
    if sandbox_parent is not None:
        Path(sandbox_parent).mkdir(parents=True, exist_ok=True)
    sandbox = Path(tempfile.mkdtemp(prefix=".tmp-sandbox-", dir=sandbox_parent))  # mode 0700
    try:
        main = build_sandbox(files, sandbox) if files is not None else Path(path)
        with _working_directory(sandbox):
            bad = count_nonfinite_vertices(main, ext) if files is not None else 0
            if bad:
                raise RenderError(f"non-finite vertex coordinates ({bad} vertices)")
            reset_scene()
            import_asset(main, fmt)
            faces = raw_face_count()
            if faces > cfg.max_faces:
                raise RenderError(f"too many faces: {faces} > {cfg.max_faces}")
            estimate = estimated_triangles()
            if estimate > 2 * cfg.max_faces:
                raise RenderError(f"too many faces: up to {estimate} triangles after modifiers > {2 * cfg.max_faces}")
            missing = (files.refused if files is not None else []) + check_textures(
                cfg.max_texture_pixels, sandbox if files is not None else Path(path).resolve().parent,
                cfg.max_asset_texture_pixels)
            _pack_file_images()
    except ContainmentError as e:
        raise RenderError(str(e)) from None
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
    _match_viewport_to_render()
    center, scale = normalise_scene(max_triangles=2 * cfg.max_faces)
    v, f = scene_geometry(max_triangles=2 * cfg.max_faces)
    return {"center": center, "scale": scale, "vertices": v.astype(np.float32), "faces": f.astype(np.int32),
            "missing_textures": missing}


def _pack_file_images() -> None:
    """Pack every file-backed image (the file's bytes, not decoded) so the sandbox can go before rendering."""
    bpy = bpy_module()
    for img in bpy.data.images:
        if img.source == "FILE" and img.packed_file is None and img.filepath and Path(img.filepath).is_file():
            img.pack()

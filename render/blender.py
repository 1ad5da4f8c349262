"""Render one asset with Blender (bpy): reset, import by format, normalise, light, render every pass in one
Cycles render per view, and write DESIGN's asset folder (meta.json, cameras.npz, geometry.npz, NN.*.png).

A plain step with no Ray import: `render_asset` runs in-process or inside a Ray actor that holds one bpy and
calls it asset after asset. Per-asset problems (a file Blender cannot read, an empty scene, NaN vertices,
too many faces, an oversized texture, a .blend with scripts) come back as a `failed` row with a reason;
nothing is written for them. Untrusted files stay data: Python auto-execution is off and .blend files are
appended datablock by datablock (never opened as a main file), refused when they carry scripts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from core.cameras import intrinsics, opencv_to_blender, uid_seed
from core.config import RenderConfig
from core.io import atomic_dir
from core.layout import VIEW_KINDS, view_name
from render.files import (  # noqa: F401 - srgb_encode, encode_view: part of this module's API
    asset_folder,
    count_nonfinite_vertices,
    encode_view,
    header_size,
    save_png,
    srgb_encode,
)
from render.quality import assess

GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "FONT", "META"}
FORMATS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".fbx", ".blend")


# Settings that change what is written; a folder rendered with other values is stale (scheduling knobs such
# as actors, threads or timeouts are not among them). Per mode: training folders (renders/) depend on the
# random-view settings, evaluation folders (renders_eval/) on the orbit/input settings, both on the common
# ones, so changing render.views does not re-render renders_eval and changing eval_distance not renders/.
COMMON_OUTPUT_FIELDS = ("resolution", "fov_deg", "samples", "adaptive_threshold", "denoise", "max_bounces",
                        "depth_scale", "light_strength", "world_strength")
OUTPUT_FIELDS = {
    "train": COMMON_OUTPUT_FIELDS + ("views", "distance_min", "distance_max", "elevation_min_deg",
                                     "elevation_max_deg"),
    "eval": COMMON_OUTPUT_FIELDS + ("eval_orbit_views", "eval_distance", "eval_input_elevation_deg"),
}


def output_hash(cfg: RenderConfig, eval_mode: bool = False) -> str:
    """Short stable hash of the settings that determine the rendered files of one mode (stored in meta.json)."""
    import hashlib

    mode = "eval" if eval_mode else "train"
    blob = json.dumps({"mode": mode, **{k: getattr(cfg, k) for k in OUTPUT_FIELDS[mode]}}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RenderError(Exception):
    """A per-asset problem; its message becomes the `reason` of a failed row."""


def _bpy():
    import bpy  # imported lazily so that importing this module (e.g. for FORMATS) costs nothing

    return bpy


# ----------------------------------------------------------------------------------------------------------
# Scene reset and import
# ----------------------------------------------------------------------------------------------------------


def reset_scene() -> None:
    """Back to factory settings with an empty scene; drops every datablock of the previous asset."""
    bpy = _bpy()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    # Factory settings restore the preferences too; auto-execution must stay off for every asset.
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    bpy.data.orphans_purge(do_local_ids=True, do_linked_ids=True, do_recursive=True)


def datablock_counts() -> dict[str, int]:
    """Number of datablocks per bpy.data collection (to prove that a reset leaks nothing)."""
    bpy = _bpy()
    out = {}
    for name in dir(bpy.data):
        coll = getattr(bpy.data, name, None)
        if type(coll).__name__ == "bpy_prop_collection":
            out[name] = len(coll)
    return out


def _import_blend(path: Path) -> None:
    """Append objects of a .blend into the current scene without ever running its scripts."""
    bpy = _bpy()
    with bpy.data.libraries.load(str(path), link=False) as (src, dst):
        if len(src.texts):
            raise RenderError(f".blend holds {len(src.texts)} Python text block(s); refused, nothing executed")
        dst.objects = list(src.objects)
    for obj in dst.objects:
        if obj is not None:
            bpy.context.scene.collection.objects.link(obj)


def import_asset(path: str | Path, fmt: str | None = None) -> None:
    """Import a file into the (reset) scene with Blender's importer for its format."""
    bpy = _bpy()
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
    bpy = _bpy()
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
    bpy = _bpy()
    return sum(len(m.polygons) for m in bpy.data.meshes)


def scene_geometry(max_triangles: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The evaluated, triangulated scene in world coordinates: vertices [N,3] float64, faces [F,3] int64.

    Covers every geometry object and instance after modifiers and parent transforms (what Cycles renders).
    """
    bpy = _bpy()
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
    """Centre the scene on its bounding-box centre and scale its largest side to 1 (DESIGN).

    The box covers all geometry of all roots after every parent transform. Returns (center [3], scale) with
    p_normalised = scale * (p_imported - center); the transform is applied to every root object.
    """
    bpy = _bpy()
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
    bpy = _bpy()
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


# ----------------------------------------------------------------------------------------------------------
# Render settings, lighting, cameras
# ----------------------------------------------------------------------------------------------------------

_GPU_KIND: str | None = None  # cached after the first probe: "OPTIX", "CUDA" or "" (none)


def _setup_device(scene: Any, device: str) -> str:
    global _GPU_KIND
    bpy = _bpy()
    if device in ("auto", "gpu"):
        prefs = bpy.context.preferences.addons["cycles"].preferences
        kinds = ("OPTIX", "CUDA") if _GPU_KIND is None else ((_GPU_KIND,) if _GPU_KIND else ())
        for kind in kinds:
            try:
                prefs.compute_device_type = kind
                prefs.get_devices()
            except (TypeError, ValueError, RuntimeError):
                continue
            devs = [d for d in prefs.devices if d.type == kind]
            if devs:
                for d in prefs.devices:
                    d.use = d.type == kind
                _GPU_KIND = kind
                scene.cycles.device = "GPU"
                return kind
        _GPU_KIND = ""
        if device == "gpu":
            raise RenderError("render.device=gpu but Cycles found no CUDA/OptiX device")
    scene.cycles.device = "CPU"
    return "CPU"


def setup_render(cfg: RenderConfig, width: int, threads: int) -> dict[str, Any]:
    """Cycles with film transparency and depth + normal passes into one multilayer EXR per view."""
    bpy = _bpy()
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    used = _setup_device(scene, cfg.device)
    c = scene.cycles
    c.samples = cfg.samples
    c.use_adaptive_sampling = cfg.adaptive_threshold > 0
    if cfg.adaptive_threshold > 0:
        c.adaptive_threshold = cfg.adaptive_threshold
    c.use_denoising = cfg.denoise
    if cfg.denoise:
        c.denoiser = "OPENIMAGEDENOISE"
    c.max_bounces = cfg.max_bounces
    c.seed = 0
    c.use_animated_seed = False
    r = scene.render
    r.resolution_x = r.resolution_y = width
    r.resolution_percentage = 100
    r.film_transparent = True
    r.use_persistent_data = True  # keep the BVH between the views of one asset
    if threads > 0:
        r.threads_mode = "FIXED"
        r.threads = threads
    scene.view_settings.view_transform = "Standard"  # EXR stays linear; PNG encoding is done here (sRGB)
    vl = bpy.context.view_layer
    vl.use_pass_z = True
    vl.use_pass_normal = True
    im = r.image_settings
    im.media_type = "MULTI_LAYER_IMAGE"  # the format enum is accepted only after the media type
    im.file_format = "OPEN_EXR_MULTILAYER"
    im.color_depth = "32"  # float depth: half floats would quantise 2.6 units to 0.002
    im.exr_codec = "NONE"
    return {"engine": "CYCLES", "device": used, "samples": cfg.samples,
            "adaptive_threshold": cfg.adaptive_threshold, "denoise": cfg.denoise, "max_bounces": cfg.max_bounces,
            "resolution": width, "fov_deg": cfg.fov_deg, "threads": threads}


def lighting_for(uid: str, cfg: RenderConfig) -> dict[str, Any]:
    """Deterministic per-asset lighting: a uniform white world plus a key and a fill sun, seeded by the uid."""
    rng = np.random.default_rng(uid_seed("light:" + uid))
    key_az, key_el = rng.uniform(0, 360), rng.uniform(30, 70)
    fill_az, fill_el = key_az + 180 + rng.uniform(-40, 40), rng.uniform(5, 35)
    s = cfg.light_strength
    return {
        "world": {"color": [1.0, 1.0, 1.0], "strength": cfg.world_strength},
        "suns": [
            {"name": "key", "azimuth_deg": float(key_az), "elevation_deg": float(key_el),
             "strength": float(s * rng.uniform(2.0, 3.0)), "angle_deg": 10.0},
            {"name": "fill", "azimuth_deg": float(fill_az % 360), "elevation_deg": float(fill_el),
             "strength": float(s * rng.uniform(0.6, 1.0)), "angle_deg": 20.0},
        ],
    }


def apply_lighting(light: dict[str, Any]) -> None:
    bpy = _bpy()
    from mathutils import Vector

    scene = bpy.context.scene
    world = bpy.data.worlds.new("World")
    with warnings.catch_warnings():  # deprecated for 6.0 but still needed in 5.0 for a node world
        warnings.simplefilter("ignore", DeprecationWarning)
        world.use_nodes = True
    bg = world.node_tree.nodes["Background"]
    bg.inputs["Color"].default_value = (*light["world"]["color"], 1.0)
    bg.inputs["Strength"].default_value = light["world"]["strength"]
    scene.world = world
    for sun in light["suns"]:
        data = bpy.data.lights.new(f"sun_{sun['name']}", type="SUN")
        data.energy = sun["strength"]
        data.angle = math.radians(sun["angle_deg"])
        obj = bpy.data.objects.new(f"sun_{sun['name']}", data)
        az, el = math.radians(sun["azimuth_deg"]), math.radians(sun["elevation_deg"])
        toward_light = Vector((math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)))
        # A sun shines along its local -Z, so its +Z must point towards where the light comes from.
        obj.rotation_euler = toward_light.to_track_quat("Z", "Y").to_euler()
        scene.collection.objects.link(obj)


def add_camera(fov_deg: float) -> Any:
    bpy = _bpy()
    data = bpy.data.cameras.new("camera")
    data.sensor_fit = "HORIZONTAL"  # K is defined by the horizontal field of view
    data.angle = math.radians(fov_deg)
    data.clip_start, data.clip_end = 0.01, 100.0
    cam = bpy.data.objects.new("camera", data)
    bpy.context.scene.collection.objects.link(cam)
    bpy.context.scene.camera = cam
    return cam


# ----------------------------------------------------------------------------------------------------------
# One render per view -> RGBA, depth, normal
# ----------------------------------------------------------------------------------------------------------


def read_passes(exr_path: str | Path) -> dict[str, np.ndarray]:
    """Multilayer EXR -> {"rgba" [H,W,4] linear premultiplied, "depth" [H,W] planar z, "normal" [H,W,3]}."""
    import OpenEXR

    ch: dict[str, np.ndarray] = {}
    with OpenEXR.File(str(exr_path), separate_channels=True) as f:
        for part in f.parts:
            for name, c in part.channels.items():
                ch[name] = np.asarray(c.pixels, dtype=np.float32)

    def get(suffix: str) -> np.ndarray:
        for name, arr in ch.items():
            if name.endswith(suffix) and "Noisy" not in name:
                return arr
        raise RenderError(f"render pass '{suffix}' missing in {exr_path} (have {sorted(ch)})")

    rgba = np.stack([get(f"Combined.{c}") for c in "RGBA"], -1)
    normal = np.stack([get(f"Normal.{c}") for c in "XYZ"], -1)
    return {"rgba": rgba, "depth": get("Depth.Z"), "normal": normal}


def render_views(cam: Any, c2w: np.ndarray, out: Path, width: int, depth_scale: float,
                 tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """Render each OpenCV pose c2w [V,4,4] once and write NN.{rgba,depth,normal}.png into `out`.

    Returns straight-alpha RGB [V,H,W,3] and alpha [V,H,W] in [0,1] (for the quality check).
    """
    bpy = _bpy()
    from mathutils import Matrix

    scene = bpy.context.scene
    V = len(c2w)
    rgbs = np.zeros((V, width, width, 3), np.float32)
    alphas = np.zeros((V, width, width), np.float32)
    exr = tmp / "view.exr"
    for i in range(V):
        cam.matrix_world = Matrix(opencv_to_blender(c2w[i]).astype(np.float64).tolist())
        scene.render.filepath = str(exr)
        bpy.ops.render.render(write_still=True)
        enc = encode_view(read_passes(exr), depth_scale)
        exr.unlink()
        for kind in VIEW_KINDS:
            save_png(out / view_name(i, kind, V), enc[kind])
        rgbs[i] = enc["rgba"][..., :3] / 255.0
        alphas[i] = enc["rgba"][..., 3] / 255.0
    return rgbs, alphas


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------


def _quiet(fn, *args, **kwargs):
    """Run a bpy call with Blender's C-level stdout (render progress, importer chatter) silenced."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        return fn(*args, **kwargs)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def prepare_scene(path: str | Path, fmt: str | None, cfg: RenderConfig, folder: str | Path | None = None
                  ) -> dict[str, Any]:
    """Reset, import, check bounds, normalise. Returns normalisation, geometry and missing textures.

    Textures outside `folder` (default: the file's own folder) are not loaded (`check_textures`)."""
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if size > cfg.max_file_bytes:
        raise RenderError(f"file is {size} bytes, above the {cfg.max_file_bytes}-byte bound")
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


def _write_folder(out: Path, job: dict, cfg: RenderConfig, c2w: np.ndarray, scene_info: dict,
                  settings: dict, light: dict, cam: Any, tmp: Path, eval_mode: bool = False) -> dict[str, Any]:
    """One DESIGN render folder for one set of views; returns its quality verdict."""
    out.mkdir(parents=True, exist_ok=True)
    width = cfg.resolution
    K = intrinsics(cfg.fov_deg, width)
    rgbs, alphas = render_views(cam, c2w, out, width, cfg.depth_scale, tmp)
    quality = assess(rgbs, alphas, cfg)
    np.savez(out / "cameras.npz", c2w=c2w.astype(np.float32), K=np.repeat(K[None], len(c2w), 0),
             width=np.int32(width), height=np.int32(width))
    np.savez_compressed(out / "geometry.npz", vertices=scene_info["vertices"], faces=scene_info["faces"])
    meta = {
        "uid": job["uid"], "source": job.get("source", ""), "license": job.get("license", ""),
        "attribution": job.get("attribution", ""), "name": job.get("name", ""),
        "normalization": {"center": [float(x) for x in scene_info["center"]], "scale": float(scene_info["scale"])},
        "depth_scale": cfg.depth_scale, "render": {**settings, "views": len(c2w),
                                                          "output_hash": output_hash(cfg, eval_mode)},
        "lighting": light, "missing_textures": scene_info["missing_textures"],
        "quality": {"ok": quality["ok"], "flags": quality["flags"], "stats": quality["stats"]},
        "geometry": {"vertices": int(len(scene_info["vertices"])), "faces": int(len(scene_info["faces"]))},
        "rendered_at": time.time(), "pid": os.getpid(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return quality


def _unexpected(uid: str, what: str, e: BaseException) -> str:
    """Print the whole traceback to stderr (Ray forwards actor stderr to the driver) and return a short
    reason: the exception's last line plus where it was raised."""
    tb = traceback.format_exc()
    sys.stderr.write(f"render: {what} of asset {uid} raised:\n{tb}")
    sys.stderr.flush()
    frames = traceback.extract_tb(e.__traceback__)
    where = f" [at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}]" if frames else ""
    last = (str(e).strip().splitlines() or [""])[-1]
    return f"{type(e).__name__}: {last}".strip().rstrip(":")[:400] + where


def render_asset(job: dict[str, Any], dest: str | Path, cfg: RenderConfig,
                 view_sets: dict[str, np.ndarray], threads: int = 0, quiet: bool = True,
                 eval_mode: bool | None = None) -> dict[str, Any]:
    """Render asset `job` (uid, path, format, source, license, attribution, name) into folder `dest`.

    `view_sets` maps a subfolder ("" for the folder itself, or "orbit"/"inputs") to OpenCV poses [V,4,4];
    `eval_mode` (default: any subfolder other than "") picks which output settings the stored hash covers.
    The folder is written under a temporary name and renamed when complete. Returns a manifest row.
    Textures may come only from the asset's folder (`asset_folder`). An unexpected exception's traceback
    goes to stderr and its last line (with where it was raised) into `reason`. If the scene reset after
    the asset fails, the row carries `reset_failed: True`: this bpy is in an unknown state, and the Ray
    actor pool replaces the actor (pipelines.render) instead of giving it the next asset.
    """
    t0 = time.time()
    uid = job["uid"]
    eval_mode = set(view_sets) != {""} if eval_mode is None else eval_mode
    row: dict[str, Any] = {"uid": uid, "status": "failed", "reason": "", "seconds": 0.0, "views": 0,
                           "faces": 0, "vertices": 0, "missing_textures": 0, "quality_ok": False,
                           "quality_flags": "", "device": ""}
    tmp = Path(tempfile.mkdtemp(prefix="gtr-render-"))
    try:
        call = _quiet if quiet else (lambda fn, *a, **k: fn(*a, **k))
        info = call(prepare_scene, job["path"], job.get("format") or None, cfg, asset_folder(job["path"], uid))
        settings = setup_render(cfg, cfg.resolution, threads)
        light = lighting_for(uid, cfg)
        apply_lighting(light)
        cam = add_camera(cfg.fov_deg)
        flags: list[str] = []
        with atomic_dir(dest, overwrite=True) as d:
            for sub, c2w in view_sets.items():
                q = call(_write_folder, Path(d) / sub if sub else Path(d), job, cfg, np.asarray(c2w), info,
                         settings, light, cam, tmp, eval_mode)
                flags += [f for f in q["flags"] if f not in flags]
        row.update(status="ok", views=sum(len(v) for v in view_sets.values()), faces=int(len(info["faces"])),
                   vertices=int(len(info["vertices"])), missing_textures=len(info["missing_textures"]),
                   quality_ok=not flags, quality_flags=",".join(flags), device=settings["device"])
    except RenderError as e:
        row["reason"] = str(e)
    except Exception as e:  # Blender on an unknown file can fail anywhere; the row keeps the cause
        row["reason"] = _unexpected(uid, "rendering", e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            reset_scene()  # free the asset's memory now, not when the next one arrives
        except Exception as e:  # noqa: BLE001 - reported, and the caller replaces this renderer
            row["reset_failed"] = True
            row["reset_reason"] = _unexpected(uid, "the scene reset after rendering", e)
    row["seconds"] = round(time.time() - t0, 3)
    return row

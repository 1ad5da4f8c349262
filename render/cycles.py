"""Cycles for one asset: render settings and device, the deterministic lighting, the camera, and one render
per view whose multilayer EXR becomes the view's RGBA, depth and normal PNGs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from core.cameras import opencv_to_blender, uid_seed
from core.config import RenderConfig
from core.layout import VIEW_KINDS, view_name
from render.files import encode_view, save_png
from render.scene import RenderError, bpy_module

_GPU_KIND: str | None = None  # cached after the first probe: "OPTIX", "CUDA" or "" (none)


def gpu_kind() -> str:
    """The GPU kind Cycles renders on here ("OPTIX", "CUDA") or "" for none; probed once per process (the
    devices it finds are selected for use)."""
    global _GPU_KIND
    if _GPU_KIND is not None:
        return _GPU_KIND
    prefs = bpy_module().context.preferences.addons["cycles"].preferences
    for kind in ("OPTIX", "CUDA"):
        try:
            prefs.compute_device_type = kind
            prefs.get_devices()
        except (TypeError, ValueError, RuntimeError):
            continue
        if any(d.type == kind for d in prefs.devices):
            for d in prefs.devices:
                d.use = d.type == kind
            _GPU_KIND = kind
            return kind
    _GPU_KIND = ""
    return ""


def _setup_device(scene: Any, device: str) -> str:
    if device in ("auto", "gpu"):
        kind = gpu_kind()
        if kind:
            bpy_module().context.preferences.addons["cycles"].preferences.compute_device_type = kind
            scene.cycles.device = "GPU"
            return kind
        if device == "gpu":
            raise RenderError("render.device=gpu but Cycles found no CUDA/OptiX device")
    scene.cycles.device = "CPU"
    return "CPU"


def setup_render(cfg: RenderConfig, width: int, threads: int) -> dict[str, Any]:
    """Cycles with film transparency and depth + normal passes into one multilayer EXR per view."""
    bpy = bpy_module()
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
    bpy = bpy_module()
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
    bpy = bpy_module()
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
    bpy = bpy_module()
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

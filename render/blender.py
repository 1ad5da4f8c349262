"""Render one asset with Blender (bpy) into the contract's asset folder (meta.json, cameras.npz, geometry.npz,
NN.{rgba,depth,normal}.png): the scene (render/scene.py: reset, import, normalise), Cycles (render/cycles.py:
settings, lighting, one render per view), the quality check, and the folder written atomically.

A plain step with no Ray import: `render_asset` runs in-process or inside an executor worker that holds one
bpy and calls it asset after asset. Per-asset problems (a file Blender cannot read, an empty scene, NaN
vertices, too many faces, an oversized texture or file, a .blend with scripts) come back as a `failed` row
with a reason; nothing is written for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.cameras import intrinsics
from core.config import DataConfig, RenderConfig
from core.io import atomic_dir
from render.cycles import add_camera, apply_lighting, lighting_for, render_views, setup_render
from render.files import asset_folder
from render.quality import assess
from render.scene import FORMATS, RenderError, bpy_module, datablock_counts, prepare_scene, reset_scene

# Names of this module's API that live in render/scene.py and render/cycles.py (tests and bench use them here).
__all__ = ["FORMATS", "OUTPUT_FIELDS", "RenderError", "add_camera", "apply_lighting", "asset_folder",
           "bpy_module", "datablock_counts", "lighting_for", "output_hash", "prepare_scene", "render_asset", "render_views",
           "quiet_call", "reset_scene", "setup_render"]


# Settings that change what is written; a folder rendered with other values is stale (scheduling knobs such
# as workers, threads or timeouts are not among them). Per mode: training folders (renders/) depend on the
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
    mode = "eval" if eval_mode else "train"
    fields = {k: getattr(cfg, k) for k in OUTPUT_FIELDS[mode]}
    if eval_mode and cfg.eval_protocol != "instantmesh":  # the default protocol keeps the hash it always had
        fields.update(eval_protocol=cfg.eval_protocol, eval_grid_distance=cfg.eval_grid_distance)
    blob = json.dumps({"mode": mode, **fields}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------


def quiet_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a bpy call with Blender's C-level stdout (render progress, importer chatter) silenced."""
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


def _write_folder(out: Path, job: dict, cfg: RenderConfig, c2w: np.ndarray, scene_info: dict,
                  settings: dict, light: dict, cam: Any, tmp: Path, eval_mode: bool = False) -> dict[str, Any]:
    """One render folder (docs/CONTRACTS.md) for one set of views; returns its quality verdict."""
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
        "author": job.get("author") or "", "source_url": job.get("source_url") or "",
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
                 eval_mode: bool | None = None, max_file_bytes: int = DataConfig.max_file_bytes) -> dict[str, Any]:
    """Render asset `job` (uid, path, format, source, license, attribution, name) into folder `dest`.

    `view_sets` maps a subfolder ("" for the folder itself, or "orbit"/"inputs") to OpenCV poses [V,4,4];
    `eval_mode` (default: any subfolder other than "") picks which output settings the stored hash covers.
    The folder is written under a temporary name and renamed when complete. Returns a manifest row.
    The asset may read files only inside its folder (`asset_folder`, when that folder is named by the uid;
    otherwise nothing but the file itself), through a sandbox beside `dest` (render.references). An
    unexpected exception's traceback goes to stderr and its last line (with where it was raised) into
    `reason`. If the scene reset after the asset fails, the row carries `reset_failed: True` (after a
    MemoryError, `retire: True`): this bpy is in an unknown state, and the render stage's executor replaces
    the renderer (pipelines.render) instead of giving it the next asset. A file above `max_file_bytes`
    (data.max_file_bytes; 0 = no bound) fails without being opened.
    """
    t0 = time.time()
    uid = job["uid"]
    eval_mode = set(view_sets) != {""} if eval_mode is None else eval_mode
    row: dict[str, Any] = {"uid": uid, "status": "failed", "reason": "", "seconds": 0.0, "views": 0,
                           "faces": 0, "vertices": 0, "missing_textures": 0, "quality_ok": False,
                           "quality_flags": "", "device": ""}
    tmp = Path(tempfile.mkdtemp(prefix="gtr-render-"))
    try:
        call = quiet_call if quiet else (lambda fn, *a, **k: fn(*a, **k))
        folder = asset_folder(job["path"], uid)
        # a file in a folder named by its uid may read that folder; any other file nothing but itself
        info = call(prepare_scene, job["path"], job.get("format") or None, cfg,
                    folder if folder.name == uid else None, max_file_bytes, Path(dest).parent)
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
    except MemoryError:  # the renderer's memory cap (render.max_memory_bytes): this bpy's state is unknown
        row["reason"] = "out of memory: the renderer's memory cap (render.max_memory_bytes) was reached"
        row["retire"] = True
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

"""Blender-free file work of the renderer: where an asset's files may come from, image sizes from file
headers, a pre-import check of vertex coordinates, and the encoding of render passes into the contract's PNGs.
(render/scene.py, render/cycles.py and render/blender.py hold everything that needs bpy.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def asset_folder(path: str | Path, uid: str) -> Path:
    """The folder an asset's files may come from: `.../<uid>/` when the file lies inside a folder named by
    its uid (local/GSO sources place an .obj/.gltf with its textures there, the main file possibly in a
    subfolder), else the file's own folder."""
    path = Path(path).resolve()
    for parent in path.parents:
        if parent.name == uid:
            return parent
    return path.parent


def header_size(source: str | bytes) -> tuple[int, int] | None:
    """(w, h) from an image file's header (PIL reads no pixels), None when PIL does not know the format.

    Raises ValueError for an image PIL refuses from its header alone (above 2x MAX_IMAGE_PIXELS)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.size
    except Image.DecompressionBombError as e:  # above 2x MAX_IMAGE_PIXELS (~179 Mpx), from the header
        raise ValueError(f"image above PIL's decompression-bomb bound: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def count_nonfinite_vertices(path: str | Path, ext: str) -> int:
    """Non-finite vertex coordinates in the file itself, read with trimesh (no Blender).

    Blender's importers validate meshes and silently zero NaN/inf coordinates, which turns a broken asset
    into spikes towards the origin; so the file is checked before import. Formats trimesh cannot read (FBX,
    .blend) or files it fails on return 0 and are left to Blender's own checks.
    """
    if ext not in (".glb", ".gltf", ".obj", ".ply", ".stl"):
        return 0
    import trimesh

    try:
        loaded = trimesh.load(str(path), file_type=ext[1:], force="scene", process=False, skip_materials=True)
        geoms = loaded.geometry.values()
    except Exception:  # noqa: BLE001 - trimesh is only a pre-check; Blender decides whether it imports
        return 0
    n = 0
    for g in geoms:
        v = np.asarray(getattr(g, "vertices", np.zeros((0, 3))), dtype=np.float64)
        n += int((~np.isfinite(v)).any(axis=1).sum())
    return n


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear [0,1] -> sRGB-encoded [0,1] (Blender's 'Standard' view transform)."""
    x = np.clip(linear, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def encode_view(passes: dict[str, np.ndarray], depth_scale: float) -> dict[str, np.ndarray]:
    """Passes -> the contract's 8-bit straight-alpha RGBA, 16-bit depth (0 = no hit) and 8-bit (n+1)/2 normals."""
    rgba = passes["rgba"]
    alpha = np.clip(rgba[..., 3], 0.0, 1.0)
    straight = np.where(alpha[..., None] > 1e-6, rgba[..., :3] / np.maximum(alpha[..., None], 1e-6), 0.0)
    rgb8 = np.round(srgb_encode(straight) * 255.0)
    rgba8 = np.concatenate([rgb8, np.round(alpha * 255.0)[..., None]], -1).astype(np.uint8)
    z = passes["depth"]
    hit = np.isfinite(z) & (z > 0) & (z < 1e5)  # Cycles writes ~1e10 where a ray escapes
    depth16 = np.where(hit, np.clip(np.round(z * depth_scale), 1, 65535), 0).astype(np.uint16)
    n = passes["normal"]
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    # The pass averages samples (background adds zero), so edge pixels are shorter: renormalise.
    n = np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), 0.0)
    normal8 = np.round((n + 1.0) * 0.5 * 255.0).astype(np.uint8)
    return {"rgba": rgba8, "depth": depth16, "normal": normal8}


def save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, compress_level=1)

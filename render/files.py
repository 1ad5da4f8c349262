"""Blender-free file work of the renderer: where an asset's files may come from, image sizes from file
headers, a pre-import check of vertex coordinates, and the encoding of render passes into the contract's PNGs.
(render/scene.py, render/cycles.py and render/blender.py hold everything that needs bpy.)"""

from __future__ import annotations

import re
import struct
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


HEADER_BYTES = 1 << 20  # an image's first bytes handed to the header readers: where its size is written


def _exr_size(head: bytes) -> tuple[int, int] | None:
    """(w, h) of an OpenEXR file from its header's `dataWindow` (a multi-part file: the largest part).

    The header is a list of attributes `name NUL type NUL size:int32 value`, ended by an empty name; parts of
    a multi-part file follow one another. Deep data is refused (None)."""
    if head[:4] != b"\x76\x2f\x31\x01" or len(head) < 8:
        return None
    flags = int.from_bytes(head[4:8], "little")
    if flags & 0x800:  # deep data: not textures
        return None
    pos, best, multipart = 8, None, bool(flags & 0x1000)
    while pos < len(head):
        end = head.find(b"\0", pos)
        if end < 0:
            return None
        if end == pos:  # an empty name ends a header (and, in a multi-part file, an empty header the list)
            pos += 1
            if not multipart or pos >= len(head) or head[pos] == 0:
                return best
            continue
        name = head[pos:end]
        t_end = head.find(b"\0", end + 1)
        if t_end < 0 or t_end + 5 > len(head):
            return None
        size = int.from_bytes(head[t_end + 1:t_end + 5], "little", signed=True)
        value = head[t_end + 5:t_end + 5 + size]
        if size < 0 or len(value) < size:
            return None
        if name == b"dataWindow" and head[end + 1:t_end] == b"box2i" and size == 16:
            x0, y0, x1, y1 = (int.from_bytes(value[i:i + 4], "little", signed=True) for i in range(0, 16, 4))
            if x1 < x0 or y1 < y0:
                return None
            w, h = x1 - x0 + 1, y1 - y0 + 1
            best = (w, h) if best is None or w * h > best[0] * best[1] else best
        pos = t_end + 5 + size
    return None


def _hdr_size(head: bytes) -> tuple[int, int] | None:
    """(w, h) of a Radiance .hdr: header lines after `#?RADIANCE`, a blank line, then e.g. `-Y 512 +X 1024`."""
    if not (head.startswith(b"#?RADIANCE") or head.startswith(b"#?RGBE")):
        return None
    blank = head.find(b"\n\n")
    if blank < 0:
        return None
    line = head[blank + 2:blank + 2 + 64].split(b"\n", 1)[0].decode("ascii", "replace").strip()
    m = re.fullmatch(r"[-+]([XY]) (\d{1,9}) [-+]([XY]) (\d{1,9})", line)
    if m is None or m[1] == m[3]:
        return None
    first, second = int(m[2]), int(m[4])
    return (second, first) if m[1] == "Y" else (first, second)


def _ktx2_size(head: bytes) -> tuple[int, int] | None:
    """(w, h) of a KTX2 texture (KHR_texture_basisu): pixelWidth / pixelHeight at bytes 20..28."""
    if not head.startswith(b"\xabKTX 20\xbb\r\n\x1a\n") or len(head) < 28:
        return None
    w, h = struct.unpack("<II", head[20:28])
    return (w, max(h, 1))


def header_size(source: str | Path | bytes) -> tuple[int, int] | None:
    """(w, h) from an image's header, no pixel decoded; None when no reader knows the format.

    OpenEXR, Radiance HDR and KTX2 are read here (PIL does not know them); everything else through PIL,
    which opens lazily and reads the header only. A caller refuses an image whose size is None: nothing of
    unknown size is decoded. Raises ValueError for an image PIL refuses from its header alone (above 2x
    MAX_IMAGE_PIXELS)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes):
        head = source[:HEADER_BYTES]
    else:
        try:
            with open(source, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError:
            return None
    for reader in (_exr_size, _hdr_size, _ktx2_size):
        size = reader(head)
        if size is not None:
            return size
    try:
        with Image.open(io.BytesIO(head)) as im:
            return im.size
    except Image.DecompressionBombError as e:  # above 2x MAX_IMAGE_PIXELS (~179 Mpx), from the header
        raise ValueError(f"image above PIL's decompression-bomb bound: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
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

"""Decoding one sample: its raw field bytes -> checked header, cameras and picked views as arrays, bounded.

A sample is one asset of a shard (docs/CONTRACTS.md "Shards"): `{"__key__": uid, "meta.json": bytes, "cameras.npz":
bytes, "NN.rgba.png": bytes, "NN.depth.png": bytes, ...}`, as `training.data.tario` reads it. Everything
here treats those bytes as untrusted: sizes are checked from headers (PNG IHDR, the npz directory) before
anything is decompressed, and any problem raises with the sample's uid and the reason (the stream's handler
skips and counts it). Where the decoded views go (batch slots, compositing) is `training.data.batch`.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from core.config import Config
from core.layout import MAX_META_BYTES
from training.data.tario import MAX_FIELD_BYTES, MAX_VIEWS, read_npz

try:  # libspng: the fast path for the render stage's 8-bit RGBA PNGs (optional; PIL decodes everything)
    import pyspng
except ImportError:  # pragma: no cover - pinned in requirements.txt; the GPU machine may lack it
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_CAMERAS_BYTES = 1 << 20  # cameras.npz unpacked: c2w + K of MAX_VIEWS views in float64 is ~0.8 MB
BACKGROUNDS = ("white", "black", "random")


@dataclass(frozen=True)
class ViewSpec:
    """What one sample becomes. Sizes are square sides in pixels; `patch` 0 = the whole supervision view."""

    input_views: int = 4
    sup_views: int = 4
    input_size: int = 128
    sup_size: int = 64
    patch: int = 0
    background: str = "white"
    depths: bool = False  # sup_depth
    max_side: int = 4096  # stored views larger than max_side² are refused before decoding (loader.max_side)


def view_spec(cfg: Config, stage: str = "nerf", **overrides: Any) -> ViewSpec:
    """The stage's ViewSpec from the config: NeRF = patches of the render, mesh = full views with depth."""
    if stage == "nerf":
        s = ViewSpec(cfg.loader.input_views, cfg.nerf.sup_views, cfg.loader.input_size, cfg.nerf.render_size,
                     cfg.nerf.patch_size, cfg.loader.background, depths=False)
    elif stage == "mesh":
        s = ViewSpec(cfg.loader.input_views, cfg.mesh.sup_views, cfg.loader.input_size, cfg.mesh.render_size,
                     0, cfg.loader.background, depths=True)
    else:
        raise ValueError(f"stage must be 'nerf' or 'mesh', got {stage!r}")
    s = replace(s, max_side=cfg.loader.max_side)
    s = replace(s, **overrides)
    if s.background not in BACKGROUNDS:
        raise ValueError(f"loader.background must be one of {BACKGROUNDS}, got {s.background!r}")
    if s.patch and s.patch > s.sup_size:
        raise ValueError(f"patch {s.patch} larger than the supervision size {s.sup_size}")
    return s


def field(sample: Mapping[str, Any], name: str, limit: int = MAX_FIELD_BYTES) -> bytes:
    """The bytes of field `name` of a raw sample, refused when missing, not bytes or over `limit`."""
    if name not in sample:
        raise KeyError(f"sample {sample.get('__key__', '?')}: field {name} missing")
    data = sample[name]
    if not isinstance(data, (bytes, bytearray)) or len(data) > limit:
        raise ValueError(f"sample {sample.get('__key__', '?')}: field {name} is not bytes under {limit} B")
    return data  # no copy: PIL and np.load read it through a BytesIO


def png_header(data: bytes, size: tuple[int, int], name: str) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR chunk, whose size must be `size` (W, H): checked before
    anything is decoded, so no decompression bombs."""
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError(f"{name}: not a PNG (no signature / IHDR)")
    w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
    if (w, h) != size:
        raise ValueError(f"{name}: PNG {(w, h)}, expected PNG {size}")
    return depth, ctype


def _png(data: bytes, size: tuple[int, int], name: str) -> Image.Image:
    png_header(data, size, name)
    im = Image.open(io.BytesIO(data), formats=["PNG"])
    if im.size != size:
        raise ValueError(f"{name}: PNG {im.size}, expected PNG {size}")
    im.load()
    return im


def rgba_png(data: bytes, size: tuple[int, int], name: str) -> np.ndarray:
    """-> [H,W,4] uint8, straight alpha (an RGB file counts as fully opaque).

    8-bit RGBA (what the render stage writes) decodes with libspng (`pyspng`) where it is installed: 1.6x
    PIL's time at 512² and no copy out of PIL. Every other PNG, or no pyspng, goes through PIL."""
    if pyspng is not None and png_header(data, size, name) == (8, 6):
        px = pyspng.load(data)
        if px.shape != (size[1], size[0], 4) or px.dtype != np.uint8:
            raise ValueError(f"{name}: decoded to {px.dtype} {px.shape}, expected uint8 {(size[1], size[0], 4)}")
        return px
    im = _png(data, size, name)
    return np.asarray(im if im.mode == "RGBA" else im.convert("RGBA"))  # one copy out of PIL, no float image


def depth_png(data: bytes, size: tuple[int, int], name: str) -> np.ndarray:
    """16-bit PNG -> [H,W] integers, planar z times depth_scale (0 = background), undivided.

    Only 16-bit grayscale: an 8-bit depth would be read as depths 256x too small, without any error."""
    im = _png(data, size, name)
    if im.mode not in ("I;16", "I;16B", "I;16L"):
        raise ValueError(f"{name}: depth PNG mode {im.mode}, expected 16-bit grayscale")
    return np.asarray(im)


def scale_K(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K of the same camera after resizing the image by (sx, sy) (pixel-edge convention, centre at W/2)."""
    K = K.astype(np.float32).copy()
    K[0, :] *= sx
    K[1, :] *= sy
    return K


def _background(spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.background == "white":
        return np.ones(3, np.float32)
    if spec.background == "black":
        return np.zeros(3, np.float32)
    return rng.random(3, dtype=np.float32)


def read_cameras(data: bytes, max_side: int, uid: str = "?") -> tuple[int, int, np.ndarray, np.ndarray]:
    """cameras.npz bytes -> (W, H, c2w [V,4,4] float32, K [V,3,3] float32), every bound checked first:
    unpacked size (read_npz), 1 <= V <= MAX_VIEWS, W == H in [1, max_side], finite poses."""
    z = read_npz(data, MAX_CAMERAS_BYTES, f"{uid}: cameras.npz")
    for k in ("c2w", "K", "width", "height"):
        if k not in z:
            raise ValueError(f"{uid}: cameras.npz has no {k!r}")
    c2w, K = z["c2w"], z["K"]
    V = len(c2w) if c2w.ndim else 0
    if c2w.shape != (V, 4, 4) or K.shape != (V, 3, 3) or not 1 <= V <= MAX_VIEWS:
        raise ValueError(f"{uid}: cameras.npz shapes c2w {c2w.shape}, K {K.shape} (want [V,4,4], [V,3,3], "
                         f"1 <= V <= {MAX_VIEWS})")
    if z["width"].size != 1 or z["height"].size != 1 or z["width"].dtype.kind not in "iu" \
            or z["height"].dtype.kind not in "iu":
        raise ValueError(f"{uid}: cameras.npz width/height must be integer scalars")
    W, H = int(z["width"].reshape(())), int(z["height"].reshape(()))
    if W != H or not 1 <= W <= max_side:
        raise ValueError(f"{uid}: views are {W}x{H}; the loader takes square views of side 1..{max_side} "
                         "(loader.max_side)")
    c2w, K = c2w.astype(np.float32), K.astype(np.float32)
    if not (np.isfinite(c2w).all() and np.isfinite(K).all()):
        raise ValueError(f"{uid}: non-finite camera values")
    return W, H, c2w, K


def read_header(sample: Mapping[str, Any], spec: ViewSpec, rng: np.random.Generator) -> dict[str, Any]:
    """A raw sample's small fields, checked: uid, depth_scale, stored size W x H, cameras, the views picked
    for it (`spec.input_views` + `spec.sup_views` distinct ones, drawn from `rng`) and the background
    colour. Raises on anything malformed."""
    uid = sample.get("__key__", "?")
    meta = json.loads(field(sample, "meta.json", MAX_META_BYTES))
    if not isinstance(meta, dict):
        raise ValueError(f"{uid}: meta.json is not an object")
    depth_scale = np.float32(meta.get("depth_scale", 10000.0))
    if not (np.isfinite(depth_scale) and depth_scale > 0):
        raise ValueError(f"{uid}: depth_scale {meta.get('depth_scale')!r} must be a finite number > 0")
    W, H, c2w_all, K_all = read_cameras(field(sample, "cameras.npz"), spec.max_side, uid)
    V = len(c2w_all)
    need = spec.input_views + spec.sup_views
    if V < need:
        raise ValueError(f"{uid}: {V} views, need {need} ({spec.input_views} input + {spec.sup_views} supervision)")
    pick = rng.choice(V, size=need, replace=False)
    input_idx, sup_idx = [int(i) for i in pick[: spec.input_views]], [int(i) for i in pick[spec.input_views:]]
    return {"uid": uid, "depth_scale": depth_scale, "W": W, "H": H, "c2w": c2w_all, "K": K_all,
            "input_idx": input_idx, "sup_idx": sup_idx, "background": _background(spec, rng)}

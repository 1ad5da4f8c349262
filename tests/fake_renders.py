"""Test helper: write render folders in exactly the render stage's layout (docs/CONTRACTS.md, docs/ARCHITECTURE.md).

The shard and loader tests build their inputs with this instead of Blender, so they can compare what comes
out against the exact arrays that went in. Images are random (pixel-exact checks), alpha has 0, 255 and
partial values, depth is 16-bit with 0 where alpha is 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from core import manifest
from core.cameras import intrinsics, look_at, spherical_position


def view_name(i: int, views: int, kind: str) -> str:
    return f"{i:0{max(2, len(str(views - 1)))}d}.{kind}.png"


def write_render_folder(renders: Path, uid: str, views: int = 6, size: int = 32, ok: bool = True,
                        depth_scale: float = 10000.0, seed: int = 0, license: str = "by",
                        blocks: int = 1) -> dict[str, np.ndarray]:
    """Write renders/<uid>/ and return what was written: rgba [V,H,W,4] u8, depth [V,H,W] u16, normal, c2w, K.

    `blocks` > 1 makes images of constant blocks of that side (for resize checks).
    """
    rng = np.random.default_rng([seed, sum(map(ord, uid))])
    folder = renders / uid
    folder.mkdir(parents=True, exist_ok=True)
    n = size // blocks
    rgba = rng.integers(0, 256, (views, n, n, 4), dtype=np.uint8)
    rgba[..., 3] = rng.choice(np.array([0, 255, 128, 37], np.uint8), (views, n, n), p=[0.3, 0.5, 0.1, 0.1])
    rgba = rgba.repeat(blocks, 1).repeat(blocks, 2)
    depth = rng.integers(20000, 30000, (views, size, size), dtype=np.uint16)
    depth[rgba[..., 3] == 0] = 0
    normal = rng.integers(0, 256, (views, size, size, 3), dtype=np.uint8)
    c2w = np.stack([look_at(spherical_position(360.0 * i / views, 10.0 * i, 2.6)) for i in range(views)])
    K = np.stack([intrinsics(40.0, size)] * views)
    for i in range(views):
        Image.fromarray(rgba[i], "RGBA").save(folder / view_name(i, views, "rgba"))
        Image.fromarray(depth[i]).save(folder / view_name(i, views, "depth"))  # uint16 -> mode I;16
        Image.fromarray(normal[i], "RGB").save(folder / view_name(i, views, "normal"))
    np.savez(folder / "cameras.npz", c2w=c2w.astype(np.float32), K=K.astype(np.float32), width=size, height=size)
    np.savez(folder / "geometry.npz", vertices=rng.random((8, 3), dtype=np.float32) - 0.5,
             faces=np.array([[0, 1, 2], [2, 3, 0]], np.int32))
    meta = {"uid": uid, "source": "test", "license": license, "attribution": f"author of {uid}",
            "normalization": {"center": [0.0, 0.0, 0.0], "scale": 1.0}, "depth_scale": depth_scale,
            "render": {"resolution": size, "views": views}, "lighting": {}, "missing_textures": [],
            "quality": {"ok": ok, "flags": [] if ok else ["empty_views"]}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return {"rgba": rgba, "depth": depth, "normal": normal, "c2w": c2w.astype(np.float32), "K": K.astype(np.float32),
            "depth_scale": np.float32(depth_scale)}


def write_renders(out: Path, uids: list[str], failed: tuple[str, ...] = (), **kw) -> dict[str, dict]:
    """Render folders for `uids` plus OUT/manifest/render.parquet; `failed` uids get a failed row, no folder."""
    written = {u: write_render_folder(out / "renders", u, **kw) for u in uids}
    rows = [{"uid": u, "status": manifest.OK, "reason": ""} for u in uids]
    rows += [{"uid": u, "status": manifest.FAILED, "reason": "blender crashed"} for u in failed]
    old = manifest.read_rows(manifest.manifest_path(out, "render"))
    manifest.write_rows(manifest.manifest_path(out, "render"), manifest.merge(old, rows))
    return written

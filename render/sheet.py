"""Contact sheet: one PNG with a row per rendered asset (a few views, RGBA over a checkerboard) for a person.

Reads DESIGN render folders only (no Blender). A row is labelled with the uid and its quality flags, so a
flagged asset stands out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.io import atomic_path

LABEL_W = 160  # pixels of the label column


def checkerboard(size: int, cell: int = 8) -> np.ndarray:
    """[size,size,3] uint8 light/dark grey checks: shows transparency (straight alpha) as it is."""
    ij = (np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2
    return np.where(ij[..., None] == 0, 200, 150).astype(np.uint8).repeat(3, -1)


def composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA [H,W,4] uint8 over an RGB background [H,W,3] uint8 -> [H,W,3] uint8."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + background.astype(np.float32) * (1 - a)
    return np.round(out).astype(np.uint8)


def asset_tiles(folder: Path, views: int, tile: int) -> list[np.ndarray]:
    """Up to `views` evenly spaced views of one render folder as [tile,tile,3] uint8 tiles."""
    files = sorted(folder.glob("*.rgba.png"))
    if not files:
        return []
    pick = np.unique(np.linspace(0, len(files) - 1, min(views, len(files))).round().astype(int))
    bg = checkerboard(tile)
    out = []
    for i in pick:
        im = Image.open(files[i]).convert("RGBA").resize((tile, tile), Image.Resampling.BILINEAR)
        out.append(composite(np.asarray(im), bg))
    return out


def contact_sheet(folders: Sequence[str | Path], path: str | Path, views: int = 6, tile: int = 96) -> Path | None:
    """Write a contact sheet of `folders` (one row each) to `path` atomically; None if nothing to show."""
    rows = []
    for f in map(Path, folders):
        tiles = asset_tiles(f, views, tile)
        if tiles:
            rows.append((f, tiles))
    if not rows:
        return None
    width = LABEL_W + views * tile
    sheet = Image.new("RGB", (width, len(rows) * tile), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (f, tiles) in enumerate(rows):
        y = r * tile
        flags = ""
        meta = f / "meta.json"
        if meta.exists():
            q = json.loads(meta.read_text()).get("quality", {})
            flags = ",".join(q.get("flags", []))
        draw.text((4, y + 4), f.name[:22], fill=(0, 0, 0))
        if flags:
            draw.text((4, y + 20), flags[:24], fill=(200, 0, 0))
        for c, t in enumerate(tiles):
            sheet.paste(Image.fromarray(t), (LABEL_W + c * tile, y))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)

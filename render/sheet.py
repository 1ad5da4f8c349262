"""Contact sheet of render folders: one PNG with a row per rendered asset (a few views, RGBA over a
checkerboard) for a person. Drawn by core.sheets.

Reads render folders (docs/CONTRACTS.md) only, no Blender. A row is labelled with the folder name and its quality flags,
so a flagged asset stands out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.sheets import SheetRow, write_sheet

LABEL_W = 160  # pixels of the label column


def asset_tiles(folder: Path, views: int) -> list[np.ndarray]:
    """Up to `views` evenly spaced views of one render folder, RGBA uint8 (straight alpha)."""
    files = sorted(folder.glob("*.rgba.png"))
    if not files:
        return []
    pick = np.unique(np.linspace(0, len(files) - 1, min(views, len(files))).round().astype(int))
    return [np.asarray(Image.open(files[i]).convert("RGBA")) for i in pick]


def quality_flags(folder: Path) -> str:
    meta = folder / "meta.json"
    return ",".join(json.loads(meta.read_text()).get("quality", {}).get("flags", [])) if meta.exists() else ""


def contact_sheet(folders: Sequence[str | Path], path: str | Path, views: int = 6, tile: int = 96) -> Path | None:
    """Write a contact sheet of `folders` (one row each) to `path` atomically; None if nothing to show."""
    rows = []
    for f in map(Path, folders):
        tiles = asset_tiles(f, views)
        if tiles:
            rows.append(SheetRow(f.name[:22], tiles, note=quality_flags(f)[:24]))
    if not rows:
        return None
    return write_sheet(path, rows, tile=tile, columns=views, labels="left", label_width=LABEL_W)

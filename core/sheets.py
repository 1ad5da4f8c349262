"""One writer for every contact sheet: rows of labelled image tiles -> one PNG, written atomically.

The render stage (a row per asset, straight alpha over a checkerboard), evaluation (ground truth, then each
method) and reconstruction (input views, then the re-renders) all draw their pictures with `write_sheet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.io import atomic_path

LABEL_HEIGHT = 14  # pixels of the strip above a row with labels="above" (one line of PIL's default font)


@dataclass
class SheetRow:
    label: str  # drawn in black: in the label column, or above the row
    tiles: list[np.ndarray] = field(default_factory=list)  # uint8 [H,W,3] RGB or [H,W,4] straight-alpha RGBA
    note: str = ""  # a second line under the label, in red (e.g. quality flags); label column only


def checkerboard(size: int, cell: int = 8) -> np.ndarray:
    """[size,size,3] uint8 light/dark grey checks: shows transparency (straight alpha) as it is."""
    ij = (np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2
    return np.where(ij[..., None] == 0, 200, 150).astype(np.uint8).repeat(3, -1)


def composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA [H,W,4] uint8 over an RGB background [H,W,3] uint8 -> [H,W,3] uint8."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + background.astype(np.float32) * (1 - a)
    return np.round(out).astype(np.uint8)


def _tile_image(img: np.ndarray, tile: int) -> Image.Image:
    """One tile: resized (bilinear) to `tile` x `tile` when it is not; RGBA composited over a checkerboard."""
    im = Image.fromarray(np.ascontiguousarray(img))
    if im.size != (tile, tile):
        im = im.resize((tile, tile), Image.Resampling.BILINEAR)
    if im.mode == "RGBA":
        return Image.fromarray(composite(np.asarray(im), checkerboard(tile)))
    return im.convert("RGB")


def write_sheet(path: str | Path, rows: Sequence[SheetRow], *, tile: int | None = None, columns: int | None = None,
                labels: str = "left", label_width: int = 160) -> Path:
    """Draw `rows` as a grid of square tiles on white and write it to `path` (PNG, atomically).

    `tile`: tile side in pixels (default: the first tile's height; other sizes are resized). `columns`: tile
    slots per row (default: the longest row); slots a row has no tile for stay white. `labels="left"`: a
    label column `label_width` pixels wide (label at the top, `note` below it in red); `labels="above"`: a
    `LABEL_HEIGHT` strip above each row holding its label.
    """
    if labels not in ("left", "above"):
        raise ValueError(f"labels must be 'left' or 'above', got {labels!r}")
    first = next((t for r in rows for t in r.tiles), None)
    tile = tile or (first.shape[0] if first is not None else 64)
    columns = max(columns or 0, *(len(r.tiles) for r in rows), 1)
    left = label_width if labels == "left" else 0
    top = LABEL_HEIGHT if labels == "above" else 0
    sheet = Image.new("RGB", (left + columns * tile, len(rows) * (top + tile)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = r * (top + tile)
        if labels == "left":
            draw.text((4, y + 4), row.label, fill=(0, 0, 0))
            if row.note:
                draw.text((4, y + 20), row.note, fill=(200, 0, 0))
        else:
            draw.text((2, y + 1), row.label, fill=(0, 0, 0))
        for c, img in enumerate(row.tiles):
            sheet.paste(_tile_image(img, tile), (left + c * tile, y + top))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)

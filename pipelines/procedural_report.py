"""What `make data` writes about a procedural run, under OUT/procedural/: the description table, histograms of
parts, faces, primitive kinds, augmentations and texture kinds, and a contact sheet of random assets
rendered by the render stage.

- `assets.parquet`: one row per asset of the download manifest, the `description` JSON as typed columns
  (`DESCRIPTION_SCHEMA`), so evaluation (or a person) can split by kind: `pq.read_table(...).filter(...)`.
- `histograms.png`: drawn with PIL (no plotting library in the environment).
- `sheet.png`: `data.procedural_sheet_assets` assets drawn at random (seeded by `seed`), one view each,
  rendered by `pipelines.render.run` in a subprocess (`python -m pipelines.procedural_sheet`) so that the
  data stage itself never loads Blender; skipped with a message when bpy is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from core import manifest
from core.config import Config
from pipelines.procedural.recipe import AUGMENTATIONS, MAX_PARTS, PRIMITIVES
from pipelines.procedural.textures import TEXTURE_KINDS

_LIST = pa.list_(pa.string())
DESCRIPTION_SCHEMA = pa.schema([
    ("uid", pa.string()), ("status", pa.string()), ("name", pa.string()), ("preset", pa.string()),
    ("seed", pa.int64()), ("index", pa.int64()), ("difficulty", pa.float64()), ("parts", pa.int64()),
    ("kinds", _LIST), ("augmentations", _LIST), ("textures", _LIST), ("materials", pa.int64()),
    ("texture_size", pa.int64()), ("faces", pa.int64()), ("vertices", pa.int64()),
    ("components", pa.int64()), ("genus", pa.int64()), ("watertight", pa.bool_()), ("bytes", pa.int64()),
    ("fallbacks", _LIST),
])
SHEET_TIMEOUT_S = 1800.0  # the contact sheet's subprocess (64 Cycles renders at the run's settings)


def description_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Download rows (with a `description` JSON column) as a typed table; rows without one keep nulls."""
    out = []
    for r in rows:
        desc = json.loads(r["description"]) if r.get("description") else {}
        out.append({**{f: desc.get(f) for f in DESCRIPTION_SCHEMA.names}, "uid": r["uid"], "status": r["status"],
                    "name": r.get("name"), "bytes": r.get("bytes")})
    return pa.Table.from_pylist(out, schema=DESCRIPTION_SCHEMA)


def _counts(values: Iterable[Any], keys: Iterable[Any]) -> list[tuple[str, int]]:
    c = Counter(values)
    return [(str(k), int(c.get(k, 0))) for k in keys]


def face_bins(faces: Iterable[int]) -> list[tuple[str, int]]:
    """Face counts in doubling bins from 500 to 32k."""
    edges = [0, 500, 1000, 2000, 4000, 8000, 16000, 32000, np.inf]
    labels = ["<500", "<1k", "<2k", "<4k", "<8k", "<16k", "<32k", ">=32k"]
    idx = np.searchsorted(edges, np.asarray(list(faces), float), side="right") - 1
    return [(lab, int((idx == i).sum())) for i, lab in enumerate(labels)]


def histogram_panels(table: pa.Table) -> list[tuple[str, list[tuple[str, int]]]]:
    """(title, [(label, count)]) of every panel in `histograms.png`, from the ok rows of `table`."""
    rows = [r for r in table.to_pylist() if r["status"] == manifest.OK and r["parts"] is not None]
    return [
        ("parts per asset", _counts([r["parts"] for r in rows], range(1, MAX_PARTS + 1))),
        ("faces per asset", face_bins(r["faces"] for r in rows)),
        ("assets per texture kind", _counts([t for r in rows for t in set(r["textures"])], TEXTURE_KINDS)),
        ("parts per primitive kind", _counts([k for r in rows for k in r["kinds"]], PRIMITIVES)),
        ("assets per augmentation", _counts([a for r in rows for a in r["augmentations"]], AUGMENTATIONS)),
        ("components / genus / watertight",
         [(f"{c} comp", sum(r["components"] == c for r in rows)) for c in (1, 2, 3)]
         + [(">3 comp", sum((r["components"] or 0) > 3 for r in rows))]
         + [(f"genus {g}", sum(r["genus"] == g for r in rows)) for g in (0, 1)]
         + [("genus>1", sum((r["genus"] or 0) > 1 for r in rows)), ("watertight", sum(bool(r["watertight"]) for r in rows))]),
    ]


def draw_histograms(panels: list[tuple[str, list[tuple[str, int]]]], path: str | Path, total: int) -> Path:
    """Bar charts, three per row, each bar labelled with its count; written atomically as PNG."""
    from core.io import atomic_path

    pw, ph, cols = 420, 240, 3
    rows = (len(panels) + cols - 1) // cols
    img = Image.new("RGB", (pw * cols, ph * rows + 24), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((8, 6), f"procedural world: {total} assets", fill=(0, 0, 0))
    for k, (title, bars) in enumerate(panels):
        x0, y0 = (k % cols) * pw, 24 + (k // cols) * ph
        d.text((x0 + 10, y0 + 4), title, fill=(0, 0, 0))
        top = max([c for _, c in bars] + [1])
        bw = (pw - 30) / max(1, len(bars))
        base = y0 + ph - 46
        for i, (label, count) in enumerate(bars):
            bx = x0 + 20 + i * bw
            h = (ph - 80) * count / top
            d.rectangle([bx + 2, base - h, bx + bw - 3, base], fill=(70, 110, 180))
            d.text((bx + 2, base - h - 12), str(count), fill=(0, 0, 0))
            d.text((bx + 2, base + 4 + 12 * (i % 2)), label[:9], fill=(60, 60, 60))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def write_report(cfg: Config, rows: list[dict[str, Any]], sheet: bool = True) -> dict[str, Path]:
    """OUT/procedural/{assets.parquet, histograms.png, sheet.png} for the download rows of a procedural run."""
    root = cfg.out_path / "procedural"
    root.mkdir(parents=True, exist_ok=True)
    table = description_table(rows)
    written = {"table": manifest.write_rows(root / "assets.parquet", table.to_pylist(), schema=DESCRIPTION_SCHEMA)}
    ok = sum(r["status"] == manifest.OK for r in rows)
    written["histograms"] = draw_histograms(histogram_panels(table), root / "histograms.png", ok)
    if sheet and cfg.data.procedural_sheet_assets > 0 and ok:
        from pipelines.procedural_sheet import current

        if current(cfg)[2]:  # the sheet already shows these very files: no Blender
            written["sheet"] = root / "sheet.png"
            return written
        resolved = cfg.out_path / "configs" / "data.yaml"
        cmd = [sys.executable, "-m", "pipelines.procedural_sheet", "--out", str(cfg.out_path)]
        cmd += ["--config", str(resolved)] if resolved.is_file() else []
        try:
            proc = subprocess.run(cmd, timeout=SHEET_TIMEOUT_S, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            print(f"procedural: contact sheet not written (over {SHEET_TIMEOUT_S:.0f} s)", file=sys.stderr)
        else:
            if proc.returncode == 0 and (root / "sheet.png").is_file():
                written["sheet"] = root / "sheet.png"
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                print(f"procedural: contact sheet not written ({tail[0]})", file=sys.stderr)
    return written

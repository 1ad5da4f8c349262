"""Contact sheet of a procedural run: random assets rendered by the render stage, one view each, on a grid.

    python -m pipelines.procedural_sheet --out OUT [--config OUT/configs/data.yaml] [key=value ...]

Draws `data.procedural_sheet_assets` ok assets of OUT/manifest/download.parquet at random (seeded by
`seed`), renders them with `pipelines.render.run` (in-process Blender, one random view each at an
elevation of 15-35 degrees, at most 128² and 16 samples) under a scratch root OUT/procedural/sheet_run/
that is removed afterwards, and writes OUT/procedural/sheet.png: a grid of 8 columns, each tile labelled
with the asset's index and its primitive kinds. OUT/procedural/sheet.json records what it shows; a rerun
over the same files and settings renders nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core import manifest
from core.config import Config
from core.io import atomic_path, atomic_write_text

COLUMNS = 8
TILE = 112  # pixels per asset on the sheet
LABEL = 12  # pixels of caption under each tile


def pick(rows: list[dict], count: int, seed: int) -> list[dict]:
    """`count` ok rows drawn at random (seeded), in index order."""
    ok = sorted((r for r in rows if r["status"] == manifest.OK), key=lambda r: r["uid"])
    if not ok or count <= 0:
        return []
    idx = np.random.default_rng(seed).choice(len(ok), min(count, len(ok)), replace=False)
    chosen = [ok[i] for i in idx]
    return sorted(chosen, key=lambda r: json.loads(r.get("description") or "{}").get("index", 0))


def sheet_config(cfg: Config) -> Config:
    """The run's config with the sheet's render settings: one view from above the horizon, at most 128² and
    16 samples (a preview: a 112-pixel tile shows no more), in-process."""
    scfg = copy.deepcopy(cfg)
    r = scfg.render
    r.views, r.elevation_min_deg, r.elevation_max_deg = 1, 15.0, 35.0
    r.resolution, r.samples = min(r.resolution, 128), min(r.samples, 16)
    r.executor, r.sheet_assets = "local", 0
    return scfg


def sheet_key(cfg: Config, chosen: list[dict]) -> str:
    """What the sheet shows: the chosen files (uid + sha256) and the render settings; equal key, same sheet."""
    import hashlib

    from render.blender import output_hash  # the settings that change pixels, not threads or executors

    blob = json.dumps([[r["uid"], r.get("sha256") or ""] for r in chosen] + [output_hash(sheet_config(cfg).render)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def render_sample(cfg: Config, chosen: list[dict], scratch: Path) -> dict[str, Path]:
    """Render `chosen` download rows through the render stage under `scratch`; uid -> rgba PNG of its view."""
    from pipelines.download import DOWNLOAD_SCHEMA
    from pipelines.render import run as render_run

    rows = []
    for r in chosen:
        path = Path(r["path"])
        if not path.is_absolute():  # as the render stage resolves it: relative to OUT, else to here
            path = cfg.out_path / path if (cfg.out_path / path).exists() else path
        rows.append({**{f: r.get(f) for f in DOWNLOAD_SCHEMA.names}, "path": str(path.resolve())})
    manifest.write_rows(manifest.manifest_path(scratch, "download"), rows, schema=DOWNLOAD_SCHEMA)
    scfg = sheet_config(cfg)
    scfg.out = str(scratch)
    out = render_run(scfg, eval_mode=False, executor="local", progress=False)
    return {row["uid"]: scratch / "renders" / row["uid"] / "00.rgba.png" for row in out
            if row["status"] == manifest.OK}


def compose(chosen: list[dict], views: dict[str, Path], path: str | Path) -> Path:
    """The grid: each rendered view over white, captioned `#index kinds`; written atomically as PNG."""
    n = len(chosen)
    rows = (n + COLUMNS - 1) // COLUMNS
    sheet = Image.new("RGB", (COLUMNS * TILE, rows * (TILE + LABEL)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for k, r in enumerate(chosen):
        x, y = (k % COLUMNS) * TILE, (k // COLUMNS) * (TILE + LABEL)
        desc = json.loads(r.get("description") or "{}")
        if r["uid"] in views and views[r["uid"]].is_file():
            rgba = Image.open(views[r["uid"]]).convert("RGBA").resize((TILE, TILE), Image.Resampling.LANCZOS)
            tile = Image.new("RGB", (TILE, TILE), (255, 255, 255))
            tile.paste(rgba, (0, 0), rgba)
            sheet.paste(tile, (x, y))
        else:
            d.text((x + 4, y + TILE // 2), "render failed", fill=(200, 0, 0))
        kinds = ",".join(k[:4] for k in dict.fromkeys(desc.get("kinds", [])))
        d.text((x + 2, y + TILE), f"#{desc.get('index', '?')} {kinds}"[:22], fill=(40, 40, 40))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG", optimize=True)
    return Path(path)


def current(cfg: Config) -> tuple[list[dict], str, bool]:
    """(the rows the sheet shows, their key, whether OUT/procedural/sheet.png already shows exactly them)."""
    rows = manifest.read_rows(manifest.manifest_path(cfg.out, "download"))
    chosen = pick(rows, cfg.data.procedural_sheet_assets, cfg.seed)
    key = sheet_key(cfg, chosen)
    root = cfg.out_path / "procedural"
    stamp, sheet = root / "sheet.json", root / "sheet.png"
    done = bool(chosen) and sheet.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key
    return chosen, key, done


def make_sheet(cfg: Config) -> Path | None:
    """Render and compose OUT/procedural/sheet.png for the run under `cfg.out`; None if there is nothing."""
    chosen, key, done = current(cfg)
    root = cfg.out_path / "procedural"
    stamp, sheet = root / "sheet.json", root / "sheet.png"
    if not chosen:
        return None
    if done:
        return sheet  # a rerun over the same assets: nothing to render
    scratch = root / "sheet_run"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        views = render_sample(cfg, chosen, scratch)
        compose(chosen, views, sheet)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    atomic_write_text(stamp, json.dumps({"key": key, "uids": [r["uid"] for r in chosen],
                                         "rendered": sorted(views)}, indent=1))
    return sheet


def main(argv: list[str] | None = None) -> int:
    from core.cli import config_from_args, stage_parser

    args = stage_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    cfg = config_from_args(args)
    path = make_sheet(cfg)
    print(f"procedural sheet: {path or 'nothing to show'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

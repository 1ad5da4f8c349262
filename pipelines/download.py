"""The download stage: fetch, generate or link every kept asset into OUT/assets, verified, one row per uid.

`download(cfg, kept)` runs the source's fetch step over the kept candidates through the executor and
writes `OUT/manifest/download.parquet` (schema `DOWNLOAD_SCHEMA`). A rerun keeps rows that are `ok` and
whose file is still there, and redoes the rest. The manifest is flushed while the job runs, and every asset
is written under a temporary name and renamed, so a SIGKILL leaves nothing a rerun would take as done.
The checks and placement each source's step uses are in pipelines/assets.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from core import manifest
from core.config import Config
from core.io import clean_temporaries
from core.lock import stage_lock
from pipelines.executor import run_step
from pipelines.sources import fetch_step

DOWNLOAD_SCHEMA = pa.schema([
    ("uid", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("source", pa.string()), ("name", pa.string()), ("license", pa.string()), ("attribution", pa.string()),
    ("author", pa.string()), ("source_url", pa.string()),  # for the dataset card (pipelines/card.py)
    ("format", pa.string()), ("path", pa.string()),  # path: the main file later stages open
    ("bytes", pa.int64()), ("sha256", pa.string()), ("seconds", pa.float64()),
    ("description", pa.string()),  # procedural: JSON of parts, kinds, augmentations, textures, ... (else null)
])


def _carry(item: dict, row: dict) -> dict:
    """Complete a step's row with the item's identity columns (license and attribution travel on)."""
    out = {k: item.get(k) for k in ("source", "name", "license", "attribution", "author", "source_url", "format")}
    out.update({k: v for k, v in row.items() if k in DOWNLOAD_SCHEMA.names})
    out["uid"] = item["uid"]
    return out


def done_rows(out: str | Path) -> dict[str, dict]:
    """Rows of an earlier run that are ok and whose file still exists: a rerun keeps them."""
    rows = manifest.read_rows(manifest.manifest_path(out, "download"))
    return {r["uid"]: r for r in rows if r["status"] == manifest.OK and r.get("path") and Path(r["path"]).exists()}


def download(cfg: Config, kept: list[dict], flush_every_s: float = 2.0) -> list[dict]:
    """Fetch every kept candidate (dicts from the filter's `ok` rows); write and return download rows.
    Holds OUT's `data` lock (core.lock): another run's cleanup never meets this one's temporaries."""
    with stage_lock(cfg.out_path, "data"):
        return _download(cfg, kept, flush_every_s)


def _download(cfg: Config, kept: list[dict], flush_every_s: float) -> list[dict]:
    out = cfg.out_path
    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    clean_temporaries(assets)  # leftovers of a killed run; never taken as done
    path = manifest.manifest_path(out, "download")
    previous = manifest.read_rows(path)
    keep = done_rows(out)
    todo = [it for it in kept if it["uid"] not in keep]
    step, kwargs = fetch_step(cfg)
    fresh: list[dict] = []
    last = [time.monotonic(), 0.0]  # end of the last flush, its duration

    def flush() -> None:
        t0 = time.monotonic()
        manifest.write_rows(path, _normalise(manifest.merge(previous, fresh)), schema=DOWNLOAD_SCHEMA)
        last[:] = [time.monotonic(), time.monotonic() - t0]

    def on_row(item: dict, row: dict) -> None:
        fresh.append(_carry(item, row))
        # a flush rewrites the whole table (~1.7 s at 10^5 rows): at most ~10 % of the driver's time
        if time.monotonic() - last[0] > max(flush_every_s, 10 * last[1]):
            flush()

    d = cfg.data
    run_step(step, todo, executor=d.executor, workers=d.workers, batch_size=d.download_batch,
             timeout_s=d.download_timeout_s * max(1, d.download_retries), kwargs=kwargs,
             desc=f"download ({cfg.source})", on_row=on_row)
    rows = manifest.merge(previous, fresh)
    uids = {it["uid"] for it in kept}
    rows = [r for r in rows if r["uid"] in uids]  # the table describes this run's selection
    flush_rows = _normalise(rows)
    manifest.write_rows(path, flush_rows, schema=DOWNLOAD_SCHEMA)
    return flush_rows


def _normalise(rows: list[dict]) -> list[dict]:
    names = DOWNLOAD_SCHEMA.names
    out = []
    for r in rows:
        row = {k: r.get(k) for k in names}
        row["reason"] = row["reason"] or ""
        out.append(row)
    return out

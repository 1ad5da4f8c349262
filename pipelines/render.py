"""`make render`: render every `ok` asset of OUT/manifest/download.parquet with Blender, resumably.

    python -m pipelines.render [--eval] [--config C] [--out OUT] [key=value ...]

Training mode writes OUT/renders/<uid>/ (random views seeded by the uid) and OUT/manifest/render.parquet;
`--eval` writes OUT/renders_eval/<uid>/{orbit,inputs}/ (the contract's 20-view orbit and 4 input views) and
OUT/manifest/render_eval.parquet. The step is `render.blender.render_asset` (no Ray), held by a stateful
executor worker (`RenderWorker`: one bpy, asset after asset). `render.executor`: `ray` (default; Ray
actors) or `process` (worker processes) kill and replace a renderer after a per-asset timeout, a crash, or
a failed scene reset; `local` renders in this process, without a timeout (for debugging).

Every asset folder is written under a temporary name and renamed when complete, so a rerun (also after
SIGKILL) skips complete folders rendered with the same output settings and renders the rest once.
The manifest is flushed during the job and rebuilt from meta.json for folders it missed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from core import manifest as mf
from core.cameras import eval_input_views, eval_views, random_views
from core.cli import config_from_args, save_resolved, stage_parser
from core.config import Config, RenderConfig, check_executor
from core.io import clean_temporaries
from core.layout import UID_RE
from core.lock import stage_lock
from pipelines.executor import run_workers
from render.blender import bpy_module, output_hash, render_asset
from render.sheet import contact_sheet

# Every row has exactly these columns (parquet needs one schema), in this order.
ROW_DEFAULTS: dict[str, Any] = {
    "uid": "", "status": mf.FAILED, "reason": "", "seconds": 0.0, "views": 0, "faces": 0, "vertices": 0,
    "missing_textures": 0, "quality_ok": False, "quality_flags": "", "device": "", "path": "",
    "source": "", "license": "", "attribution": "", "rendered": False,
}


def normalise_row(row: dict[str, Any], job: dict[str, Any] | None = None) -> dict[str, Any]:
    out = dict(ROW_DEFAULTS)
    for k in ("source", "license", "attribution"):
        if job is not None:
            out[k] = str(job.get(k) or "")
    out.update({k: v for k, v in row.items() if k in ROW_DEFAULTS})
    return out


def view_sets(uid: str, cfg: RenderConfig, eval_mode: bool) -> dict[str, np.ndarray]:
    """Subfolder -> OpenCV c2w [V,4,4]: "" for the random training views, orbit/inputs for evaluation."""
    if eval_mode:
        return {"orbit": eval_views(cfg.eval_protocol, cfg.eval_orbit_views, cfg.eval_distance,
                                    cfg.eval_grid_distance)["c2w"],
                "inputs": eval_input_views(cfg.eval_input_elevation_deg, cfg.eval_distance)["c2w"]}
    return {"": random_views(uid, cfg.views, (cfg.distance_min, cfg.distance_max),
                             (cfg.elevation_min_deg, cfg.elevation_max_deg))["c2w"]}


def render_root(cfg: Config, eval_mode: bool) -> Path:
    return cfg.out_path / ("renders_eval" if eval_mode else "renders")


def done_meta(folder: Path, eval_mode: bool, want_hash: str) -> dict | None:
    """meta.json of a complete folder rendered with the current output settings, else None."""
    meta = folder / ("orbit/meta.json" if eval_mode else "meta.json")
    if not meta.is_file():
        return None
    try:
        m = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if m.get("render", {}).get("output_hash") == want_hash else None


def row_from_meta(uid: str, folder: Path, meta: dict, job: dict) -> dict[str, Any]:
    q = meta.get("quality", {})
    return normalise_row({"uid": uid, "status": mf.OK, "views": meta.get("render", {}).get("views", 0),
                          "faces": meta.get("geometry", {}).get("faces", 0),
                          "vertices": meta.get("geometry", {}).get("vertices", 0),
                          "missing_textures": len(meta.get("missing_textures", [])),
                          "quality_ok": bool(q.get("ok", False)), "quality_flags": ",".join(q.get("flags", [])),
                          "device": meta.get("render", {}).get("device", ""), "path": str(folder)}, job)


def plan(cfg: Config, eval_mode: bool) -> tuple[list[dict], list[dict]]:
    """(jobs to render, rows of assets already complete or refused) from the download manifest.

    A uid that is not `core.layout.UID_RE` (a path separator, `..`, a dot) names no folder: it is a failed
    row with that reason, never a path, and the other assets render."""
    want = output_hash(cfg.render, eval_mode)
    root = render_root(cfg, eval_mode)
    src = mf.manifest_path(cfg.out, "download")
    if not src.exists():
        raise SystemExit(f"error: {src} not found; run `make data` first")
    jobs, done = [], []
    for r in mf.read_rows(src):
        if r.get("status") != mf.OK:
            continue
        uid = str(r["uid"])
        if not UID_RE.match(uid):
            done.append(normalise_row({"uid": uid, "reason": f"unsafe uid {uid[:80]!r}: not [A-Za-z0-9_-]{{1,64}}; "
                                       "not rendered"}, r))
            continue
        folder = root / uid
        meta = done_meta(folder, eval_mode, want)
        if meta is not None:
            done.append(row_from_meta(uid, folder, meta, r))
        else:
            path = Path(r["path"] or "")
            if not path.is_absolute():  # relative to OUT, else to the working directory
                path = cfg.out_path / path if (cfg.out_path / path).exists() else path
            # Absolute paths: Ray workers need not share the driver's working directory.
            jobs.append({**r, "uid": uid, "path": str(path.resolve()), "dest": str(folder.resolve())})
    return jobs, done


def threads_per_renderer(cfg: RenderConfig, renderers: int) -> int:
    return cfg.threads if cfg.threads > 0 else max(1, (os.cpu_count() or 1) // max(1, renderers))


def cap_memory(extra_bytes: int) -> int:
    """Cap this process's address space (RLIMIT_AS) at what it maps now plus `extra_bytes`; return the cap.

    Called in a renderer's own process (a worker process or a Ray actor) once bpy is loaded, so the cap is
    on what one asset may add; an allocation past it fails (a MemoryError in Python, a failed allocation in
    Blender, which may end the process): either way that asset's row fails and the renderer is replaced.
    """
    import resource

    with open("/proc/self/statm") as f:  # first field: total program size in pages
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = mapped + extra_bytes
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


class RenderWorker:
    """A stateful executor worker: holds one bpy for its lifetime and renders the assets it is given."""

    def __init__(self, cfg: dict, threads: int, eval_mode: bool, max_file_bytes: int,
                 cap_memory: bool = False) -> None:
        self.cfg, self.threads, self.eval_mode = RenderConfig(**cfg), threads, eval_mode
        self.max_file_bytes = max_file_bytes
        self.cap = cap_memory

    def ready(self) -> None:
        """Import bpy (the slow part of a renderer's start) before the first asset's timeout starts; then cap
        this renderer's memory (render.max_memory_bytes; only in a process of its own: process, ray)."""
        bpy_module()
        if self.cap and self.cfg.max_memory_bytes > 0:
            cap_memory(self.cfg.max_memory_bytes)

    def __call__(self, job: dict) -> dict:
        return render_asset(job, job["dest"], self.cfg, view_sets(job["uid"], self.cfg, self.eval_mode),
                            self.threads, eval_mode=self.eval_mode, max_file_bytes=self.max_file_bytes)


def reset_failed(row: Any) -> bool:
    """A renderer whose bpy could not reset after its asset (or ran out of memory) holds unknown state: do
    not give it another."""
    return isinstance(row, dict) and bool(row.get("reset_failed") or row.get("retire"))


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------


def run(cfg: Config, eval_mode: bool = False, executor: str | None = None, flush_s: float = 10.0,
        progress: bool = True) -> list[dict]:
    """Render what is left; write the manifest and the contact sheet; return all rows of this stage.

    `executor` overrides render.executor (local | process | ray). One run per OUT and mode at a time
    (core.lock: a second one waits, then finds the work done)."""
    with stage_lock(cfg.out_path, "render_eval" if eval_mode else "render"):
        return _run(cfg, eval_mode, executor, flush_s, progress)


def _run(cfg: Config, eval_mode: bool, executor: str | None, flush_s: float, progress: bool) -> list[dict]:
    rc = cfg.render
    executor = check_executor(executor or rc.executor, "render.executor")
    root = render_root(cfg, eval_mode)
    root.mkdir(parents=True, exist_ok=True)
    clean_temporaries(root)  # leftovers of a killed run are never taken as done
    stage = "render_eval" if eval_mode else "render"
    table = mf.manifest_path(cfg.out, stage)
    jobs, done = plan(cfg, eval_mode)
    old = mf.read_rows(table)
    new: list[dict] = list(done)
    last_flush = [time.monotonic()]

    def flush() -> None:
        mf.write_rows(table, mf.merge(old, new))
        last_flush[0] = time.monotonic()

    def on_row(job: dict, row: dict) -> None:
        if row.get("reset_failed"):
            print(f"render: warning: scene reset failed after {job['uid']} ({row.get('reset_reason', '')}); "
                  "its renderer is replaced", file=sys.stderr)
        if row.get("status") != mf.OK and str(row.get("reason", "")).startswith("timeout"):
            row = {**row, "seconds": rc.timeout_s}
        elif row.get("status") != mf.OK and str(row.get("reason", "")).startswith("worker died") \
                and executor != "local" and rc.max_memory_bytes > 0:
            # Blender ends the process on an allocation it cannot make: most likely the memory cap
            row = {**row, "reason": f"{row['reason']}; render.max_memory_bytes={rc.max_memory_bytes} may have been "
                                    "reached (or Blender crashed on the file)"}
        r = normalise_row({**row, "rendered": row.get("status") == mf.OK,
                           "path": job["dest"] if row.get("status") == mf.OK else ""}, job)
        new.append(r)
        if time.monotonic() - last_flush[0] > flush_s:
            flush()

    renderers = 1 if executor == "local" else max(1, min(rc.workers, len(jobs)))
    make = partial(RenderWorker, dataclasses.asdict(rc), threads_per_renderer(rc, renderers), eval_mode,
                   cfg.data.max_file_bytes, executor != "local")
    try:
        # bpy's import is the slow part of a renderer's start (seconds, more on a busy machine)
        run_workers(make, jobs, executor=executor, workers=renderers, timeout_s=rc.timeout_s, retire=reset_failed,
                    desc=stage, on_row=on_row, progress=progress, start_timeout_s=300.0)
    finally:
        flush()
    rows = mf.merge(old, new)
    ok = sorted(r["uid"] for r in rows if r["status"] == mf.OK and (root / r["uid"]).is_dir())
    if ok:
        pick = ok[:: max(1, len(ok) // max(1, rc.sheet_assets))][: rc.sheet_assets]
        folders = [root / u / "orbit" if eval_mode else root / u for u in pick]
        contact_sheet(folders, root / "sheet.png", views=rc.sheet_views)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__.split("\n\n")[0])
    p.add_argument("--eval", action="store_true", help="render the evaluation orbit + 4 input views instead")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    save_resolved(cfg, "render_eval" if args.eval else "render")
    rows = run(cfg, eval_mode=args.eval)
    flagged = sum(1 for r in rows if r["status"] == mf.OK and not r["quality_ok"])
    print(f"render: {mf.summary(rows)}; {flagged} ok but quality-flagged -> "
          f"{mf.manifest_path(cfg.out, 'render_eval' if args.eval else 'render')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

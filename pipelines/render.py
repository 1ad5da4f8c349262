"""`make render`: render every `ok` asset of OUT/manifest/download.parquet with Blender, resumably.

    python -m pipelines.render [--eval] [--no-ray] [--config C] [--out OUT] [key=value ...]

Training mode writes OUT/renders/<uid>/ (random views seeded by the uid) and OUT/manifest/render.parquet;
`--eval` writes OUT/renders_eval/<uid>/{orbit,inputs}/ (DESIGN's 20-view orbit and 4 input views) and
OUT/manifest/render_eval.parquet. The step is `render.blender.render_asset` (no Ray). Here it is scheduled
either on Ray actors, each holding one bpy and rendering asset after asset, with a per-asset timeout after
which (or after a crash) the actor is killed and replaced, or in-process (`--no-ray` / render.executor=local).

Every asset folder is written under a temporary name and renamed when complete, so a rerun (also after
SIGKILL) skips complete folders rendered with the same output settings and renders the rest once.
The manifest is flushed during the job and rebuilt from meta.json for folders it missed.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core import manifest as mf
from core.cameras import eval_input_views, orbit_views, random_views
from core.cli import config_from_args, save_resolved, stage_parser
from core.config import Config, RenderConfig
from core.io import clean_temporaries

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
        return {"orbit": orbit_views(cfg.eval_orbit_views, cfg.eval_distance)["c2w"],
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
    """(jobs to render, rows of assets already complete) from the download manifest."""
    from render.blender import output_hash

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
        if not uid or "/" in uid or uid.startswith("."):
            raise SystemExit(f"error: unsafe uid {uid!r} in {src}")
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


# ----------------------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------------------


def render_local(jobs: Sequence[dict], cfg: RenderConfig, eval_mode: bool,
                 on_row: Callable[[dict, dict], None]) -> None:
    """In-process: one bpy in this process, asset after asset (no protection against a hang)."""
    from render.blender import render_asset

    threads = threads_per_renderer(cfg, 1)
    for job in jobs:
        row = render_asset(job, job["dest"], cfg, view_sets(job["uid"], cfg, eval_mode), threads,
                           eval_mode=eval_mode)
        on_row(job, row)
        if _reset_failed(row):  # one bpy per process here: the next asset's own reset is the retry
            print(f"render: warning: scene reset failed after {job['uid']} ({row.get('reset_reason', '')}); "
                  "the next asset resets again", file=sys.stderr)


class RenderActor:
    """Body of a Ray actor: holds one bpy for its lifetime and renders the assets it is given."""

    def __init__(self, cfg: dict, threads: int, eval_mode: bool) -> None:
        self.cfg, self.threads, self.eval_mode = RenderConfig(**cfg), threads, eval_mode

    def render(self, job: dict) -> dict:
        from render.blender import render_asset

        return render_asset(job, job["dest"], self.cfg, view_sets(job["uid"], self.cfg, self.eval_mode),
                            self.threads, eval_mode=self.eval_mode)

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    def ready(self) -> int:
        """Import bpy (the slow part of an actor's start) and return the process id."""
        import bpy  # noqa: F401

        return os.getpid()


def run_actor_pool(items: Sequence[Any], make_actor: Callable[[], Any], submit: Callable[[Any, Any], Any],
                   on_result: Callable[[Any, Any, str | None], None], actors: int, timeout_s: float,
                   ping: Callable[[Any], Any] | None = None, start_timeout_s: float = 300.0,
                   retire: Callable[[Any], bool] | None = None) -> None:
    """Feed `items` one at a time to `actors` Ray actors; `on_result(item, result, error)` for each.

    An item running longer than `timeout_s`, or whose actor dies, gets `error` set; that actor is killed
    and replaced and the job goes on. `ping(actor)` (an object ref) is awaited before an actor gets work,
    so its start (importing bpy) does not count against the first item's timeout. An actor whose result
    makes `retire(result)` true (its renderer could not reset) is killed and replaced after reporting the
    result, instead of getting the next item. An exception raised
    inside the method (a bug, since the step catches per-asset errors itself) propagates after every actor
    is killed.
    """
    import ray
    from ray.exceptions import RayActorError

    def started(new: list[Any]) -> list[Any]:
        if ping is not None:
            ray.get([ping(a) for a in new], timeout=start_timeout_s)
        return new

    idle, pending = started([make_actor() for _ in range(max(1, min(actors, len(items))))]), deque(items)
    running: dict[Any, tuple[Any, Any, float]] = {}  # object ref -> (actor, item, start)

    def replace(actor: Any) -> None:
        ray.kill(actor, no_restart=True)
        idle.extend(started([make_actor()]))

    try:
        while pending or running:
            while pending and idle:
                actor, item = idle.pop(), pending.popleft()
                running[submit(actor, item)] = (actor, item, time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                actor, item, _t0 = running.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError as e:
                    on_result(item, None, f"renderer crashed ({type(e).__name__}); actor replaced")
                    replace(actor)
                    continue
                on_result(item, result, None)
                if retire is not None and retire(result):
                    replace(actor)
                else:
                    idle.append(actor)
            now = time.monotonic()
            for ref, (actor, item, t0) in list(running.items()):
                if now - t0 > timeout_s:
                    running.pop(ref)
                    on_result(item, None, f"timeout after {timeout_s:g} s; actor replaced")
                    replace(actor)
    finally:
        for actor, _, _ in running.values():
            ray.kill(actor, no_restart=True)
        for actor in idle:
            ray.kill(actor, no_restart=True)


def render_ray(jobs: Sequence[dict], cfg: RenderConfig, eval_mode: bool,
               on_row: Callable[[dict, dict], None]) -> None:
    """Ray actors, each holding one bpy (pipelines.executor.init_ray decides local vs cluster)."""
    import dataclasses

    from pipelines.executor import init_ray

    n = max(1, min(cfg.actors, len(jobs)))
    ray = init_ray(num_cpus=max(n, os.cpu_count() or 1))
    threads = threads_per_renderer(cfg, n)
    actor_cls = ray.remote(num_cpus=1, max_restarts=0)(RenderActor)
    cfg_dict = dataclasses.asdict(cfg)

    def result(job: dict, row: dict | None, error: str | None) -> None:
        on_row(job, row if row is not None else {"uid": job["uid"], "status": mf.FAILED, "reason": error,
                                                 "seconds": cfg.timeout_s if error.startswith("timeout") else 0.0})

    run_actor_pool(jobs, lambda: actor_cls.remote(cfg_dict, threads, eval_mode),
                   lambda a, job: a.render.remote(job), result, n, cfg.timeout_s, ping=lambda a: a.ready.remote(),
                   retire=_reset_failed)


def _reset_failed(row: Any) -> bool:
    """A renderer whose bpy could not reset after its asset holds unknown state: do not give it another."""
    return isinstance(row, dict) and bool(row.get("reset_failed"))


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------


def run(cfg: Config, eval_mode: bool = False, use_ray: bool | None = None, flush_s: float = 10.0,
        progress: bool = True) -> list[dict]:
    """Render what is left; write the manifest and the contact sheet; return all rows of this stage."""
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

    bar = tqdm(total=len(jobs), desc=stage, unit="asset", disable=not progress, dynamic_ncols=True)
    counts = {mf.OK: 0, mf.FAILED: 0}

    def on_row(job: dict, row: dict) -> None:
        r = normalise_row({**row, "rendered": row.get("status") == mf.OK,
                           "path": job["dest"] if row.get("status") == mf.OK else ""}, job)
        new.append(r)
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        bar.update(1)
        bar.set_postfix(ok=counts[mf.OK], failed=counts[mf.FAILED])
        if time.monotonic() - last_flush[0] > flush_s:
            flush()

    use_ray = (cfg.render.executor == "ray") if use_ray is None else use_ray
    try:
        if jobs:
            (render_ray if use_ray else render_local)(jobs, cfg.render, eval_mode, on_row)
    finally:
        bar.close()
        flush()
    rows = mf.merge(old, new)
    ok = sorted(r["uid"] for r in rows if r["status"] == mf.OK and (root / r["uid"]).is_dir())
    if ok:
        from render.sheet import contact_sheet

        pick = ok[:: max(1, len(ok) // max(1, cfg.render.sheet_assets))][: cfg.render.sheet_assets]
        folders = [root / u / "orbit" if eval_mode else root / u for u in pick]
        contact_sheet(folders, root / "sheet.png", views=cfg.render.sheet_views)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__.split("\n\n")[0])
    p.add_argument("--eval", action="store_true", help="render the evaluation orbit + 4 input views instead")
    p.add_argument("--no-ray", action="store_true", help="render in-process (same as render.executor=local)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if cfg.render.executor not in ("ray", "local"):
        print(f"error: render.executor must be ray or local, got {cfg.render.executor!r}", file=sys.stderr)
        return 2
    save_resolved(cfg, "render_eval" if args.eval else "render")
    rows = run(cfg, eval_mode=args.eval, use_ray=False if args.no_ray else None)
    flagged = sum(1 for r in rows if r["status"] == mf.OK and not r["quality_ok"])
    print(f"render: {mf.summary(rows)}; {flagged} ok but quality-flagged -> "
          f"{mf.manifest_path(cfg.out, 'render_eval' if args.eval else 'render')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

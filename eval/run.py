"""`make eval`: reconstruct the evaluation set from its 4 input views, re-render the 20 orbit views, score, report.

    python -m eval.run [--config C] [--out OUT] [--source S] [--checkpoint CKPT] [--nerf-checkpoint CKPT]
                       [key=value ...]

The eval set (core/evalsets.py, docs/eval.md "Evaluation sets"): `--source` / SOURCE= when given, else
eval.source (default `procedural` = held-out procedural indices training never generates); `val` = the val
split of the training shards. It must be built first, under OUT/evalsets/<slug>/, by `make render-eval`
with the same SOURCE (python -m pipelines.evalset; `make eval` runs it first); an unbuilt set is an error.
Methods (config eval.methods, plus Table 3's rows with eval.ablation=true): `feedforward` and
`refined` from the mesh-stage checkpoint (eval.checkpoint, default the newest under OUT/runs/mesh),
`nerf_mc` = the stage-1 NeRF checkpoint's triplane meshed by marching cubes without stage 2 (newest under
OUT/runs/nerf), `refined_color` / `refined_triplane` = refinement of one part only. Writes under OUT/eval/:
report.{md,csv,json} (naming the eval set, with a leak check against OUT/shards/index.parquet),
sheets/<uid>.png, meshes/<uid>.<method>.glb (eval.mesh_export), views/<method>/<uid>/NN.png (RGBA, the
ground truth's size and order) and rows/<slug>/<method>/<uid>.json (one finished row each, with the
sha256 of the checkpoint's weights that made it: a rerun skips a row whose weights are the same bytes
and whose view files are all there, and redoes any other, also after retraining into the same step-N/).
One `make eval` per OUT at a time (core.lock).
Any per-asset failure (download, render, reconstruction, scoring) becomes a row with its reason; the report
is always written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.cli import config_from_args, save_resolved, stage_parser
from core.config import Config
from core.evalsets import EvalSetError, describe, leak_check, load_built
from core.io import atomic_write_bytes, atomic_write_text, sha256_file
from core.lock import stage_lock
from eval import geometry as G
from eval.metrics import Lpips, composite_on_white, image_metrics, mean_finite
from eval.report import contact_sheet, write_report
from training.inference import export_glb, glb_bytes, load_model, query_colors, read_views, reconstruct

ABLATION = {"refined_color": "color", "refined_triplane": "triplane"}


def methods_of(cfg: Config) -> list[str]:
    ms = list(cfg.eval.methods)
    if cfg.eval.ablation:
        ms += [m for m in ABLATION if m not in ms]
    unknown = [m for m in ms if m not in ("feedforward", "refined", "nerf_mc", *ABLATION)]
    if unknown:
        raise ValueError(f"unknown eval methods {unknown}")
    if cfg.eval.mesh_export not in ("vertex", "texture", "none"):
        raise ValueError(f"eval.mesh_export must be vertex, texture or none, got {cfg.eval.mesh_export!r}")
    return ms


def load_ground_truth(folder: Path) -> dict:
    """Orbit RGBA [V,H,W,4] uint8, cameras, and the mesh (orbit/geometry.npz, else inputs/ or the asset folder)."""
    orbit = folder / "orbit"
    with np.load(orbit / "cameras.npz", allow_pickle=False) as z:
        c2w, K = z["c2w"].astype(np.float32), z["K"].astype(np.float32)
    paths = sorted(orbit.glob("*.rgba.png"))
    if len(paths) != len(c2w):
        raise ValueError(f"{orbit}: {len(c2w)} cameras but {len(paths)} images")
    rgba = np.stack([np.asarray(Image.open(p).convert("RGBA")) for p in paths])
    geom = next((p for p in (orbit / "geometry.npz", folder / "inputs" / "geometry.npz", folder / "geometry.npz")
                 if p.is_file()), None)
    return {"rgba": rgba, "c2w": c2w, "K": K, "geometry": geom}


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def evaluate_one(uid: str, method: str, model, gt: dict, views, cfg: Config, lpips: Lpips, out: Path) -> tuple[dict, np.ndarray]:
    """Reconstruct, re-render, score one (asset, method). -> (row, predicted RGBA views)."""
    t = {}
    images = torch.from_numpy(np.concatenate([views.rgb, views.mask[..., None]], -1)).permute(0, 3, 1, 2)
    refine = method not in ("feedforward", "nerf_mc")
    res = reconstruct(model, images, torch.from_numpy(views.c2w), torch.from_numpy(views.K), cfg, refine=refine,
                      tune=ABLATION.get(method, "both") if refine else None)
    t.update({f"t_{k}": v for k, v in res.timings.items()})
    size = gt["rgba"].shape[1]
    s = time.perf_counter()
    pred = res.render_rgba(model, gt["c2w"], gt["K"], size)
    t["t_render"] = time.perf_counter() - s
    for i, img in enumerate(pred):
        atomic_write_bytes(out / "views" / method / uid / f"{i:02d}.png", _png(img))
    s = time.perf_counter()
    im = image_metrics(composite_on_white(pred), composite_on_white(gt["rgba"]), lpips)
    row = {"uid": uid, "method": method, "status": "ok", "reason": "", "notes": "",
           **{k: mean_finite(v) if k == "psnr" else float(np.mean(v)) for k, v in im.items()}}
    if not np.isfinite(row.get("lpips_vgg", 0.0)):
        row["notes"] = f"LPIPS not scored: {size}² views are below {Lpips.MIN_SIZE}²"
    t["t_image_metrics"] = time.perf_counter() - s
    s = time.perf_counter()
    verts, faces = res.verts.cpu().numpy().astype(np.float64), res.faces.cpu().numpy()
    try:
        if gt["geometry"] is None:
            raise G.GeometryError("ground truth geometry.npz is missing")
        g = G.evaluate_geometry(G.check_mesh(verts, faces, "predicted mesh"), G.load_mesh(gt["geometry"], "ground truth"),
                                cfg.eval.points, cfg.eval.fscore_threshold, cfg.eval.iou_resolution,
                                cfg.eval.icp_iterations, seed=cfg.seed,
                                iou_points_resolution=cfg.eval.iou_points_resolution)
        notes = "; ".join(filter(None, [row["notes"], g.pop("notes")]))
        row.update({k: v for k, v in g.items() if k not in ("pred_watertight", "gt_watertight")}, notes=notes)
    except G.GeometryError as e:
        row["notes"] = "; ".join(filter(None, [row["notes"], f"geometry not scored: {e}"]))
    t["t_geometry"] = time.perf_counter() - s
    s = time.perf_counter()
    glb = out / "meshes" / f"{uid}.{method}.glb"
    with torch.no_grad():
        if cfg.eval.mesh_export == "texture":  # decimated first (refine.export_faces): seconds, not minutes
            export_glb(glb, verts.astype(np.float32), faces, res.color_fn(model),
                       texture_size=cfg.refine.texture_size, texture_png=False, max_faces=cfg.refine.export_faces)
        elif cfg.eval.mesh_export == "vertex":
            colors = query_colors(res.color_fn(model), verts.astype(np.float32))
            atomic_write_bytes(glb, glb_bytes(verts.astype(np.float32), faces, vertex_colors=colors))
    t["t_export"] = time.perf_counter() - s
    row.update(t)
    return row, pred


def _load(checkpoint: str, default: Path, cfg: Config):
    path = Path(checkpoint) if checkpoint else default
    return load_model(path, cfg, "cuda" if torch.cuda.is_available() else "cpu")


def checkpoint_key(what: str, cache_file: Path) -> str:
    """What identifies the model `what` describes ("checkpoint <step-N folder>" / "released checkpoint <file>",
    as training.inference.load_model says): the sha256 of its weights' bytes (`*.safetensors` of a folder,
    or the released file), each file's hash kept in `cache_file` by (path, size, mtime) so an unchanged
    checkpoint is not read again. A description that names no file (a model built in memory) is its own key."""
    m = re.match(r"^(?:released )?checkpoint (.+)$", what)
    path = Path(m.group(1)) if m else None
    if path is None or not path.exists():
        return what
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    parts = []
    for f in files:
        st = f.stat()
        stamp, entry = [st.st_size, st.st_mtime_ns], cache.get(str(f.resolve()))
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp):
            entry = cache[str(f.resolve())] = {"stamp": stamp, "sha256": sha256_file(f)}
        parts.append(f"{f.name} {entry['sha256']}")
    atomic_write_text(cache_file, json.dumps(cache))
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached_row(done: Path, key: str, views: Path, n_views: int) -> dict | None:
    """The finished row at `done` if it was made by the model `key` and (for an ok row) every one of its
    `n_views` view files is there; None means redo it (never a crash on a damaged or stale cache)."""
    try:
        row = json.loads(done.read_text()) if done.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("checkpoint_key") != key:
        return None
    if row.get("status") == "ok" and not all((views / f"{i:02d}.png").is_file() for i in range(n_views)):
        return None
    return row


def _failed(uid: str, methods: list[str], reason: str) -> list[dict]:
    return [{"uid": uid, "method": m, "status": "failed", "reason": reason} for m in methods]


def run(cfg: Config, nerf_checkpoint: str = "", progress: bool = True, source: str | None = None) -> list[dict]:
    """Reconstruct the built eval set of `source` (default eval.source), score, report.

    Returns one row per (asset, method); assets that failed to download or render are rows with the reason.
    An eval set that is not built raises EvalSetError saying how to build it.
    """
    with stage_lock(cfg.out_path, "eval"):
        return _run(cfg, nerf_checkpoint, progress, source)


def _run(cfg: Config, nerf_checkpoint: str, progress: bool, source: str | None) -> list[dict]:
    out = cfg.out_path / "eval"
    methods = methods_of(cfg)
    es = load_built(cfg, source or cfg.eval.source)
    leak = leak_check(cfg, es)
    if not es.uids:
        print(f"warning: eval set {es.slug} has no assets ({es.excluded_training} candidates dropped because "
              f"training used them; see {es.root / 'manifest' / 'filter.parquet'})", file=sys.stderr)
    if leak["overlap"]:
        print(f"WARNING: {len(leak['overlap'])} of {len(es.uids)} eval assets of {es.source} are in the training "
              f"shards ({leak['against']}): {', '.join(leak['overlap'][:5])}{' ...' if len(leak['overlap']) > 5 else ''}",
              file=sys.stderr)
    not_rendered, names = es.failures(), es.names()
    models, load_errors = {}, {}
    for key, ckpt, default in (("mesh", cfg.eval.checkpoint, cfg.out_path / "runs" / "mesh"),
                               ("nerf", nerf_checkpoint, cfg.out_path / "runs" / "nerf")):
        if key == "nerf" and "nerf_mc" not in methods:
            continue
        if key == "mesh" and methods == ["nerf_mc"]:
            continue
        try:
            models[key] = _load(ckpt, default, cfg)
        except Exception as e:  # noqa: BLE001 - becomes the reason of every row that needs it
            load_errors[key] = f"{type(e).__name__}: {e}"
    keys = {k: checkpoint_key(v[1], out / "checkpoint-hashes.json") for k, v in models.items()}
    lpips = Lpips("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict] = []
    resolution = views_per_asset = None
    bar = tqdm(total=len(es.uids) * len(methods), desc=f"eval {es.slug}", unit="recon", disable=not progress)
    for uid in es.uids:
        folder = es.renders / uid
        if uid in not_rendered:
            rows += [{**r, "name": names.get(uid, "")} for r in _failed(uid, methods, not_rendered[uid])]
            bar.update(len(methods))
            continue
        try:
            gt = load_ground_truth(folder)
            views = read_views(folder / "inputs", cfg.loader.input_size, background=1.0)
        except Exception as e:  # noqa: BLE001
            rows += [{**r, "name": names.get(uid, "")} for r in _failed(uid, methods, f"ground truth/inputs: {e}")]
            bar.update(len(methods))
            continue
        preds: dict[str, list[np.ndarray] | None] = {}
        resolution = resolution or int(gt["rgba"].shape[1])
        views_per_asset = views_per_asset or len(gt["rgba"])
        pick = np.linspace(0, len(gt["rgba"]) - 1, cfg.eval.sheet_views).round().astype(int)
        for method in methods:
            # one finished row per (eval set, method, asset), valid for the weights that produced it
            done = out / "rows" / es.slug / method / f"{uid}.json"
            key = "nerf" if method == "nerf_mc" else "mesh"
            ckpt = models[key][1] if key in models else None
            vdir = out / "views" / method / uid
            cached = cached_row(done, keys[key], vdir, len(gt["rgba"])) if key in keys else None
            if cached is not None:
                row = cached
                preds[method] = ([np.asarray(Image.open(vdir / f"{i:02d}.png").convert("RGBA")) for i in pick]
                                 if row["status"] == "ok" else None)
            elif key in load_errors:
                row, preds[method] = _failed(uid, [method], f"{key} checkpoint: {load_errors[key]}")[0], None
            else:
                try:
                    row, pred = evaluate_one(uid, method, models[key][0], gt, views, cfg, lpips, out)
                    preds[method] = [pred[i] for i in pick]
                except Exception as e:  # noqa: BLE001 - one asset never stops the evaluation
                    row, preds[method] = _failed(uid, [method], f"{type(e).__name__}: {e}")[0], None
                row["checkpoint"], row["checkpoint_key"] = ckpt, keys.get(key)
                if row["status"] == "ok":  # failures are retried by a rerun
                    atomic_write_text(done, json.dumps(row))
            rows.append({**row, "name": names.get(uid, "")})
            bar.update(1)
        white = lambda imgs: [(composite_on_white(i)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)  # noqa: E731
                              for i in imgs]
        contact_sheet(out / "sheets" / f"{uid}.png", white([gt["rgba"][i] for i in pick]),
                      {m: (white(p) if p is not None else None) for m, p in preds.items()})
    bar.close()
    info = {"source": es.source, "eval_set": describe(es, leak), "assets": len(es.uids), "methods": methods,
            "checkpoint": {k: v[1] for k, v in models.items()} | {k: f"not loaded ({v})" for k, v in load_errors.items()},
            "views": views_per_asset or cfg.render.eval_orbit_views, "protocol": cfg.render.eval_protocol,
            "resolution": resolution, "points": cfg.eval.points,
            "fscore_threshold": cfg.eval.fscore_threshold, "iou_resolution": cfg.eval.iou_resolution,
            "iou_points_resolution": cfg.eval.iou_points_resolution}
    write_report(rows, out, info)
    return rows


def main(argv: list[str] | None = None) -> int:
    p: argparse.ArgumentParser = stage_parser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="mesh-stage checkpoint (default: eval.checkpoint, else newest in OUT/runs/mesh)")
    p.add_argument("--nerf-checkpoint", default="", help="stage-1 checkpoint for nerf_mc (default: newest in OUT/runs/nerf)")
    for action in p._actions:  # the shared parser's wording is about training sources
        if action.dest == "source":
            action.help = ("eval set: procedural (held-out) | val | objaverse | local:<dir> | gso:<dir> | omniobject3d:<dir> "
                           "(default: config eval.source)")
    p.epilog = __doc__.split("\n\n")[2]
    args = p.parse_args(argv)
    if args.checkpoint:
        args.overrides.append(f"eval.checkpoint={args.checkpoint}")
    cfg = config_from_args(args)
    try:
        methods_of(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source = args.source or cfg.eval.source  # an explicit --source / SOURCE= names the eval set
    save_resolved(cfg, "eval")
    try:
        rows = run(cfg, args.nerf_checkpoint, source=source)
    except EvalSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"eval: {ok}/{len(rows)} rows ok -> {cfg.out_path / 'eval' / 'report.md'}")
    return 0 if rows and ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the evaluation: metric costs against what people use today, and seconds per asset per phase.

- SSIM of 20 orbit views: our batched torch SSIM vs a loop of `skimage.metrics.structural_similarity`, both
  with one thread (skimage is single-threaded), best of 3.
- Chamfer of two 16k-point clouds: k-d tree (ours) vs a dense `torch.cdist` matrix.
- Volume IoU occupancy of a closed mesh: rays (exact) vs the Barnes–Hut winding numbers used before;
- Volume IoU occupancy: Barnes–Hut + coarse-to-fine winding numbers (ours) vs exact winding numbers at every
  voxel (the direct generalised-winding-number method), same grid, same mesh; the disagreement is reported.
- The whole eval of `WHOLE_EVAL_ASSETS` held-out procedural assets at the config's size on this machine:
  `eval.run` from scratch into the benchmark's own folder (building + rendering the eval set, then
  reconstructing and scoring every method), with the checkpoints under OUT/runs (skipped with a note when
  there are none: run `make demo` first). No baseline: nobody else's tool runs this protocol end to end.
- Per-asset seconds of each phase (triplane, mesh, refine, render, image metrics, geometry, export), from
  the rows that whole eval wrote (else from the rows of the last `make eval` under OUT/eval/rows/).

    python -m bench.eval [--config configs/demo.yaml] [key=value ...]
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import format_table, result
from core.config import Config

WHOLE_EVAL_ASSETS = 10  # the "whole eval of 10 demo assets on CPU"


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _best_of(fn, n: int = 3) -> float:
    return min(_seconds(fn) for _ in range(n))


def whole_eval(cfg: Config, out_dir: Path, assets: int = WHOLE_EVAL_ASSETS) -> tuple[list[dict], list[Path]]:
    """Time `eval.run` on `assets` held-out procedural assets from scratch in `out_dir/whole_eval`.

    Returns (benchmark rows, the per-(asset, method) row files it wrote). Skipped (one row with a note) when
    OUT/runs holds no mesh-stage checkpoint.
    """
    from eval import run as eval_run
    from pipelines.evalset import build as build_evalset
    from training.checkpoint import latest_checkpoint

    mesh = latest_checkpoint(Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else cfg.out_path / "runs" / "mesh")
    nerf = latest_checkpoint(cfg.out_path / "runs" / "nerf")
    name = f"whole eval, {assets} held-out procedural assets"
    if mesh is None:
        return [result(name, float("nan"), None, "", "s",
                       f"skipped: no mesh-stage checkpoint under {cfg.out_path / 'runs' / 'mesh'} (run make demo)")], []
    root = out_dir / "whole_eval"
    shutil.rmtree(root, ignore_errors=True)  # from scratch: the stages would otherwise reuse the last run
    bcfg = copy.deepcopy(cfg)
    bcfg.out = str(root)
    bcfg.eval.max_assets = assets
    bcfg.eval.checkpoint = str(mesh.resolve())
    if nerf is None:
        bcfg.eval.methods = [m for m in bcfg.eval.methods if m != "nerf_mc"]
    t_set = _seconds(lambda: build_evalset(bcfg, "procedural", progress=False))
    rows = []
    t_eval = _seconds(lambda: rows.extend(eval_run.run(bcfg, str(nerf.resolve()) if nerf else "", progress=False,
                                                       source="procedural")))
    ok = sum(r["status"] == "ok" for r in rows)
    methods = ", ".join(bcfg.eval.methods)
    size = f"{cfg.render.resolution}², {cfg.render.eval_orbit_views}+4 views, {cfg.render.samples} spp"
    out = [result(f"{name}: build + render the eval set", t_set, None, "", "s", f"{size}; {t_set / assets:.1f} s/asset"),
           result(f"{name}: reconstruct + score ({methods})", t_eval, None, "", "s",
                  f"{ok}/{len(rows)} rows ok; {t_eval / assets:.1f} s/asset; model {mesh}"),
           result(f"{name}: total", t_set + t_eval, None, "", "s", "no baseline: no other tool runs this protocol")]
    return out, list((root / "eval" / "rows").rglob("*.json"))


def run(cfg: Config, out_dir: Path) -> list[dict]:
    import trimesh
    from skimage.metrics import structural_similarity

    from eval import geometry as G
    from eval.metrics import ssim

    rows = []
    size = cfg.eval.render_size
    rng = np.random.default_rng(0)
    a = rng.random((20, size, size, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # skimage runs on one core: compare like with like
    try:
        ours = _best_of(lambda: ssim(ta, tb))
        base = _best_of(lambda: [structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                                       use_sample_covariance=False, data_range=1.0, channel_axis=-1)
                                 for x, y in zip(a, b)])
    finally:
        torch.set_num_threads(threads)
    rows.append(result(f"SSIM, 20 views {size}²", ours, base, "skimage loop", "s",
                       "one thread each, best of 3; equal values (tests)"))
    torch.set_num_threads(2)

    p, q = rng.random((cfg.eval.points, 3)), rng.random((cfg.eval.points, 3))
    ours = _seconds(lambda: G.chamfer(p, q))
    base = _seconds(lambda: torch.cdist(torch.from_numpy(p), torch.from_numpy(q)).min(1))
    rows.append(result(f"Chamfer, {cfg.eval.points} pts", ours, base, "torch.cdist (one direction)", "s"))

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    mesh = G.Mesh(np.asarray(sphere.vertices), np.asarray(sphere.faces))
    res = 24
    occ = [None]
    ours = _seconds(lambda: occ.__setitem__(0, G.occupancy(mesh, res)))
    centres = torch.from_numpy(G.voxel_centres(res).reshape(-1, 3))
    tris = torch.from_numpy(mesh.vertices[mesh.faces])
    exact = [None]
    base = _seconds(lambda: exact.__setitem__(0, torch.cat([G._exact_winding(c, tris) for c in centres.split(512)])))
    differ = int(np.logical_xor(occ[0].reshape(-1), exact[0].abs().numpy() > 0.5).sum())
    rows.append(result(f"IoU occupancy {res}³, {len(mesh.faces)} faces", ours, base, "exact winding numbers", "s",
                       f"{differ} of {res ** 3} voxels differ"))
    torus = trimesh.creation.torus(0.5, 0.2, major_sections=128, minor_sections=64)  # 16 k faces, closed
    closed = G.Mesh(np.asarray(torus.vertices, np.float64), np.asarray(torus.faces, np.int64))
    ray, wind = [None], [None]
    ours = _seconds(lambda: ray.__setitem__(0, G.ray_occupancy(closed, 64)))
    base = _seconds(lambda: wind.__setitem__(0, G.occupancy(closed, 64)))
    rows.append(result(f"IoU occupancy 64³, closed mesh of {len(closed.faces)} faces (rays, what eval uses)", ours,
                       base, "Barnes–Hut winding numbers (eval before)", "s",
                       f"{int((ray[0] != wind[0]).sum())} of {64 ** 3} voxels differ"))

    whole, done = whole_eval(cfg, out_dir)
    rows += whole
    where = "the whole eval above"
    if not done:
        done, where = list((cfg.out_path / "eval" / "rows").rglob("*.json")), "OUT/eval (the last make eval)"
    if done:
        recs = [json.loads(p.read_text()) for p in done]
        for key in sorted({k for r in recs for k in r if k.startswith("t_")}):
            vals = [r[key] for r in recs if key in r]
            rows.append(result(f"eval phase {key[2:]} per asset", float(np.mean(vals)), None, "", "s",
                               f"mean over {len(vals)} (asset, method) rows of {where}"))
    else:
        rows.append(result("eval phases per asset", float("nan"), None, "", "s", "no eval rows yet: run make eval"))
    return rows


if __name__ == "__main__":
    from core.cli import config_from_args, stage_parser

    cfg = config_from_args(stage_parser(__doc__.split("\n\n")[0]).parse_args())
    print(format_table(run(cfg, cfg.out_path / "bench" / "eval")))

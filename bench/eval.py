"""Benchmark of the evaluation: metric costs against what people use today, and seconds per asset per phase.

- SSIM of 20 orbit views: our batched torch SSIM vs a loop of `skimage.metrics.structural_similarity`.
- Chamfer of two 16k-point clouds: k-d tree (ours) vs a dense `torch.cdist` matrix.
- Volume IoU occupancy: Barnes–Hut + coarse-to-fine winding numbers (ours) vs exact winding numbers at every
  voxel (the direct generalised-winding-number method), same grid, same mesh; the disagreement is reported.
- Per-asset seconds of each phase (triplane, mesh, refine, render, image metrics, geometry, export), read
  from the rows of the last `make eval` under OUT/eval/rows/ when there are any.

    python -m bench.eval [--config configs/demo.yaml] [key=value ...]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import format_table, result
from pipelines.config import Config


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(cfg: Config, out_dir: Path) -> list[dict]:
    import trimesh
    from skimage.metrics import structural_similarity

    from eval import geometry as G
    from eval.metrics import ssim

    torch.set_num_threads(2)
    rows = []
    size = cfg.eval.render_size
    rng = np.random.default_rng(0)
    a = rng.random((20, size, size, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    ours = _seconds(lambda: ssim(ta, tb))
    base = _seconds(lambda: [structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                   data_range=1.0, channel_axis=-1) for x, y in zip(a, b)])
    rows.append(result(f"SSIM, 20 views {size}²", ours, base, "skimage loop", "s", "equal values (tests)"))

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

    done = list((cfg.out_path / "eval" / "rows").glob("*/*.json"))
    if done:
        recs = [json.loads(p.read_text()) for p in done]
        for key in sorted({k for r in recs for k in r if k.startswith("t_")}):
            vals = [r[key] for r in recs if key in r]
            rows.append(result(f"eval phase {key[2:]} per asset", float(np.mean(vals)), None, "", "s",
                               f"mean over {len(vals)} (asset, method) rows of OUT/eval"))
    else:
        rows.append(result("eval phases per asset", float("nan"), None, "", "s", "no OUT/eval/rows yet: run make eval"))
    return rows


if __name__ == "__main__":
    from pipelines.cli import config_from_args, stage_parser

    cfg = config_from_args(stage_parser(__doc__.split("\n\n")[0]).parse_args())
    print(format_table(run(cfg, cfg.out_path / "bench" / "eval")))

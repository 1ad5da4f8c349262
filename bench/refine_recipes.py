"""Which texture-refinement recipe to default to (`refine.recipe`): paper vs released, by held-out PSNR.

For each held-out procedural asset (indices after the training ones, `data.procedural_start +
data.procedural_count` onwards, as the procedural eval set takes them) Blender renders the 4 evaluation
input views and the 20-view evaluation orbit at `refine.render_size`. Each recipe refines on the inputs; the
score is the PSNR of the 20 orbit views (never seen by refinement) against Blender, before and after, plus
the input-view PSNR and the seconds.

The model: the newest mesh-stage checkpoint under OUT/runs/mesh when there is one (its own extracted mesh);
otherwise a fresh demo-size GTR with He-initialised f_c (as tests/training/test_refine.py: a default-init
f_c is nearly constant, which no trained one is) on the asset's own geometry, so that only the texture
optimisation is compared. Say which in the notes.

    python -m bench.refine_recipes [--config C] [--out OUT] [key=value ...]   # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import format_table, result
from core.config import Config

ASSETS = 6  # held-out procedural assets scored


def _render(index: int, root: Path, size: int) -> Path:
    from core.cameras import eval_input_views, orbit_views
    from core.config import RenderConfig
    from pipelines.sources.procedural import make_procedural_asset
    from render.blender import render_asset

    folder = root / f"asset{index}"
    if (folder / "orbit" / "cameras.npz").is_file() and (folder / "inputs" / "cameras.npz").is_file():
        return folder
    info = make_procedural_asset(index, root / f"asset{index}.glb", 256)
    job = {"uid": info["uid"], "path": info["path"], "format": "glb", "source": "procedural", "license": "cc0",
           "attribution": "bench", "name": info["name"]}
    row = render_asset(job, folder, RenderConfig(resolution=size, samples=16, threads=2),
                       {"inputs": eval_input_views()["c2w"], "orbit": orbit_views(20)["c2w"]}, threads=2)
    if row["status"] != "ok":
        raise RuntimeError(f"render of procedural asset {index} failed: {row['reason']}")
    return folder


def _model(cfg: Config) -> tuple[torch.nn.Module, str]:
    from training.checkpoint import latest_checkpoint
    from training.inference import load_model
    from training.model import GTR

    run = cfg.out_path / "runs" / "mesh"
    if latest_checkpoint(run) is not None:
        model, what = load_model(run, cfg)
        return model, f"trained model ({what}), its own extracted mesh"
    torch.manual_seed(0)
    model = GTR(cfg.model).eval()
    for layer in model.color_mlp.layers:
        torch.nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
        torch.nn.init.zeros_(layer.bias)
    return model, "untrained demo GTR with He-init f_c on the asset's own geometry (no trained model under OUT)"


def run(cfg: Config, out_dir: Path) -> list[dict]:
    from training.mesh import extract_mesh, extract_options, rasterize_mesh, shade
    from training.ops.raster import Rasterizer
    from training.recon_inputs import read_views
    from training.refine import color_model, psnr, refine_texture

    torch.set_num_threads(2)
    size = int(cfg.refine.render_size)
    model, what = _model(cfg)
    trained = what.startswith("trained")
    first = cfg.data.procedural_start + cfg.data.procedural_count
    scores: dict[str, list[dict]] = {"paper": [], "released": []}
    rz = Rasterizer("auto", "cpu")
    for index in range(first, first + ASSETS):
        folder = _render(index, Path(out_dir) / "renders", size)
        inputs, orbit = read_views(folder / "inputs", size), read_views(folder / "orbit", size)
        img = torch.tensor(inputs.rgb).permute(0, 3, 1, 2).contiguous()
        c2w, K = torch.tensor(inputs.c2w), torch.tensor(inputs.K)
        with torch.no_grad():
            planes = model.triplane(torch.cat([img, torch.tensor(inputs.mask)[:, None]], 1)[None], c2w[None],
                                    K[None]).float()
        if trained:
            verts, faces = extract_mesh(model, planes, cfg.mesh.grid, cfg.mesh.sdf_level, cfg.mesh.mc_backend,
                                        **extract_options(cfg.mesh))
        else:
            geo = np.load(folder / "inputs" / "geometry.npz")
            verts, faces = torch.tensor(geo["vertices"]), torch.tensor(geo["faces"]).long()
        if len(faces) == 0:
            continue
        o_img = torch.tensor(orbit.rgb).permute(0, 3, 1, 2)
        surf = rasterize_mesh(rz, verts, faces, torch.tensor(orbit.c2w), torch.tensor(orbit.K), size, size)
        with torch.no_grad():
            novel_before = psnr(shade(model, planes, surf, 1.0)["rgb"], o_img)
        for name in scores:
            rcfg = dataclasses.replace(cfg.refine, recipe=name, steps=0, loss="")
            t0 = time.perf_counter()
            res = refine_texture(model, planes, verts, faces, img, c2w, K, rcfg, rasterizer=rz)
            seconds = time.perf_counter() - t0
            with torch.no_grad(), color_model(model, res.color_mlp) as m:
                novel_after = psnr(shade(m, res.planes, surf, 1.0)["rgb"], o_img)
            scores[name].append({"index": index, "novel_before": novel_before, "novel_after": novel_after,
                                 "input_before": res.psnr_before, "input_after": res.psnr_after, "s": seconds})
    rows = []
    mean = {n: {k: float(np.mean([r[k] for r in v])) for k in v[0] if k != "index"} for n, v in scores.items() if v}
    p, r = mean["paper"], mean["released"]
    notes = f"{len(scores['paper'])} held-out procedural assets at {size}²; {what}"
    rows.append(result("held-out (orbit) PSNR after refinement: paper recipe", p["novel_after"], r["novel_after"],
                       "released recipe", "dB", notes=f"before {p['novel_before']:.2f} dB; {notes}",
                       higher_is_better=True))
    rows.append(result("input-view PSNR after refinement: paper recipe", p["input_after"], r["input_after"],
                       "released recipe", "dB", notes=f"before {p['input_before']:.2f} dB", higher_is_better=True))
    rows.append(result("refinement seconds: paper recipe", p["s"], r["s"], "released recipe", "s",
                       notes="paper 20 steps at size², released 50 steps at (2·size)²"))
    for name, v in scores.items():
        for s in v:
            print(f"{name:9s} asset {s['index']}: orbit {s['novel_before']:.2f} -> {s['novel_after']:.2f} dB, "
                  f"inputs {s['input_before']:.2f} -> {s['input_after']:.2f} dB, {s['s']:.1f} s")
    return rows


if __name__ == "__main__":
    import sys

    from core.cli import config_from_args, stage_parser

    args = stage_parser(__doc__.split("\n\n")[0]).parse_args(sys.argv[1:])
    cfg = config_from_args(args)
    print(format_table(run(cfg, cfg.out_path / "bench" / "refine_recipes")))

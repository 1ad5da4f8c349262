"""Learning ladder, rung 0: can the renderers represent one object? A triplane and f_d / f_c fitted directly.

No encoder and no transformer: the planes are free parameters, f_d / f_c are the model's own MLPs, and the
views are one asset's Blender renders (training views / held-out views of the same asset). Fitted through
`GTR.render_rays` (volume rendering) and scored on held-out views through both renderers: volume
(`GTR.render_views`) and mesh (`training.mesh.extract_mesh` = DiffMC at a density level, then
`render_mesh`). This separates camera, sampling and renderer faults from the network (issue "The trainer
learns", rung 0). The mesh level is either fixed or the one `training.mesh_level` reads off the field (the
level whose mesh covers and sits where the volume render does; docs/training.md, "The learning ladder").

    python -m bench.learning [--out DIR] [key=value ...]      # renders the assets into DIR/bench/learning

`make bench ARGS="--only learning"` then runs the learning curves of the demo recipe (`bench.learning_curves`:
held-out assets against steps and against the number of training assets, DIR/bench/learning/curves/curves.png).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bench.common import format_table, result
from core.cli import config_from_args, stage_parser
from core.config import Config, ModelConfig

HELD_OUT = 8  # the last 8 of an asset's random views are held out (the views are i.i.d. draws)
LEVELS = (5.0, 10.0, 20.0, 40.0, 80.0)  # fixed mesh levels of the sweep (mesh.sdf_level is 10)


@dataclass
class Views:
    """One asset's render folder in memory: rgb [V,3,H,W] on white, mask [V,1,H,W], depth [V,1,H,W] (planar
    z, 0 = background), c2w [V,4,4] OpenCV, K [V,3,3]."""

    rgb: Tensor
    mask: Tensor
    depth: Tensor
    c2w: Tensor
    K: Tensor

    def take(self, idx: list[int]) -> Views:
        return Views(self.rgb[idx], self.mask[idx], self.depth[idx], self.c2w[idx], self.K[idx])

    def __len__(self) -> int:
        return len(self.rgb)


def load_views(folder: str | Path) -> Views:
    """Read a render folder (render stage layout: cameras.npz, NN.rgba.png, NN.depth.png, meta.json)."""
    folder = Path(folder)
    cams = np.load(folder / "cameras.npz")
    scale = float(json.loads((folder / "meta.json").read_text())["depth_scale"])
    V = len(cams["c2w"])
    width = max(2, len(str(V - 1)))
    rgba = np.stack([np.asarray(Image.open(folder / f"{i:0{width}d}.rgba.png").convert("RGBA")) for i in range(V)])
    depth = np.stack([np.asarray(Image.open(folder / f"{i:0{width}d}.depth.png")) for i in range(V)])
    x = torch.from_numpy(rgba).float().div(255).permute(0, 3, 1, 2)  # [V,4,H,W]
    alpha = x[:, 3:]
    rgb = x[:, :3] * alpha + (1 - alpha)  # straight alpha composited on white (the training background)
    return Views(rgb, alpha, torch.from_numpy(depth.astype(np.float32) / scale)[:, None],
                 torch.from_numpy(cams["c2w"]).float(), torch.from_numpy(cams["K"]).float())


def split(views: Views, held_out: int = HELD_OUT) -> tuple[Views, Views]:
    n = len(views) - held_out
    return views.take(list(range(n))), views.take(list(range(n, len(views))))


@dataclass
class FitSettings:
    """How the triplane is fitted (the values of the issue's measurement unless said)."""

    steps: int = 300  # the rung-0 budget (docs/training.md, "The learning ladder")
    rays: int = 4096  # random rays per step, drawn over all training views' pixels
    lr_planes: float = 3e-2
    lr_mlp: float = 1e-2
    init_std: float = 0.1  # small random plane init
    mask_weight: float = 1.0  # opacity MSE to the alpha mask (without it a white fog fills the box)
    opacity_reg_weight: float = 0.0  # released ray-opacity regulariser in stage 1 (0 = off)
    seed: int = 0
    plane_res: int = 64
    plane_channels: int = 16
    samples: int = 24


@dataclass
class Fit:
    model: Any  # the GTR whose f_d / f_c were fitted
    planes: Tensor  # [1,3,C,R,R]
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, training-ray PSNR)


def model_config(s: FitSettings) -> ModelConfig:
    return ModelConfig(plane_channels=s.plane_channels, samples_per_ray=s.samples, lift=False)  # planes fitted directly


def pixel_rays(views: Views) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """All pixels of `views` as rays: o, d [N,3], rgb [N,3], mask [N,1], t (distance to the GT surface along
    the ray, 0 = background) [N,1]."""
    from training.cameras import camera_rays

    V, _, H, W = views.rgb.shape
    o, d = camera_rays(views.c2w[None], views.K[None], H, W)  # [1,V,H,W,3]
    fwd = views.c2w[None, :, None, None, :3, 2]
    cos = (d * fwd).sum(-1, keepdim=True)
    z = views.depth.permute(0, 2, 3, 1)[None]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    return (flat(o), flat(d), flat(views.rgb.permute(0, 2, 3, 1)), flat(views.mask.permute(0, 2, 3, 1)),
            flat(z / cos.clamp_min(1e-6)))


def released_ray_opacity(model: Any, planes: Tensor, o: Tensor, d: Tensor, t_surf: Tensor,
                         generator: torch.Generator) -> Tensor:
    """The released regulariser (fixture official-gtr-tiny-v2, item 2): one random point per ray between box
    entry and the GT surface (box exit for background rays), opacity 1 − exp(−σ·len) with len the distance
    from the point to that end, L1 to 0. Rays [N,3] (unit d), t_surf [N,1]."""
    near, far, hit = model.ray_box(o, d)
    end = torch.where(t_surf > 0, t_surf, far)
    valid = (hit & (end > near)).float()
    u = torch.rand(near.shape, generator=generator)
    t = near + u * (end - near).clamp_min(0)
    sigma = model.query_density(planes, (o + d * t)[None])[0]
    opacity = 1 - torch.exp(-sigma * (end - t) * model.units_per_ours)
    return (opacity * valid).sum() / valid.sum().clamp_min(1)


# The rung-0 floors' fit: the issue's 128² planes and 48 samples (its 35.0 dB box) for as many steps as 5 minutes
# of 2 CPU cores hold (0.22 s per step; docs/training.md "Rung 0"). The slow test fits FitSettings() (the demo's
# 64² planes and 24 samples, 300 steps: a quarter of the cost) against floors measured on it.
FLOOR_FIT = FitSettings(steps=1200, plane_res=128, samples=48)


def fit_direct(train: Views, s: FitSettings) -> Fit:
    """Optimise planes [1,3,C,R,R] and the model's f_d / f_c on `train` through stratified volume rendering."""
    from training.losses import psnr
    from training.model import GTR

    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    model = GTR(model_config(s))
    planes = torch.nn.Parameter(torch.randn(1, 3, s.plane_channels, s.plane_res, s.plane_res) * s.init_std)
    mlps = [*model.density_mlp.parameters(), *model.color_mlp.parameters()]
    opt = torch.optim.Adam([{"params": [planes], "lr": s.lr_planes}, {"params": mlps, "lr": s.lr_mlp}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 ** (k / s.steps))  # exponential to lr/10
    o, d, rgb, mask, t_surf = pixel_rays(train)
    model.train()
    curve, t0 = [], time.perf_counter()
    for step in range(1, s.steps + 1):
        pick = torch.randint(0, len(o), (s.rays,), generator=g)
        out = model.render_rays(planes, o[pick][None], d[pick][None], generator=g)
        loss = ((out["rgb"][0] - rgb[pick]) ** 2).mean()
        if s.mask_weight:
            loss = loss + s.mask_weight * ((out["opacity"][0] - mask[pick]) ** 2).mean()
        if s.opacity_reg_weight:
            loss = loss + s.opacity_reg_weight * released_ray_opacity(model, planes, o[pick], d[pick],
                                                                       t_surf[pick], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == s.steps:
            curve.append((step, float(psnr(out["rgb"].detach(), rgb[pick][None]).mean())))
    model.eval()
    return Fit(model, planes.detach(), time.perf_counter() - t0, curve)


def mask_iou(pred: Tensor, gt: Tensor) -> float:
    """IoU of pred > 0.5 and gt > 0.5 over all pixels of all views."""
    a, b = pred > 0.5, gt > 0.5
    return float((a & b).sum()) / max(1, int((a | b).sum()))


@torch.no_grad()
def score_volume(fit: Fit, views: Views) -> dict[str, Any]:
    """Volume render (evaluation mode: bin middles) of `views`: mean PSNR, mask IoU, images."""
    from training.losses import psnr

    H, W = views.rgb.shape[-2:]
    out = fit.model.render_views(fit.planes, views.c2w[None], views.K[None], H, W, stratified=False)
    rgb, op = out["rgb"][0].clamp(0, 1), out["opacity"][0]
    return {"psnr": float(psnr(rgb, views.rgb).mean()), "iou": mask_iou(op, views.mask), "rgb": rgb,
            "opacity": op}


def agreeing_level(fit: Fit, views: Views, size: int = 64) -> float:
    """`training.mesh_level.agreeing_level` of the fitted field on `views` rendered at size² (no ground truth)."""
    from training.mesh_level import camera_agreeing_level

    K = views.K.clone()
    K[:, :2] *= size / views.rgb.shape[-1]
    return camera_agreeing_level(fit.model, fit.planes, views.c2w, K, size, size)["level"]


@torch.no_grad()
def score_mesh(fit: Fit, views: Views, level: float, grid: int = 96) -> dict[str, Any]:
    """Mesh path on `views`: extract at `level` on a grid³, rasterize, colour by f_c; PSNR, mask IoU, faces."""
    from training.losses import psnr
    from training.mesh import extract_mesh, render_mesh

    verts, faces = extract_mesh(fit.model, fit.planes, grid, level)
    H, W = views.rgb.shape[-2:]
    out = render_mesh(fit.model, fit.planes, verts, faces, views.c2w, views.K, H, W, 1.0)
    rgb = out["rgb"].clamp(0, 1)
    return {"psnr": float(psnr(rgb, views.rgb).mean()), "iou": mask_iou(out["mask"], views.mask),
            "faces": int(len(faces)), "level": level, "rgb": rgb}


def evaluate(fit: Fit, train: Views, held: Views, levels: tuple[float, ...] = LEVELS, grid: int = 96
             ) -> dict[str, Any]:
    """Held-out scores through both renderers: volume, mesh at each fixed level and at the agreeing one."""
    vol = score_volume(fit, held)
    cal = agreeing_level(fit, train.take(list(range(0, len(train), max(1, len(train) // 4)))[:4]))
    mesh = {lv: score_mesh(fit, held, lv, grid) for lv in levels}
    mesh_ag = score_mesh(fit, held, cal, grid) if math.isfinite(cal) else None
    return {"volume": vol, "mesh": mesh, "level_agreeing": cal, "mesh_agreeing": mesh_ag}


# ----------------------------------------------------------------------------------------------------------
# The benchmark: render the assets with Blender (once, into out_dir), fit, score.
# ----------------------------------------------------------------------------------------------------------

PROCEDURAL_TEXT_INDEX = 0  # procedural-0000: a box with printed text (pipelines.sources.procedural.describe)


def rung0_jobs(assets_dir: Path) -> dict[str, dict[str, Any]]:
    """Render jobs of the rung-0 assets: the procedural text box, and the pybullet duck when pybullet_data or
    its wheel is at hand (`bench.learning_assets.MISSING` says how to get it)."""
    from bench.learning_assets import pybullet_duck
    from pipelines.sources.procedural import make_procedural_asset, uid_for

    uid = uid_for(PROCEDURAL_TEXT_INDEX)
    glb = assets_dir / f"{uid}.glb"
    if not glb.is_file():
        make_procedural_asset(PROCEDURAL_TEXT_INDEX, glb, 512)
    jobs = {uid: {"uid": uid, "path": str(glb), "format": "glb", "source": "procedural", "license": "cc0",
                  "attribution": "GTR toolkit procedural", "name": "box with text texture"}}
    duck = pybullet_duck(assets_dir)
    if duck is not None:
        jobs[duck["uid"]] = duck
    return jobs


def rung0_config(cfg: Config) -> Config:
    """The config rung 0 renders with: the demo's, with 64 Cycles samples and 4 bounces (the demo renders 16 / 2,
    its model being far below that noise floor; rung 0's fits are not)."""
    from dataclasses import replace

    return replace(cfg, render=replace(cfg.render, samples=64, max_bounces=4))


def render_job(cfg: Config, job: dict[str, Any], dest: Path, views: int = 32) -> Path:
    """Render `job` with Blender into `dest` (cfg.render settings, the render stage's random views of its uid),
    unless a finished folder is there already."""
    from core.cameras import random_views
    from render import blender as rb

    if not (dest / "cameras.npz").is_file():
        c2w = random_views(job["uid"], views, (cfg.render.distance_min, cfg.render.distance_max))["c2w"]
        row = rb.render_asset(job, dest, cfg.render, {"": c2w}, threads=2)
        if row["status"] != "ok":
            raise RuntimeError(f"render of {job['uid']} failed: {row['reason']}")
    return dest


def run(cfg: Config, out_dir: Path) -> list[dict[str, Any]]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    cfg0 = rung0_config(cfg)
    for uid, job in rung0_jobs(out_dir / "assets").items():
        train, held = split(load_views(render_job(cfg0, job, out_dir / "renders" / uid)))
        quick = fit_direct(train, FitSettings())
        quick_note = f"the test's fit (64² planes, 24 samples, 300 steps, {quick.seconds:.0f} s)"
        fit = fit_direct(train, FLOOR_FIT)
        ev = evaluate(fit, train, held, levels=(10.0,), grid=128)
        note = (f"{uid}: {len(train)} training / {len(held)} held-out views {held.rgb.shape[-1]}², "
                f"{FLOOR_FIT.plane_res}² planes, {FLOOR_FIT.samples} samples, {FLOOR_FIT.steps} steps, "
                f"fit {fit.seconds:.0f} s")
        m10, mc = ev["mesh"][10.0], ev["mesh_agreeing"]
        rows += [
            result(f"rung 0 {uid} volume PSNR", ev["volume"]["psnr"], 32.0, "issue floor", "dB", note,
                   higher_is_better=True),
            result(f"rung 0 {uid} volume mask IoU", ev["volume"]["iou"], 0.98, "issue floor", "", note,
                   higher_is_better=True),
            result(f"rung 0 {uid} mesh PSNR, agreeing level", mc["psnr"] if mc else float("nan"), m10["psnr"],
                   "mesh at level 10", "dB", f"level {ev['level_agreeing']:.1f}; floor 28 dB", higher_is_better=True),
            result(f"rung 0 {uid} mesh mask IoU, agreeing level", mc["iou"] if mc else float("nan"), m10["iou"],
                   "mesh at level 10", "", "floor 0.98", higher_is_better=True),
            result(f"rung 0 {uid} fit time", fit.seconds, 300.0, "5 CPU minutes", "s", note),
            result(f"rung 0 {uid} volume PSNR, {quick_note}", score_volume(quick, held)["psnr"], 32.0, "issue floor", "dB",
                   "what the slow test fits", higher_is_better=True),
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = stage_parser(__doc__).parse_args(argv)
    cfg = config_from_args(args)
    print(format_table(run(cfg, cfg.out_path / "bench" / "learning")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

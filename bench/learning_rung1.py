"""Learning ladder, rung 1: can the feed-forward model memorise a few assets? Held-out-view PSNR by step.

The model API only (no shard loader): each asset's render folder in memory, 4 random training views as the
input (at `input_size`²), supervision by random rays over all its training views (the render resolution),
MSE + mask MSE, AdamW with the loop's warm-up + cosine schedule, clipping. Scored on held-out views of the
same assets with fixed inputs (4 evenly spaced training views: 0, 6, 12, 18 of 24), and optionally on
held-out *assets* the same way (`bench.learning_curves`: the learning curves of `make bench --only learning`).

    python -m bench.learning_rung1 RENDERS_DIR [key=value ...]   # keys: fields of MemoriseSettings
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.learning import Views, load_views, mask_iou, pixel_rays, split
from core.config import ModelConfig


def eval_inputs(n: int) -> list[int]:
    """The fixed input views of scoring: 4 evenly spaced of an asset's n training views (0, 6, 12, 18 of 24)."""
    return [i * n // 4 for i in range(4)]


@dataclass
class MemoriseSettings:
    steps: int = 400
    batch: int = 4  # assets per step
    rays: int = 1024  # supervision rays per asset per step
    lr: float = 5e-3
    warmup: int = 20
    weight_decay: float = 0.05
    mask_weight: float = 1.0
    grad_clip: float = 1.0
    input_size: int = 128
    eval_every: int = 100
    eval_size: int = 64
    eval_views: int = 4  # held-out views scored per asset
    fixed_inputs: bool = False  # always eval_inputs as input (pure memorisation of one triplane per asset)
    seed: int = 0


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def model_input(views: Views, idx: list[int], size: int) -> tuple[Tensor, Tensor, Tensor]:
    """[V,4,S,S] RGB + mask, c2w [V,4,4], K [V,3,3] scaled to size²."""
    K = views.K[idx].clone()
    K[:, :2] *= size / views.rgb.shape[-1]
    return torch.cat([_resize(views.rgb[idx], size), _resize(views.mask[idx], size)], 1), views.c2w[idx], K


@torch.no_grad()
def held_out_scores(model: torch.nn.Module, data: list[tuple[Views, Views]], s: MemoriseSettings
                    ) -> dict[str, float]:
    """Mean over assets of PSNR and mask IoU (volume opacity > 0.5 vs alpha > 0.5) of the held-out views
    (`eval_size`², evaluation-mode sampling), inputs = `eval_inputs` of the training views."""
    from training.losses import psnr

    was = model.training
    model.eval()
    psnrs, ious = [], []
    for train, held in data:
        x, c, K = model_input(train, eval_inputs(len(train)), s.input_size)
        planes = model.triplane(x[None], c[None], K[None])
        h = held.take(list(range(min(s.eval_views, len(held)))))
        Kh = h.K.clone()
        Kh[:, :2] *= s.eval_size / h.rgb.shape[-1]
        r = model.render_views(planes, h.c2w[None], Kh[None], s.eval_size, s.eval_size, stratified=False)
        psnrs.append(float(psnr(r["rgb"][0].clamp(0, 1), _resize(h.rgb, s.eval_size)).mean()))
        ious.append(mask_iou(r["opacity"][0], _resize(h.mask, s.eval_size)))
    model.train(was)
    return {"psnr": sum(psnrs) / len(psnrs), "iou": sum(ious) / len(ious)}


@torch.no_grad()
def triplane_spread(model: torch.nn.Module, data: list[tuple[Views, Views]], s: MemoriseSettings) -> float:
    """How much the triplane depends on the input: std over assets / mean |plane| of `GTR.triplane` (inputs =
    `eval_inputs`); ~0.2 at initialisation, near 0 when the generator collapses to one mean object."""
    was = model.training
    model.eval()
    planes = []
    for train, _ in data:
        x, c, K = model_input(train, eval_inputs(len(train)), s.input_size)
        planes.append(model.triplane(x[None], c[None], K[None]))
    model.train(was)
    P = torch.cat(planes)
    return float((P - P.mean(0, keepdim=True)).pow(2).mean().sqrt() / P.abs().mean().clamp_min(1e-12))


def memorise(folders: list[Path], s: MemoriseSettings, model_cfg: ModelConfig | None = None,
             held_assets: list[Path] | tuple[Path, ...] = ()) -> list[dict[str, float]]:
    """Train GTR on the training views of `folders`; return [{step, seconds, psnr, iou}] (their held-out
    views, mean of assets) and, with `held_assets`, held_psnr / held_iou on those unseen assets."""
    from training.loop import lr_factor
    from training.model import GTR

    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    data = [split(load_views(f)) for f in folders]
    unseen = [split(load_views(f)) for f in held_assets]
    rays = [pixel_rays(train) for train, _ in data]
    model = GTR(model_cfg or ModelConfig())
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, s.warmup, s.steps))
    model.train()
    curve, t0 = [], time.perf_counter()
    for step in range(1, s.steps + 1):
        pick = torch.randperm(len(data), generator=g)[: s.batch].tolist()
        inputs = [model_input(data[a][0], eval_inputs(len(data[a][0])) if s.fixed_inputs else
                              torch.randperm(len(data[a][0]), generator=g)[:4].tolist(), s.input_size) for a in pick]
        planes = model.triplane(*(torch.stack(t) for t in zip(*inputs)))
        sel = [torch.randint(0, len(rays[a][0]), (s.rays,), generator=g) for a in pick]
        o, d, rgb, mask = (torch.stack([rays[a][k][j] for a, j in zip(pick, sel)]) for k in range(4))
        out = model.render_rays(planes, o, d, generator=g)
        loss = F.mse_loss(out["rgb"], rgb) + s.mask_weight * F.mse_loss(out["opacity"], mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        sched.step()
        if step % s.eval_every == 0 or step == s.steps:
            point = {"step": step, "seconds": time.perf_counter() - t0, **held_out_scores(model, data, s),
                     "spread": triplane_spread(model, data, s)}
            if unseen:
                point.update({f"held_{k}": v for k, v in held_out_scores(model, unseen, s).items()})
            curve.append(point)
            print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in point.items() if k != "step"), flush=True)
    return curve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    s = MemoriseSettings()
    types = {f.name: type(getattr(s, f.name)) for f in fields(s)}
    for a in argv[1:]:
        k, v = a.split("=", 1)
        if k not in types:
            raise SystemExit(f"unknown setting {k!r} (known: {', '.join(types)})")
        s = replace(s, **{k: (v.lower() in ("1", "true")) if types[k] is bool else types[k](v)})
    folders = sorted(p for p in Path(argv[0]).iterdir() if (p / "cameras.npz").is_file())[:8]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    memorise(folders, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

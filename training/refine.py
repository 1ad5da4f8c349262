"""Per-instance texture refinement (paper §3.3, Fig. 3, Table 3): fit one asset's triplane and a copy of f_c
to its input views, on the surface of the mesh extracted once.

The geometry is frozen (the mesh and f_d), so which surface point every input pixel sees never changes:
the views are rasterized once (`training.mesh.rasterize_mesh`) and each step only shades them
(`training.mesh.shade`: colour at those points, composited on the background) and compares with the input
images:

    L_tex = || I_cond - render(mesh, f_c(triplane(x))) ||^2           (paper: L2, 20 steps, cosine)

Learning rates: triplane 0.15, f_c 1e-4 (paper). The released code's variant (50 steps, L1, constant lr)
is `RefineConfig(steps=50, loss="l1", schedule="constant")` (configs/official.yaml). Table 3's ablation is
`tune`: `color` (f_c only), `triplane` (planes only) or `both`. The shared model is never modified: f_c is
deep-copied per asset and the planes are a fresh leaf tensor.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.config import RefineConfig
from training.mesh import rasterize_mesh, shade
from training.metrics import psnr as image_psnr
from training.ops.raster import Rasterizer
from training.schedule import lr_factor

TUNES = ("both", "color", "triplane")


@contextlib.contextmanager
def color_model(model: nn.Module, color_mlp: nn.Module | None) -> Iterator[nn.Module]:
    """Temporarily put `color_mlp` (a per-asset f_c copy) into `model` so `model.query_color` uses it."""
    if color_mlp is None:
        yield model
        return
    old = model.color_mlp
    model.color_mlp = color_mlp
    try:
        yield model
    finally:
        model.color_mlp = old


def psnr(pred: Tensor, target: Tensor) -> float:
    """PSNR in dB of images in [0,1] over all pixels and views together (one MSE), +inf when identical:
    training.metrics.psnr of the whole stack as one image."""
    return float(image_psnr(pred.clamp(0, 1).reshape(1, -1), target.reshape(1, -1), max_db=None)[0])


@dataclass
class RefineResult:
    planes: Tensor  # [1,3,C,R,R] refined (detached)
    color_mlp: nn.Module  # the per-asset f_c (refined or, with tune=triplane, the original's copy)
    losses: list[float] = field(default_factory=list)  # per step, before the update
    psnr_before: float = 0.0  # input views, rasterized with the unrefined planes / f_c
    psnr_after: float = 0.0
    seconds: float = 0.0


def refine_texture(model: nn.Module, planes: Tensor, verts: Tensor, faces: Tensor, images: Tensor,
                   c2w: Tensor, K: Tensor, cfg: RefineConfig, background: float = 1.0,
                   rasterizer: Rasterizer | None = None, progress: bool = False) -> RefineResult:
    """Fine-tune this asset's planes [1,3,C,R,R] and a copy of f_c on its input views.

    images [V,3,H,W] in [0,1] composited on `background`; c2w [V,4,4], K [V,3,3] for H×W; verts [N,3],
    faces [F,3] the mesh extracted once (canonical frame). Views are rendered at cfg.render_size (K is
    scaled, the images are area-resized). The model's own weights are left untouched.
    """
    if cfg.tune not in TUNES:
        raise ValueError(f"refine.tune must be one of {', '.join(TUNES)}, got {cfg.tune!r}")
    if cfg.loss not in ("l2", "l1"):
        raise ValueError(f"refine.loss must be l2 or l1, got {cfg.loss!r}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"refine.schedule must be cosine or constant, got {cfg.schedule!r}")
    if planes.ndim != 5 or planes.shape[:2] != (1, 3):
        raise ValueError(f"planes must be [1,3,C,R,R] (one asset), got {tuple(planes.shape)}")
    V, _, H, W = images.shape
    if c2w.shape != (V, 4, 4) or K.shape != (V, 3, 3):
        raise ValueError(f"c2w/K must be [{V},4,4]/[{V},3,3] for {V} images, got {tuple(c2w.shape)}/{tuple(K.shape)}")
    t0 = time.perf_counter()
    device = planes.device
    rasterizer = rasterizer or Rasterizer("auto", device)
    size = int(cfg.render_size)
    if (H, W) != (size, size):
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="area" if H > size else "bilinear")
        K = K.clone()
        K[:, 0] *= size / W
        K[:, 1] *= size / H
    target = images.to(device).float()
    surface = rasterize_mesh(rasterizer, verts.to(device).detach(), faces.to(device), c2w.to(device),
                             K.to(device), size, size)

    fc = copy.deepcopy(model.color_mlp).to(device).float()
    p = planes.detach().clone().float().requires_grad_(cfg.tune in ("both", "triplane"))
    for q in fc.parameters():
        q.requires_grad_(cfg.tune in ("both", "color"))
    groups = []
    if cfg.tune in ("both", "triplane"):
        groups.append({"params": [p], "lr": cfg.lr_triplane})
    if cfg.tune in ("both", "color"):
        groups.append({"params": list(fc.parameters()), "lr": cfg.lr_color})
    opt = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in groups]

    def loss_of(pred: Tensor) -> Tensor:
        d = pred - target
        return (d * d).mean() if cfg.loss == "l2" else d.abs().mean()

    # f_d is frozen by construction (only planes and the f_c copy are optimised); keep the shared model's
    # own parameters out of autograd so no gradient buffers are made for the heavy generator.
    req = [q.requires_grad for q in model.parameters()]
    for q in model.parameters():
        q.requires_grad_(False)
    def render(antialias: bool) -> Tensor:
        with color_model(model, fc) as m:
            return shade(m, p, surface, background, antialias=antialias)["rgb"]

    losses: list[float] = []
    try:
        with torch.no_grad():
            before = psnr(render(antialias=True), target)
        steps = range(cfg.steps)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="refine", leave=False)
        for step in steps:
            factor = 1.0 if cfg.schedule == "constant" else lr_factor(step, 0, cfg.steps)  # cosine to 0
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * factor
            opt.zero_grad(set_to_none=True)
            loss = loss_of(render(antialias=False))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            after = psnr(render(antialias=True), target)
    finally:
        for q, r in zip(model.parameters(), req):
            q.requires_grad_(r)
    fc.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return RefineResult(planes=p.detach(), color_mlp=fc.eval(), losses=losses, psnr_before=before,
                        psnr_after=after, seconds=time.perf_counter() - t0)

"""Per-instance texture refinement (paper §3.3, Fig. 3, Table 3): fit one asset's triplane and a copy of f_c
to its input views, on the surface of the mesh extracted once.

The geometry is frozen (the mesh and f_d), so which surface point every input pixel sees never changes:
the views are rasterized once (`rasterize_surface`) and each step only evaluates colour at those points,
composites on the background, and compares with the input images:

    L_tex = || I_cond - render(mesh, f_c(triplane(x))) ||^2           (paper: L2, 20 steps, cosine)

Learning rates: triplane 0.15, f_c 1e-4 (paper). The released code's variant (50 steps, L1, constant lr)
is `RefineConfig(steps=50, loss="l1", schedule="constant")` (configs/official.yaml). Table 3's ablation is
`tune`: `color` (f_c only), `triplane` (planes only) or `both`. The shared model is never modified: f_c is
deep-copied per asset and the planes are a fresh leaf tensor.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.config import RefineConfig
from training.cameras import opencv_to_clip
from training.metrics import psnr as image_psnr
from training.ops.raster import Rasterizer, make_rasterizer

TUNES = ("both", "color", "triplane")


@dataclass
class Surface:
    """What each pixel of V views sees on a fixed mesh."""

    points: Tensor  # [V,H,W,3] surface point (canonical frame); 0 where nothing is hit
    hit: Tensor  # [V,H,W] bool
    rast: Tensor  # [V,H,W,4] the rasterizer's output (for antialiasing)
    clip: Tensor  # [V,N,4] vertices in clip space
    faces: Tensor  # [F,3] int64


def rasterize_surface(rasterizer: Rasterizer, verts: Tensor, faces: Tensor, c2w: Tensor, K: Tensor,
                      height: int, width: int) -> Surface:
    """Rasterize mesh verts [N,3] / faces [F,3] into V cameras (c2w [V,4,4], K [V,3,3] for height×width)."""
    verts = verts.float()
    faces = faces.long()
    mvp = opencv_to_clip(c2w.float(), K.float(), height, width)  # [V,4,4]
    hom = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=1)  # [N,4]
    clip = torch.einsum("vij,nj->vni", mvp, hom).contiguous()  # [V,N,4]
    with torch.no_grad():
        rast, _ = rasterizer.rasterize(clip, faces, (height, width))
        points, _ = rasterizer.interpolate(verts[None].contiguous(), rast, faces)
    return Surface(points=points, hit=rast[..., 3] > 0, rast=rast, clip=clip, faces=faces)


@contextlib.contextmanager
def color_model(model: nn.Module, color_mlp: nn.Module | None) -> Iterator[nn.Module]:
    """Temporarily put `color_mlp` (a per-asset f_c copy) into `model` so `model.query` uses it."""
    if color_mlp is None:
        yield model
        return
    old = model.color_mlp
    model.color_mlp = color_mlp
    try:
        yield model
    finally:
        model.color_mlp = old


def query_color(model: nn.Module, planes: Tensor, points: Tensor) -> Tensor:
    """rgb [B,N,3] at points [B,N,3]: the model's `query_color` when it has one (skips f_d, which refinement
    never needs), else the colour half of `query`."""
    fn = getattr(model, "query_color", None)
    return fn(planes, points) if callable(fn) else model.query(planes, points)[1]


def shade(model: nn.Module, planes: Tensor, surface: Surface, color_mlp: nn.Module | None = None,
          background: float = 1.0, rasterizer: Rasterizer | None = None, chunk: int = 1 << 18) -> Tensor:
    """Colour the surface: images [V,3,H,W] = f_c at the hit points over `background`.

    planes [1,3,C,R,R]. Differentiable in planes and f_c (the geometry is constant). With a `rasterizer`
    the silhouettes are antialiased (for renders people look at and for the reported PSNR); the refinement
    loss leaves it out: the CPU twin's antialias backward costs 10x the rest of a step, and it only moves
    silhouette pixels, whose colour is mostly background.
    """
    V, H, W, _ = surface.points.shape
    pts = surface.points[surface.hit]  # [P,3]
    cols = []
    with color_model(model, color_mlp) as m:
        for s in range(0, len(pts), chunk):
            cols.append(query_color(m, planes, pts[None, s:s + chunk])[0])
    img = torch.full((V, H, W, 3), float(background), dtype=planes.dtype, device=planes.device)
    if cols:
        img = img.index_put(torch.nonzero(surface.hit, as_tuple=True), torch.cat(cols).to(img.dtype))
    if rasterizer is not None:
        img = rasterizer.antialias(img.contiguous(), surface.rast, surface.clip, surface.faces)
    return img.permute(0, 3, 1, 2)


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


def _lr_factor(cfg: RefineConfig, step: int) -> float:
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / max(cfg.steps, 1)))  # cosine to 0 at the last step


def refine_texture(model: nn.Module, planes: Tensor, verts: Tensor, faces: Tensor, images: Tensor,
                   c2w: Tensor, K: Tensor, cfg: RefineConfig, background: float = 1.0,
                   rasterizer: Rasterizer | None = None, progress: bool = False,
                   surface: Surface | None = None) -> RefineResult:
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
    rasterizer = rasterizer or make_rasterizer("auto", device)
    size = int(cfg.render_size)
    if (H, W) != (size, size):
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="area" if H > size else "bilinear")
        K = K.clone()
        K[:, 0] *= size / W
        K[:, 1] *= size / H
    target = images.to(device).float()
    if surface is None:
        surface = rasterize_surface(rasterizer, verts.to(device), faces.to(device), c2w.to(device),
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
    losses: list[float] = []
    try:
        with torch.no_grad():
            before = psnr(shade(model, p, surface, fc, background, rasterizer), target)
        steps = range(cfg.steps)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="refine", leave=False)
        for step in steps:
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * _lr_factor(cfg, step)
            opt.zero_grad(set_to_none=True)
            loss = loss_of(shade(model, p, surface, fc, background))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            after = psnr(shade(model, p, surface, fc, background, rasterizer), target)
    finally:
        for q, r in zip(model.parameters(), req):
            q.requires_grad_(r)
    fc.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return RefineResult(planes=p.detach(), color_mlp=fc.eval(), losses=losses, psnr_before=before,
                        psnr_after=after, seconds=time.perf_counter() - t0)

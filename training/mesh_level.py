"""The mesh level that agrees with the field's own volume render: which density level s stage 2 / evaluation
should mesh (sdf = −(density − s)) so that the mesh shows what stage 1's volume render shows.

A fixed level (the paper's s = 10) presumes a density scale the volume-rendering loss never pins: a young
field may not reach 10 anywhere (empty mesh), a converged one is so sharp that 10 is crossed in the faint
fog in front of the rendered surface, where f_c was never supervised (docs/training.md, "The learning
ladder"). Here the level is read off the field instead, along rays (no mesh is built):

- a level-s mesh covers a pixel iff the density along its ray exceeds s somewhere (max σ > s), and it sits at
  the first crossing of s;
- the volume render covers a pixel iff its opacity > 0.5, and sits at its expected termination depth.

`agreeing_level` picks, among candidate levels, the one whose coverage best matches the volume render's
(IoU); among the levels within `iou_tol` of the best it takes the one whose first-crossing depth is closest
to the rendered depth. Any rays do (the input views at inference: no ground truth is needed).

`level_mode: inputs` (the demo's) matches the coverage to the input views' own masks instead of the volume
render's: a feed-forward field is soft (its volume render under-covers the object: docs/training.md, "The
hull at the point"), so agreeing with it erodes the mesh, while the input masks say what the mesh must cover
in those views; the depth tie-break is the same.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from training.model.renderer import composite, ray_box

DEFAULT_CANDIDATES = torch.logspace(0.0, 3.0, 61).tolist()  # 1 … 1000, 12 % apart


@torch.no_grad()
def ray_profile(model: Any, planes: Tensor, rays_o: Tensor, rays_d: Tensor, samples: int = 64,
                chunk: int = 8192) -> dict[str, Tensor]:
    """Density along rays [N, 3] (our frame, unit d) at `samples` bin middles over the box (evaluation-mode
    quadrature of `render_rays`), `chunk` rays at a time. Returns sigma, t [N, S], opacity, depth (expected
    termination) [N], hit [N] (ray meets the box)."""
    parts = [_profile(model, planes, o, d, samples) for o, d in zip(rays_o.split(chunk), rays_d.split(chunk))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _profile(model: Any, planes: Tensor, rays_o: Tensor, rays_d: Tensor, samples: int) -> dict[str, Tensor]:
    near, far, hit = ray_box(rays_o, rays_d, model.box_half_size_ours(), model.near_min_ours())
    steps = (torch.arange(samples, dtype=rays_o.dtype, device=rays_o.device) + 0.5) / samples
    t = near + (far - near) * steps  # [N, S]
    pts = rays_o[:, None] + t[..., None] * rays_d[:, None]  # [N, S, 3]
    sigma = model.query_density(planes, pts.reshape(1, -1, 3)).reshape(t.shape)
    delta = ((far - near) / samples).expand_as(t) * model.units_per_ours  # densities are per model unit
    res = composite(sigma[..., None], torch.zeros(*t.shape, 3, dtype=t.dtype, device=t.device), t[..., None],
                    delta[..., None], torch.zeros(3, dtype=t.dtype, device=t.device))
    return {"sigma": sigma, "t": t, "opacity": res["opacity"][:, 0], "depth": res["depth"][:, 0],
            "hit": hit[:, 0]}


def first_crossing(sigma: Tensor, t: Tensor, level: float) -> tuple[Tensor, Tensor]:
    """Where density first reaches `level` along each ray, linearly interpolated between samples: depth [N]
    and crossed [N] (bool)."""
    above = sigma >= level
    crossed = above.any(-1)
    j = above.float().argmax(-1)  # first sample at or above the level
    i = (j - 1).clamp(min=0)
    s0, s1 = sigma.gather(-1, i[:, None])[:, 0], sigma.gather(-1, j[:, None])[:, 0]
    t0, t1 = t.gather(-1, i[:, None])[:, 0], t.gather(-1, j[:, None])[:, 0]
    frac = ((level - s0) / (s1 - s0).clamp(min=1e-12)).clamp(0, 1)
    depth = torch.where(j > 0, t0 + frac * (t1 - t0), t1)
    return depth, crossed


def level_agreement(profile: dict[str, Tensor], level: float, target: Tensor | None = None) -> dict[str, float]:
    """How a level-`level` mesh would agree with the volume render on these rays: coverage IoU and the mean
    |first-crossing depth − rendered depth| over rays both cover (our units). `target` [N] (bool): the coverage
    to match instead of the volume render's (e.g. the input masks)."""
    vol = ((profile["opacity"] > 0.5) if target is None else target) & profile["hit"]
    depth, crossed = first_crossing(profile["sigma"], profile["t"], level)
    mesh = crossed & profile["hit"]
    both = vol & mesh
    union = int((vol | mesh).sum())
    err = float((depth - profile["depth"]).abs()[both].mean()) if both.any() else float("inf")
    return {"level": float(level), "iou": float(both.sum()) / union if union else 0.0, "depth_error": err}


@torch.no_grad()
def agreeing_level(model: Any, planes: Tensor, rays_o: Tensor, rays_d: Tensor, *, samples: int = 64,
                   candidates: list[float] | None = None, iou_tol: float = 0.002, target: Tensor | None = None
                   ) -> dict[str, Any]:
    """The density level whose mesh agrees best with the volume render of `planes` on rays [N, 3] (or, given
    `target` [N] bool, with that coverage).

    planes: one asset [1, 3, C, R, R]. Returns {level, iou, depth_error, curve: [per-candidate agreement]};
    level is nan when the volume render (the target) covers no ray (an empty field: no level helps).
    """
    prof = ray_profile(model, planes, rays_o, rays_d, samples)
    target = (prof["opacity"] > 0.5) if target is None else target  # once, not per candidate
    curve = [level_agreement(prof, s, target) for s in (candidates or DEFAULT_CANDIDATES)]
    if not (target & prof["hit"]).any():
        return {"level": float("nan"), "iou": 0.0, "depth_error": float("inf"), "curve": curve}
    best = max(c["iou"] for c in curve)
    pick = min((c for c in curve if c["iou"] >= best - iou_tol), key=lambda c: c["depth_error"])
    return {**pick, "curve": curve}


def camera_agreeing_level(model: Any, planes: Tensor, c2w: Tensor, K: Tensor, height: int, width: int,
                          **kw: Any) -> dict[str, Any]:
    """`agreeing_level` on the pixels of views c2w [V, 4, 4] (OpenCV), K [V, 3, 3] of height × width."""
    from training.cameras import camera_rays

    o, d = camera_rays(c2w[None].float(), K[None].float(), height, width)
    return agreeing_level(model, planes, o.reshape(-1, 3), d.reshape(-1, 3), **kw)


LEVEL_MODES = ("fixed", "agree", "inputs")
CALIBRATION_SIZE = 32  # views are scored at 32² for the level: 4 input views = 4096 rays, ~0.1 s on a CPU


def mesh_level(model: Any, planes: Tensor, c2w: Tensor, K: Tensor, size: int, cfg: Any,
               masks: Tensor | None = None) -> float:
    """The level to mesh one asset at, per `cfg.level_mode` (a MeshConfig): `cfg.sdf_level`, or the agreeing
    level on the views c2w [V, 4, 4], K [V, 3, 3] (of size² images, e.g. the input views; `inputs` needs their
    masks [V, 1, size, size]), falling back to `cfg.sdf_level` for a field the volume render (or the masks)
    shows nothing of."""
    if cfg.level_mode not in LEVEL_MODES:
        raise ValueError(f"mesh.level_mode must be one of {LEVEL_MODES}, got {cfg.level_mode!r}")
    if cfg.level_mode == "fixed":
        return float(cfg.sdf_level)
    target = None
    if cfg.level_mode == "inputs":
        if masks is None:
            raise ValueError("mesh.level_mode=inputs needs the input views' masks")
        small = torch.nn.functional.interpolate(masks.float().reshape(-1, 1, *masks.shape[-2:]),
                                                size=(CALIBRATION_SIZE, CALIBRATION_SIZE), mode="area")
        target = (small > 0.5).reshape(-1).to(planes.device)  # camera_rays' order: view, row, column
    Ks = K.float().clone()
    Ks[:, :2] *= CALIBRATION_SIZE / size
    level = camera_agreeing_level(model, planes.detach(), c2w, Ks, CALIBRATION_SIZE, CALIBRATION_SIZE,
                                  target=target)["level"]
    return float(cfg.sdf_level) if math.isnan(level) else level

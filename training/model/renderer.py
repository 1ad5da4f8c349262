"""Volume rendering of a radiance field along rays clipped to the scene box (paper §3.2, NeRF stage).

The quadrature is the released code's (`UniformSampler` / `RaySamples.get_weights`, snap_gtr 2916db7;
tests/fixtures/official-gtr-tiny-v2 `render`): each ray is clipped to the cube [-box, box]^3 by the slab
test with its near end raised to at least `near_min`, and `samples + 1` bin edges are placed at
`x·far + (1 − x)·near`. In evaluation x = linspace(0, 1, samples + 1); in training every edge is jittered
uniformly between the centres of its two neighbouring bins (stratified, one draw per edge). A sample sits at
the middle of its (possibly jittered) bin and its Δ is that bin's own length, end − start. Densities become
alphas 1 − exp(−σ·Δ), transmittance is exp of the exclusive cumulative sum, colour is composited over the
background (and clamped to [0, 1] in evaluation, as released). Rays are processed in chunks so that full
images render within bounded memory.

t, near, far and Δ are in units of |d| (a non-unit direction scales them, exactly as in the released code);
the model passes unit directions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# field(points [B, M, 3]) -> (density [B, M, 1] >= 0, rgb [B, M, 3])
Field = Callable[[Tensor], tuple[Tensor, Tensor]]


def ray_box(rays_o: Tensor, rays_d: Tensor, box: float, near_min: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test of rays [..., 3] against [-box, box]^3: near, far [..., 1] and hit [..., 1] (bool).

    near is raised to `near_min`; a ray hits when far > near (the released `intersect_aabb` test). For missed
    rays near = far (an empty segment).
    """
    # IEEE division as in the released code: an axis-parallel direction gives ±inf on that axis, and an origin
    # exactly on a face plane with a zero component gives 0/0 = NaN, which fails far > near (a miss, as the
    # released code renders it). Missed rays then get the finite empty segment [near_min, near_min].
    t0, t1 = (-box - rays_o) / rays_d, (box - rays_o) / rays_d
    near = torch.minimum(t0, t1).amax(dim=-1, keepdim=True).clamp(min=near_min)
    far = torch.maximum(t0, t1).amin(dim=-1, keepdim=True)
    hit = far > near
    empty = torch.full_like(near, near_min)
    near = torch.where(hit, near, empty)
    return near, torch.where(hit, far, near), hit


def bin_edges(near: Tensor, far: Tensor, samples: int, stratified: bool = False,
              generator: torch.Generator | None = None) -> Tensor:
    """Bin edges [..., samples + 1] between near and far [..., 1] (the released `SpacedSampler`).

    Without `stratified`: x = linspace(0, 1, samples + 1) and edge = x·far + (1 − x)·near, in that float
    order. With it, edge i is drawn uniformly in [c_{i−1}, c_i] where c are the bin centres of x (c_{−1} = 0,
    c_samples = 1): one uniform draw per edge, `torch.rand(..., samples + 1)` from `generator`.
    """
    x = torch.linspace(0.0, 1.0, samples + 1, device=near.device, dtype=near.dtype)
    x = x.expand(*near.shape[:-1], samples + 1)
    if stratified:
        centres = (x[..., 1:] + x[..., :-1]) / 2.0
        upper = torch.cat([centres, x[..., -1:]], dim=-1)
        lower = torch.cat([x[..., :1], centres], dim=-1)
        u = torch.rand(x.shape, generator=generator, device=near.device, dtype=near.dtype)
        x = lower + (upper - lower) * u
    return x * far + (1 - x) * near


def composite(density: Tensor, rgb: Tensor, t: Tensor, delta: Tensor, background: Tensor, clamp: bool = False
              ) -> dict[str, Tensor]:
    """Alpha compositing of S samples per ray (the released `RaySamples.get_weights` and `RGBRenderer`).

    density [..., S, 1], rgb [..., S, 3], t [..., S, 1] sample distances, delta [..., S, 1] bin lengths,
    background [..., 3] (broadcastable). Returns rgb [..., 3] (clamped to [0, 1] with `clamp`, the released
    evaluation renderer), depth [..., 1] (expected termination distance given that the ray terminates;
    0 where nothing is hit), opacity [..., 1], weights [..., S, 1].
    """
    tau = density * delta  # optical thickness of each bin
    alpha = 1.0 - torch.exp(-tau)
    # Exclusive transmittance exp(-sum_{j<i} tau_j) (a cumsum in log space, not a cumprod of 1 - alpha).
    excl = torch.cat([torch.zeros_like(tau[..., :1, :]), torch.cumsum(tau[..., :-1, :], dim=-2)], dim=-2)
    weights = torch.nan_to_num(torch.exp(-excl) * alpha)
    opacity = weights.sum(dim=-2)
    if clamp:
        rgb = torch.nan_to_num(rgb)
    color = (weights * rgb).sum(dim=-2) + (1.0 - opacity) * background
    if clamp:
        color = color.clamp(0.0, 1.0)
    depth = (weights * t).sum(dim=-2) / opacity.clamp(min=1e-10)
    depth = torch.where(opacity > 1e-10, depth, torch.zeros_like(depth))
    return {"rgb": color, "depth": depth, "opacity": opacity, "weights": weights}


def ray_samples(rays_o: Tensor, rays_d: Tensor, box: float, samples: int, near_min: float = 0.0,
                stratified: bool = False, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The samples of rays [..., 3]: edges [..., S+1], midpoints t [..., S, 1], Δ [..., S, 1] and the
    points o + t·d [..., S, 3]. Missed rays get an empty segment (Δ = 0, nothing accumulates)."""
    near, far, hit = ray_box(rays_o, rays_d, box, near_min)
    edges = bin_edges(near, far, samples, stratified, generator)
    start, end = edges[..., :-1, None], edges[..., 1:, None]
    t = (start + end) / 2.0
    points = rays_o[..., None, :] + rays_d[..., None, :] * t
    # x·far + (1−x)·near of an empty segment still differs by an ulp between edges; a miss must add nothing
    delta = torch.where(hit[..., None, :], end - start, torch.zeros_like(start))
    return edges, t, delta, points


def render_rays(field: Field, rays_o: Tensor, rays_d: Tensor, *, box: float, samples: int,
                near_min: float = 0.0, background: float | Tensor = 1.0, stratified: bool = False,
                chunk: int = 8192, generator: torch.Generator | None = None,
                clamp: bool | None = None) -> dict[str, Tensor]:
    """Render rays_o, rays_d [B, N, 3] (directions unit length) through `field`.

    background: a float (all channels) or [B, 3]. Returns rgb [B, N, 3], depth [B, N, 1] (distance along
    the ray), opacity [B, N, 1]. `chunk` bounds the rays evaluated at once (per batch element). `clamp`
    (default: not stratified, i.e. evaluation) clamps rgb to [0, 1] as the released renderer does in eval.
    """
    if rays_o.shape != rays_d.shape or rays_o.ndim != 3 or rays_o.shape[-1] != 3:
        raise ValueError(f"rays_o/rays_d must both be [B,N,3], got {tuple(rays_o.shape)}, {tuple(rays_d.shape)}")
    B, N, _ = rays_o.shape
    if isinstance(background, Tensor):
        bg = background.to(rays_o).reshape(B, 1, 3)
    else:
        bg = torch.full((B, 1, 3), float(background), dtype=rays_o.dtype, device=rays_o.device)
    clamp = (not stratified) if clamp is None else clamp
    outs: dict[str, list[Tensor]] = {"rgb": [], "depth": [], "opacity": []}
    for s in range(0, N, chunk):
        o, d = rays_o[:, s:s + chunk], rays_d[:, s:s + chunk]  # [B, n, 3]
        n = o.shape[1]
        _, t, delta, points = ray_samples(o, d, box, samples, near_min, stratified, generator)
        density, rgb = field(points.reshape(B, n * samples, 3))
        res = composite(density.reshape(B, n, samples, 1), rgb.reshape(B, n, samples, 3), t, delta, bg, clamp)
        for k in outs:
            outs[k].append(res[k])
    return {k: torch.cat(v, dim=1) for k, v in outs.items()}

"""Volume rendering of a radiance field along rays clipped to the scene box (paper §3.2, NeRF stage).

Each ray is clipped to the cube [-box, box]^3 by the slab test, its near end raised to at least `near_min`,
and the segment cut into `samples` equal bins; a sample sits at the bin middle (evaluation) or uniformly
inside its bin (stratified, training). Densities become alphas 1 − exp(−σ·Δ), transmittance is the
exclusive cumulative product, and colour is composited over the background. Rays are processed in chunks
so that full images render within bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# field(points [B, M, 3]) -> (density [B, M, 1] >= 0, rgb [B, M, 3])
Field = Callable[[Tensor], tuple[Tensor, Tensor]]


def ray_box(rays_o: Tensor, rays_d: Tensor, box: float, near_min: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test of rays [..., 3] against [-box, box]^3: near, far [..., 1] and hit [..., 1] (bool).

    near is raised to `near_min`; a ray hits when far > near. For missed rays near = far (an empty segment).
    """
    # Axis-parallel directions: a tiny same-signed component keeps 0·inf out of the slab products.
    # (A tensor, not a Python float: torch.where would round a scalar through float32, to 0 for float64.)
    tiny = torch.full_like(rays_d, torch.finfo(rays_d.dtype).tiny ** 0.5)
    d = torch.where(rays_d.abs() < tiny, torch.where(rays_d < 0, -tiny, tiny), rays_d)
    t0, t1 = (-box - rays_o) / d, (box - rays_o) / d
    near = torch.minimum(t0, t1).amax(dim=-1, keepdim=True).clamp(min=near_min)
    far = torch.maximum(t0, t1).amin(dim=-1, keepdim=True)
    hit = far > near
    return near, torch.where(hit, far, near), hit


def composite(density: Tensor, rgb: Tensor, t: Tensor, delta: Tensor, background: Tensor
              ) -> dict[str, Tensor]:
    """Alpha compositing of S samples per ray.

    density [..., S, 1], rgb [..., S, 3], t [..., S, 1] sample distances, delta [..., S, 1] bin lengths,
    background [..., 3] (broadcastable). Returns rgb [..., 3], depth [..., 1] (expected termination distance
    given that the ray terminates; 0 where nothing is hit), opacity [..., 1], weights [..., S, 1].
    """
    tau = density * delta  # optical thickness of each bin
    alpha = 1.0 - torch.exp(-tau)
    # Exclusive transmittance exp(-sum_{j<i} tau_j): summing in log space avoids a cumprod of (1 - alpha).
    trans = torch.exp(-(torch.cumsum(tau, dim=-2) - tau))
    weights = trans * alpha
    opacity = weights.sum(dim=-2)
    color = (weights * rgb).sum(dim=-2) + (1.0 - opacity) * background
    depth = (weights * t).sum(dim=-2) / opacity.clamp(min=1e-10)
    depth = torch.where(opacity > 1e-10, depth, torch.zeros_like(depth))
    return {"rgb": color, "depth": depth, "opacity": opacity, "weights": weights}


def render_rays(field: Field, rays_o: Tensor, rays_d: Tensor, *, box: float, samples: int,
                near_min: float = 0.0, background: float | Tensor = 1.0, stratified: bool = False,
                chunk: int = 8192, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Render rays_o, rays_d [B, N, 3] (directions unit length) through `field`.

    background: a float (all channels) or [B, 3]. Returns rgb [B, N, 3], depth [B, N, 1] (distance along
    the ray), opacity [B, N, 1]. `chunk` bounds the rays evaluated at once (per batch element).
    """
    if rays_o.shape != rays_d.shape or rays_o.ndim != 3 or rays_o.shape[-1] != 3:
        raise ValueError(f"rays_o/rays_d must both be [B,N,3], got {tuple(rays_o.shape)}, {tuple(rays_d.shape)}")
    B, N, _ = rays_o.shape
    if isinstance(background, Tensor):
        bg = background.to(rays_o).reshape(B, 1, 3)
    else:
        bg = torch.full((B, 1, 3), float(background), dtype=rays_o.dtype, device=rays_o.device)
    steps = torch.arange(samples, dtype=rays_o.dtype, device=rays_o.device)
    outs: dict[str, list[Tensor]] = {"rgb": [], "depth": [], "opacity": []}
    for s in range(0, N, chunk):
        o, d = rays_o[:, s:s + chunk], rays_d[:, s:s + chunk]  # [B, n, 3]
        n = o.shape[1]
        near, far, _ = ray_box(o, d, box, near_min)  # [B, n, 1]
        if stratified:
            jitter = torch.rand(B, n, samples, generator=generator, device=o.device, dtype=o.dtype)
        else:
            jitter = torch.full((B, n, samples), 0.5, device=o.device, dtype=o.dtype)
        length = far - near
        t = (near + length * (steps + jitter) / samples)[..., None]  # [B, n, S, 1]
        delta = (length / samples)[..., None].expand_as(t)
        points = o[:, :, None] + t * d[:, :, None]  # [B, n, S, 3]
        density, rgb = field(points.reshape(B, n * samples, 3))
        res = composite(density.reshape(B, n, samples, 1), rgb.reshape(B, n, samples, 3), t, delta, bg)
        for k in outs:
            outs[k].append(res[k])
    return {k: torch.cat(v, dim=1) for k, v in outs.items()}

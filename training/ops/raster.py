"""Differentiable triangle rasterization: a pure-PyTorch twin of nvdiffrast, and the backend switch.

The twin has nvdiffrast's interface and output conventions:

- `rasterize(ctx, pos, tri, resolution, ranges=None, grad_db=True)` → (rast [B, H, W, 4], rast_db).
  pos is clip space: [B, V, 4] with tri [F, 3] (instanced mode: one mesh, B views) or [V, 4] with
  `ranges` [B, 2] (start triangle, count) (range mode). rast = (u, v, z/w, triangle_id + 1), 0 everywhere
  a pixel is empty; (u, v) are perspective-correct barycentrics with vertex weights (u, v, 1 − u − v)
  for the triangle's vertices (0, 1, 2); z/w is the NDC depth, the nearest one wins. Pixel (col i, row j)
  samples NDC (2(i + 0.5)/W − 1, 2(j + 0.5)/H − 1); row 0 is NDC y = −1 (so with
  `training.cameras.opencv_to_clip` rows come out in OpenCV image order). No face culling. rast_db is a
  zero placeholder (image-space derivatives are not computed).
- `interpolate(attr, rast, tri)` → (out [B, H, W, C], empty tensor); attr [B, V, C], [1, V, C] or [V, C].
- `antialias(color, rast, pos, tri)` → color [B, H, W, C]. **Approximate on CPU**: only silhouettes
  against the background are smoothed. For each pair of neighbouring pixels (one covered by triangle T,
  one empty) the fraction α at which the silhouette crosses the segment between the two pixel centres is
  found from screen-space barycentrics: the segment is walked from T across shared edges (`face_neighbours`)
  while the next face faces the same way, and α is where it leaves the last face (nvdiffrast's silhouette
  edges: one face, or faces facing opposite ways). Stopping at T's own exit edge instead under-covers
  meshes of sub-pixel triangles — marching cubes' — by the part of the pixel pair beyond T: 3.3 % of a
  sphere's area at 96² (`tests/training/ops/test_raster.py`). If the mesh reaches past the midpoint
  (α > ½) the empty pixel takes (α − ½) of T's colour, otherwise the covered pixel takes (½ − α) of the
  background. α depends on the vertex positions, so the mask gets gradients to positions as in nvdiffrast's
  analytic antialiasing, but occlusion edges inside the object are left as they are (nvdiffrast smooths
  those too).

Gradients reach vertex positions through the barycentrics (and z/w): which triangle covers a pixel is
found without gradients, then (u, v, z/w) are recomputed differentiably for the winners. Work is tiled:
(triangle, pixel) candidate pairs are processed in chunks of at most `max_pairs`.

Triangles with any vertex at w ≤ 0 are dropped (nvdiffrast clips them against the near plane); pixels
with z/w outside [−1, 1] are not drawn, as in nvdiffrast.

On CUDA the same calls go to nvdiffrast (`diffrp-nvdiffrast`, `RasterizeCudaContext`), loaded lazily by
`cuda_context()`; `Rasterizer(backend, device)` picks one ('auto' | 'torch' | 'nvdiffrast').
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from types import ModuleType

import torch
from torch import Tensor

MAX_PAIRS = 1 << 22  # (triangle, pixel) candidates per chunk on CUDA: bounds the twin's working memory (~0.5 GB)
CPU_MAX_PAIRS = 1 << 18  # on CPU: chunks that stay in cache (4M-pair chunks were 1.25x slower on one core)


def _default_pairs(device: torch.device) -> int:
    return MAX_PAIRS if device.type == "cuda" else CPU_MAX_PAIRS


class TorchRasterizeContext:
    """Stands where nvdiffrast's context does; the twin keeps no state besides the device."""

    def __init__(self, device: torch.device | str | None = None, max_pairs: int | None = None):
        self.device = torch.device(device or "cpu")
        self.max_pairs = max_pairs or _default_pairs(self.device)


def _resolution(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def _cross2(ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor) -> Tensor:
    return ax * by - ay * bx


def _screen_bary(p: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Screen-space barycentrics [..., 3] of points (px, py) in triangles p [..., 3, 2] (affine, may be < 0)."""
    x0, y0 = p[..., 0, 0], p[..., 0, 1]
    x1, y1 = p[..., 1, 0], p[..., 1, 1]
    x2, y2 = p[..., 2, 0], p[..., 2, 1]
    area = _cross2(x1 - x0, y1 - y0, x2 - x0, y2 - y0)
    area = torch.where(area == 0, torch.ones_like(area), area)  # degenerate: rejected by the caller
    b0 = _cross2(x1 - px, y1 - py, x2 - px, y2 - py) / area
    b1 = _cross2(x2 - px, y2 - py, x0 - px, y0 - py) / area
    return torch.stack([b0, b1, 1.0 - b0 - b1], dim=-1)


def _to_screen(clip: Tensor, H: int, W: int) -> tuple[Tensor, Tensor]:
    """clip [..., 4] → screen (x, y) [..., 2] in pixels (centre of pixel i at i + 0.5), z/w [...]."""
    w = clip[..., 3]
    xs = (clip[..., 0] / w * 0.5 + 0.5) * W
    ys = (clip[..., 1] / w * 0.5 + 0.5) * H
    return torch.stack([xs, ys], dim=-1), clip[..., 2] / w


def _visible_triangles(pos: Tensor, tri: Tensor, H: int, W: int, max_pairs: int) -> Tensor:
    """Index of the nearest triangle covering each pixel of B views at once, [B, H*W] int64 (−1 = empty).

    pos [B, V, 4] clip space. No gradients. The coverage test is in float32 (screen positions of a 512²
    view are exact to ~3e-5 px there): each barycentric is a cross product of two vertex offsets, which
    two triangles sharing an edge compute with exactly opposite signs, so a pixel centre on a shared edge
    is covered by both (the nearer wins) and meshes have no cracks. All views go through one pass of
    (triangle, pixel) candidates in chunks of at most `max_pairs`, so per-view overheads are paid once.
    """
    device = pos.device
    B = pos.shape[0]
    F_ = len(tri)
    keys = torch.full((B * H * W,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    if F_ == 0:
        return torch.full((B, H * W), -1, dtype=torch.int64, device=device)
    v = pos.detach().float()[:, tri].reshape(B * F_, 3, 4)  # triangle g = view * F + face
    ok = (v[..., 3] > 1e-9).all(1)
    scr, zw = _to_screen(v, H, W)  # [B*F, 3, 2], [B*F, 3]
    lo = torch.ceil(scr.amin(1) - 0.5).clamp(min=0)  # first pixel whose centre is >= the bbox min
    hi = torch.minimum(torch.floor(scr.amax(1) - 0.5), torch.tensor([W - 1, H - 1], dtype=scr.dtype, device=device))
    ext = (hi - lo + 1).clamp(min=0)
    ext = torch.where(ok[:, None] & torch.isfinite(ext), ext, torch.zeros_like(ext)).long()  # [B*F, 2]
    lo = torch.nan_to_num(lo).long()
    count = ext[:, 0] * ext[:, 1]
    gid = torch.nonzero(count > 0)[:, 0]
    # What each candidate needs, gathered once per triangle with an outer index: offsets, extents, vertices.
    table = torch.cat([scr[gid].reshape(-1, 6), zw[gid]], 1)  # [T, 9] float32
    lo_x, lo_y, ew = lo[gid, 0], lo[gid, 1], ext[gid, 0]
    n_all = count[gid]
    pixel_base = (gid // F_) * (H * W)  # the view's first pixel in `keys`
    csum = torch.cumsum(n_all, 0)
    start = 0
    while start < len(gid):
        # The largest run of triangles whose candidate pairs fit the budget (at least one triangle).
        base = csum[start - 1] if start > 0 else torch.zeros((), dtype=csum.dtype, device=device)
        end = max(int(torch.searchsorted(csum, base + max_pairs, right=True)), start + 1)
        n = n_all[start:end]
        t = torch.repeat_interleave(torch.arange(start, end, device=device), n)  # [P] row of `table`
        off = torch.arange(len(t), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        w_t = ew[t]
        px = lo_x[t] + off % w_t
        py = lo_y[t] + off // w_t
        row = table[t]  # [P, 9]
        b = _screen_bary(row[:, :6].reshape(-1, 3, 2), px.float() + 0.5, py.float() + 0.5)  # [P, 3]
        z = (b * row[:, 6:]).sum(1)
        inside = (b >= 0).all(1) & (z >= -1) & (z <= 1)
        # Pack (depth, face) into one int64 so a single amin finds the nearest (ties: lower id).
        zkey = ((z[inside] + 1.0) * 0.5).view(torch.int32).long()  # non-negative floats sort as ints
        key = (zkey << 32) | (gid[t[inside]] % F_)
        keys.scatter_reduce_(0, (pixel_base[t] + py * W + px)[inside], key, reduce="amin")
        start = end
    empty = keys == torch.iinfo(torch.int64).max
    return torch.where(empty, torch.full_like(keys, -1), keys & 0xFFFFFFFF).reshape(B, H * W)


def _rasterize_views(pos: Tensor, tri: Tensor, H: int, W: int, max_pairs: int) -> Tensor:
    """pos [B, V, 4] clip, tri [F, 3] long → rast [B, H, W, 4] with gradients to pos through (u, v, z/w)."""
    B = pos.shape[0]
    fid = _visible_triangles(pos, tri, H, W, max_pairs)
    view, pix = torch.nonzero(fid >= 0, as_tuple=True)
    f = fid[view, pix]
    clip = pos[view[:, None], tri[f]]  # [P, 3, 4], differentiable
    rast = torch.zeros(B * H * W, 4, dtype=pos.dtype, device=pos.device)
    rast = rast.index_put((view * (H * W) + pix,), _winner_values(clip, f, pix, H, W))
    return rast.reshape(B, H, W, 4)


def _winner_values(clip: Tensor, f: Tensor, pix: Tensor, H: int, W: int) -> Tensor:
    """(u, v, z/w, id + 1) [P, 4] of the winning triangles clip [P, 3, 4] at pixels pix [P], differentiably."""
    scr, zw = _to_screen(clip, H, W)
    px = (pix % W).to(clip.dtype) + 0.5
    py = (pix // W).to(clip.dtype) + 0.5
    b = _screen_bary(scr, px, py)  # screen-space (affine) weights
    bw = b / clip[..., 3]  # perspective correction: weights / w, renormalised
    bw = bw / bw.sum(1, keepdim=True)
    return torch.stack([bw[:, 0], bw[:, 1], (b * zw).sum(1), (f + 1).to(clip.dtype)], dim=1)


def rasterize_reference(pos: Tensor, tri: Tensor, resolution: int | tuple[int, int],
                        max_pairs: int = MAX_PAIRS) -> Tensor:
    """The first twin, kept as the reference the fast path is tested and benchmarked against: one view at a
    time, coverage in float64. pos [B, V, 4] clip, tri [F, 3] → rast [B, H, W, 4]."""
    H, W = _resolution(resolution)
    tri = tri.long()
    out = []
    for p in pos:
        fid = _visible_triangle_f64(p, tri, H, W, max_pairs)
        pix = torch.nonzero(fid >= 0)[:, 0]
        f = fid[pix]
        rast = torch.zeros(H * W, 4, dtype=p.dtype, device=p.device)
        out.append(rast.index_put((pix,), _winner_values(p[tri[f]], f, pix, H, W)).reshape(H, W, 4))
    return torch.stack(out)


def _visible_triangle_f64(pos: Tensor, tri: Tensor, H: int, W: int, max_pairs: int) -> Tensor:
    """`rasterize_reference`'s coverage: nearest triangle per pixel of one view, [H*W] int64 (−1 = empty)."""
    device = pos.device
    keys = torch.full((H * W,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    if len(tri) == 0:
        return torch.full((H * W,), -1, dtype=torch.int64, device=device)
    v = pos.detach().double()[tri]  # [F, 3, 4]
    ok = (v[..., 3] > 1e-9).all(1)
    scr, zw = _to_screen(v, H, W)  # [F, 3, 2], [F, 3]
    lo = torch.ceil(scr.amin(1) - 0.5).clamp(min=0)  # first pixel whose centre is >= the bbox min
    hi = torch.floor(scr.amax(1) - 0.5)
    hi = torch.minimum(hi, torch.tensor([W - 1, H - 1], dtype=hi.dtype, device=device))
    ext = (hi - lo + 1).clamp(min=0)
    ext = torch.where(ok[:, None] & torch.isfinite(ext), ext, torch.zeros_like(ext)).long()  # [F, 2]
    lo = torch.nan_to_num(lo).long()
    count = ext[:, 0] * ext[:, 1]
    fid = torch.nonzero(count > 0)[:, 0]
    csum = torch.cumsum(count[fid], 0)
    start = 0
    while start < len(fid):
        # The largest run of triangles whose candidate pairs fit the budget (at least one triangle).
        base = csum[start - 1] if start > 0 else torch.zeros((), dtype=csum.dtype, device=device)
        end = int(torch.searchsorted(csum, base + max_pairs, right=True))
        end = max(end, start + 1)
        f = fid[start:end]
        n = count[f]
        pf = torch.repeat_interleave(f, n)  # [P]
        off = torch.arange(len(pf), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        ew = ext[pf, 0]
        px = lo[pf, 0] + off % ew
        py = lo[pf, 1] + off // ew
        b = _screen_bary(scr[pf], px.double() + 0.5, py.double() + 0.5)  # [P, 3]
        z = (b * zw[pf]).sum(1)
        inside = (b >= 0).all(1) & (z >= -1) & (z <= 1)
        # Pack (depth, triangle) into one int64 so a single amin finds the nearest (ties: lower id).
        zkey = ((z[inside] + 1.0) * 0.5).float().view(torch.int32).long()  # non-negative floats sort as ints
        key = (zkey << 32) | pf[inside]
        keys.scatter_reduce_(0, (py * W + px)[inside], key, reduce="amin")
        start = end
    empty = keys == torch.iinfo(torch.int64).max
    return torch.where(empty, torch.full_like(keys, -1), keys & 0xFFFFFFFF)


def rasterize(glctx: TorchRasterizeContext | None, pos: Tensor, tri: Tensor,
              resolution: int | tuple[int, int], ranges: Tensor | None = None, grad_db: bool = True
              ) -> tuple[Tensor, Tensor]:
    """nvdiffrast.torch.rasterize, in PyTorch (see the module docstring for conventions)."""
    H, W = _resolution(resolution)
    max_pairs = glctx.max_pairs if isinstance(glctx, TorchRasterizeContext) else _default_pairs(pos.device)
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise ValueError(f"tri must be [F, 3], got {tuple(tri.shape)}")
    tri = tri.long()
    if pos.ndim == 3:  # instanced: [B, V, 4]
        if ranges is not None:
            raise ValueError("ranges are only valid with pos [V, 4] (range mode)")
        if pos.shape[-1] != 4:
            raise ValueError(f"pos must be [B, V, 4], got {tuple(pos.shape)}")
        rast = _rasterize_views(pos, tri, H, W, max_pairs)
    elif pos.ndim == 2:  # range mode: [V, 4] with ranges [B, 2]
        if pos.shape[-1] != 4:
            raise ValueError(f"pos must be [V, 4], got {tuple(pos.shape)}")
        if ranges is None:
            ranges = torch.tensor([[0, len(tri)]])
        outs = []
        for s, n in ranges.tolist():
            r = _rasterize_views(pos[None], tri[s:s + n], H, W, max_pairs)[0]
            # triangle ids are global in range mode: shift the local ids by the range start
            r = torch.cat([r[..., :3], torch.where(r[..., 3:] > 0, r[..., 3:] + s, r[..., 3:])], dim=-1)
            outs.append(r)
        rast = torch.stack(outs)
    else:
        raise ValueError(f"pos must be [B, V, 4] or [V, 4], got {tuple(pos.shape)}")
    return rast, torch.zeros_like(rast)


def interpolate(attr: Tensor, rast: Tensor, tri: Tensor, rast_db: Tensor | None = None,
                diff_attrs: object = None) -> tuple[Tensor, Tensor]:
    """nvdiffrast.torch.interpolate: attr [B|1, V, C] or [V, C], rast [B, H, W, 4] → ([B, H, W, C], empty)."""
    B, H, W, _ = rast.shape
    tri = tri.long()
    fid = rast[..., 3].long() - 1  # [B, H, W]
    hit = fid >= 0
    idx = tri[fid.clamp(min=0)]  # [B, H, W, 3]
    if attr.ndim == 2:
        attr = attr[None]
    if attr.shape[0] not in (1, B):
        raise ValueError(f"attr batch {attr.shape[0]} does not match rast batch {B}")
    a = attr.expand(B, -1, -1)
    bidx = torch.arange(B, device=rast.device)[:, None, None]
    a0, a1, a2 = a[bidx, idx[..., 0]], a[bidx, idx[..., 1]], a[bidx, idx[..., 2]]  # [B, H, W, C]
    u, v = rast[..., 0:1], rast[..., 1:2]
    out = u * a0 + v * a1 + (1.0 - u - v) * a2
    out = torch.where(hit[..., None], out, torch.zeros_like(out))
    return out, torch.zeros(0, device=rast.device)


def face_neighbours(tri: Tensor) -> Tensor:
    """[F, 3]: the face across the edge opposite vertex k of each face (the edge (v_k+1, v_k+2)); −1 where
    that edge has no other face, or more than one other (a boundary or non-manifold edge: a silhouette)."""
    tri = tri.long()
    F_ = len(tri)
    a, b = tri[:, [1, 2, 0]].reshape(-1), tri[:, [2, 0, 1]].reshape(-1)
    n = int(tri.max()) + 1 if F_ else 1
    key = torch.minimum(a, b) * n + torch.maximum(a, b)  # [3F]: edge k of face f at 3f + k
    order = torch.argsort(key, stable=True)
    sk = key[order]
    nb = torch.full((3 * F_,), -1, dtype=torch.long, device=tri.device)
    if F_ == 0:
        return nb.reshape(0, 3)
    same = sk[1:] == sk[:-1]  # position i pairs with i + 1
    pair = same.clone()  # an edge of exactly two faces: equal to its next key, not to the one before or after
    pair[1:] &= ~same[:-1]
    pair[:-1] &= ~same[1:]
    i = torch.nonzero(pair, as_tuple=True)[0]
    nb[order[i]] = order[i + 1] // 3
    nb[order[i + 1]] = order[i] // 3
    return nb.reshape(F_, 3)


SILHOUETTE_HOPS = 64  # faces a segment may cross to its silhouette: near it MC faces are slivers (up to ~40)


def _segment_exits(q: Tensor, c_in: Tensor, c_out: Tensor) -> Tensor:
    """For segments c_in → c_out [P, 2] and screen triangles q [P, 3, 2]: where along the segment (0 at c_in, 1 at
    c_out) each barycentric falls to zero, [P, 3]; 2 for one that does not fall (an edge the segment enters by,
    or runs parallel to)."""
    b_in = _screen_bary(q, c_in[:, 0], c_in[:, 1])
    b_out = _screen_bary(q, c_out[:, 0], c_out[:, 1])
    denom = b_in - b_out
    return torch.where(denom > 1e-12, b_in / denom.clamp(min=1e-12), torch.full_like(b_in, 2.0))


def _silhouette_faces(scr: Tensor, facing: Tensor, tri: Tensor, bi: Tensor | None, f: Tensor, c_in: Tensor,
                      c_out: Tensor, nbrs: Tensor, hops: int) -> Tensor:
    """Walk each segment c_in → c_out [P, 2] from its covering face f [P] across shared edges to the face whose
    exit edge is a silhouette (no neighbour, or one facing the other way), crossing at most `hops` edges.
    scr: vertex screen positions [B, V, 2] (bi [P]: each segment's view) or [V, 2] (bi None); facing: +1 / −1
    per face by screen orientation, 0 for a face the walk must not enter (a vertex at w ≤ 0, or no area),
    [B, F] or [F]. No gradients."""
    active = torch.ones_like(f, dtype=torch.bool)
    for _ in range(hops):
        idx = torch.nonzero(active, as_tuple=True)[0]
        if len(idx) == 0:
            break
        fa = f[idx]
        b = None if bi is None else bi[idx]
        q = scr[tri[fa]] if b is None else scr[b[:, None], tri[fa]]  # [P, 3, 2]
        t_exit, k = _segment_exits(q, c_in[idx], c_out[idx]).min(1)
        nb = nbrs[fa, k]
        nbc = nb.clamp(min=0)
        here, there = (facing[fa], facing[nbc]) if b is None else (facing[b, fa], facing[b, nbc])
        step = (nb >= 0) & (there != 0) & (there == here) & (t_exit < 1.0)  # an inner edge before c_out
        f = f.index_put((idx[step],), nb[step])
        active = active.index_put((idx[~step],), torch.zeros_like(idx[~step], dtype=torch.bool))
    return f


def antialias(color: Tensor, rast: Tensor, pos: Tensor, tri: Tensor, topology_hash: object = None,
              pos_gradient_boost: float = 1.0, silhouette_hops: int = SILHOUETTE_HOPS) -> Tensor:
    """Approximate nvdiffrast.torch.antialias (silhouettes against empty pixels only; module docstring).
    `silhouette_hops=0` is the twin before 2026-12-02 (the covering triangle's own exit edge; the benchmark's
    baseline)."""
    B, H, W, C = color.shape
    tri = tri.long()
    with torch.no_grad():  # what the silhouette walk reads: topology, vertex screen positions, face orientation
        nbrs = face_neighbours(tri)
        scr_v = _to_screen(pos.detach(), H, W)[0]  # [B, V, 2] or [V, 2]
        q = scr_v[..., tri, :]  # [B, F, 3, 2] or [F, 3, 2]
        area = _cross2(q[..., 1, 0] - q[..., 0, 0], q[..., 1, 1] - q[..., 0, 1], q[..., 2, 0] - q[..., 0, 0],
                       q[..., 2, 1] - q[..., 0, 1])
        in_front = (pos[..., 3] > 0)[..., tri].all(-1)  # as `rasterize`, a face with a vertex at w <= 0 is dropped
        facing = torch.sign(area).where(in_front & torch.isfinite(area), torch.zeros_like(area))
    out = color
    for dy, dx in ((0, 1), (1, 0)):  # right and down neighbours; both directions of each pair below
        fa = rast[:, : H - dy, : W - dx, 3].long() - 1
        fb = rast[:, dy:, dx:, 3].long() - 1
        for covered, empty, sign in ((fa, fb, 1), (fb, fa, -1)):
            sel = (covered >= 0) & (empty < 0)
            bi, yi, xi = torch.nonzero(sel, as_tuple=True)  # coordinates in the cropped frame
            if len(bi) == 0:
                continue
            # Pixel of the covered side and of the empty side in full-image coordinates.
            cy, cx = (yi, xi) if sign == 1 else (yi + dy, xi + dx)
            ey, ex = (yi + dy, xi + dx) if sign == 1 else (yi, xi)
            c_in = torch.stack([cx, cy], -1).to(pos.dtype) + 0.5
            c_out = torch.stack([ex, ey], -1).to(pos.dtype) + 0.5
            # The face whose edge is the silhouette the segment leaves through (no gradients), then where it
            # leaves, differentiably in that face's vertices.
            f = _silhouette_faces(scr_v, facing, tri, bi if pos.ndim == 3 else None, covered[bi, yi, xi], c_in,
                                  c_out, nbrs, silhouette_hops)
            p = pos[bi[:, None], tri[f]] if pos.ndim == 3 else pos[tri[f]]  # [P, 3, 4]
            alpha = _segment_exits(_to_screen(p, H, W)[0], c_in, c_out).amin(1).clamp(0.0, 1.0)[:, None]  # [P, 1]
            c_in_col, c_out_col = color[bi, cy, cx], color[bi, ey, ex]
            new_out = c_out_col + (alpha - 0.5).clamp(min=0) * (c_in_col - c_out_col)
            new_in = c_in_col + (0.5 - alpha).clamp(min=0) * (c_out_col - c_in_col)
            out = out.index_put((bi, ey, ex), new_out - c_out_col, accumulate=True)
            out = out.index_put((bi, cy, cx), new_in - c_in_col, accumulate=True)
    return out


# ----------------------------------------------------------------------------------------------------------
# nvdiffrast (CUDA), loaded lazily, and the backend switch.
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _nvdiffrast() -> ModuleType:
    """Import nvdiffrast.torch, preparing what its first-use JIT build needs.

    diffrp-nvdiffrast compiles its plugin with torch.utils.cpp_extension on first use. With torch ≥ 2.9 the
    built module is not importable unless its build directory is on sys.path, and nvcc must find the CUDA
    headers of the pip toolkit (nvidia/cu13/include) through CPATH when the system has none.
    """
    try:
        import nvidia  # the CUDA runtime wheels' namespace package

        for root in list(nvidia.__path__):
            for sub in ("cu13", "cu12"):
                inc = os.path.join(root, sub, "include")
                if os.path.isdir(inc) and inc not in os.environ.get("CPATH", ""):
                    os.environ["CPATH"] = inc + (os.pathsep + os.environ["CPATH"] if os.environ.get("CPATH") else "")
    except ImportError:
        pass
    try:
        module = importlib.import_module("nvdiffrast.torch")
    except ImportError as e:
        raise ImportError("nvdiffrast is not installed (pip install diffrp-nvdiffrast; needs CUDA, nvcc, ninja); "
                          "use raster_backend='torch' for the PyTorch twin") from e
    try:
        import nvdiffrast
        from torch.utils.cpp_extension import _get_build_directory

        # The plugin's name as nvdiffrast.torch.ops._get_plugin builds it (version- and torch-specific):
        # torch >= 2.9 no longer puts its build directory on sys.path, so the final import would fail.
        name = re.sub(r"\W|^(?=\d)", "_", f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}")
        for plugin in (name, name + "_gl"):
            build_dir = _get_build_directory(plugin, verbose=False)
            if build_dir not in sys.path:
                sys.path.append(build_dir)
    except Exception:  # noqa: BLE001 - private torch helper; the plugin import reports the real problem
        pass
    return module


@functools.cache
def cuda_context(device: str = "cuda") -> object:
    """A shared `nvdiffrast.torch.RasterizeCudaContext` (builds the plugin on first call)."""
    return _nvdiffrast().RasterizeCudaContext(device=torch.device(device))


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' → 'nvdiffrast' on CUDA when it imports, else 'torch'; explicit names are checked."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            try:
                _nvdiffrast()
                return "nvdiffrast"
            except ImportError:
                return "torch"
        return "torch"
    if backend not in ("torch", "nvdiffrast"):
        raise ValueError(f"unknown raster backend {backend!r} (auto | torch | nvdiffrast)")
    if backend == "nvdiffrast" and device.type != "cuda":
        raise ValueError("raster backend 'nvdiffrast' needs a CUDA device")
    return backend


class Rasterizer:
    """One object with rasterize / interpolate / antialias bound to a backend (nvdiffrast or the twin)."""

    def __init__(self, backend: str = "auto", device: torch.device | str = "cpu"):
        self.backend = resolve_backend(backend, device)
        self.ctx_device = torch.device(device)
        if self.backend == "nvdiffrast":
            self.dr: ModuleType | None = _nvdiffrast()
            self.ctx: object = cuda_context(str(torch.device(device)))
        else:
            self.dr = None
            self.ctx = TorchRasterizeContext(device)

    def rasterize(self, pos: Tensor, tri: Tensor, resolution: int | tuple[int, int],
                  ranges: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.dr is not None:
            return self.dr.rasterize(self.ctx, pos.float().contiguous(), tri.int().contiguous(), resolution,
                                     ranges=ranges)
        return rasterize(self.ctx, pos, tri, resolution, ranges=ranges)

    def interpolate(self, attr: Tensor, rast: Tensor, tri: Tensor) -> tuple[Tensor, Tensor]:
        if self.dr is not None:
            return self.dr.interpolate(attr.float().contiguous(), rast, tri.int().contiguous())
        return interpolate(attr, rast, tri)

    def antialias(self, color: Tensor, rast: Tensor, pos: Tensor, tri: Tensor) -> Tensor:
        if self.dr is not None:
            return self.dr.antialias(color.contiguous(), rast, pos.float().contiguous(), tri.int().contiguous())
        return antialias(color, rast, pos, tri)


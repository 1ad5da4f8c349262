"""The mesh representation of a GTR triplane (paper §3.2): extract it with differentiable marching cubes and
render it with the differentiable rasterizer, colour from f_c at the interpolated surface points.

    verts, faces = extract_mesh(model, planes, grid=256, level=10.0)          # our normalised world frame
    out = render_mesh(model, planes, verts, faces, c2w, K, H, W, background)  # rgb/depth/mask/normal
    surface = rasterize_mesh(rasterizer, verts, faces, c2w, K, H, W)           # the same render in two steps:
    out = shade(model, planes, surface, background)                           # rasterize once, shade often

Both are differentiable end to end: image → barycentrics → vertex positions → sdf values → f_d and the
triplane; and image → surface points → f_c and the triplane. This is the one textured-mesh renderer: stage 2
(`training.mesh_objective`), texture refinement (`training.refine`: rasterize once, shade every step),
reconstruction and evaluation (`training.inference`) all render through it.

`model` is a GTR or anything with its frame API: `box_half_size_ours()` (the grid covers [-h, h]^3 of OUR
frame, whatever frame the model works in), `query_density(planes, points)` and `query_color(planes, points)`
(points in our frame). `model.cfg.scene_box` is never read here: with `official_frame` it is in the released
model's units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.cameras import opencv_to_clip
from training.ops.marching_cubes import marching_cubes
from training.ops.raster import Rasterizer
from training.sdf_grid import GridStats, coarse_to_fine_sdf, dense_sdf, lattice_points

CLIP_NEAR, CLIP_FAR = 0.05, 100.0  # rasterizer depth range (world units); cameras sit ~2.6 from the origin


def _one_asset(planes: Tensor) -> Tensor:
    if planes.ndim == 4:
        planes = planes[None]
    if planes.ndim != 5 or planes.shape[0] != 1:
        raise ValueError(f"planes must be one asset's [3, C, R, R] or [1, 3, C, R, R], got {tuple(planes.shape)}")
    return planes


def query_density(model: torch.nn.Module, planes: Tensor, points: Tensor, chunk: int = 1 << 18) -> Tensor:
    """f_d at points [N, 3] (our frame) for one asset, in chunks → [N] (f_c is not evaluated)."""
    out = [model.query_density(planes, p[None])[0, :, 0] for p in points.split(chunk)]
    return torch.cat(out) if out else points.new_zeros(0)


EXTRACT_METHODS = ("dense", "coarse_to_fine")


def sdf_grid(model: torch.nn.Module, planes: Tensor, grid: int, level: float, method: str = "coarse_to_fine",
             chunk: int = 1 << 18, stride: int = 4, dilate: int = 1) -> tuple[Tensor, GridStats]:
    """sdf = −(density − level) on the G³ grid over the model's box (our frame, corners included), without
    autograd: every sample (`dense`) or coarse-to-fine (`training.sdf_grid`: the dense grid's mesh for every
    surface component it finds). planes: one asset. Returns (sdf [G, G, G], what it cost)."""
    if method not in EXTRACT_METHODS:
        raise ValueError(f"unknown mesh extraction {method!r} ({' | '.join(EXTRACT_METHODS)})")
    planes = _one_asset(planes)
    box = float(model.box_half_size_ours())
    axis = torch.linspace(-box, box, grid, device=planes.device)

    def sdf_at(points: Tensor) -> Tensor:
        return -(query_density(model, planes, points, chunk) - level)

    with torch.no_grad():
        if method == "dense":
            return dense_sdf(sdf_at, axis)
        return coarse_to_fine_sdf(sdf_at, axis, stride, dilate)


MESH_BACKENDS = {"torch": ("torch", "torch"), "cuda": ("diso", "nvdiffrast")}  # mesh.backend → (mc, raster)


def mesh_backends(mesh_cfg: object) -> tuple[str, str]:
    """(marching-cubes, rasterizer) backends of a MeshConfig: mesh.backend when set (torch = the permissive
    twins, cuda = diso + nvdiffrast), else mesh.mc_backend and mesh.raster_backend. ValueError if unknown."""
    chosen = mesh_cfg.backend
    if not chosen:
        return mesh_cfg.mc_backend, mesh_cfg.raster_backend
    if chosen not in MESH_BACKENDS:
        raise ValueError(f"unknown mesh.backend {chosen!r} (torch | cuda, or empty for mc_backend/raster_backend)")
    return MESH_BACKENDS[chosen]


def extract_options(mesh_cfg: object) -> dict:
    """extract_mesh's method / stride / dilate from a MeshConfig (mesh.extract, mesh.coarse_stride, mesh.coarse_dilate)."""
    return {"method": mesh_cfg.extract, "stride": mesh_cfg.coarse_stride, "dilate": mesh_cfg.coarse_dilate}


def extract_mesh(model: torch.nn.Module, planes: Tensor, grid: int, level: float, backend: str = "auto",
                 chunk: int = 1 << 18, method: str = "coarse_to_fine", stride: int = 4, dilate: int = 1,
                 stats: dict | None = None) -> tuple[Tensor, Tensor]:
    """Mesh of the triplane's density level set `level`: sdf = −(density − level) on a G³ grid over the box.

    planes: one asset [3, C, R, R] or [1, 3, C, R, R]. The grid spans the model's scene box expressed in our
    frame (`model.box_half_size_ours()`), corners included. `method` (mesh.extract): `dense` evaluates f_d
    at all G³ samples; `coarse_to_fine` (mesh.coarse_stride, mesh.coarse_dilate) only in coarse cells the
    surface passes through, with the same mesh for every component it finds (`training.sdf_grid` says which
    it can miss). Returns verts [N, 3] (our normalised world frame, float32) and faces [F, 3] (long,
    counter-clockwise seen from outside). Gradients reach `planes` and f_d. `stats`, when given, receives
    the grid's cost (`GridStats` fields).

    Memory: the grid is evaluated without autograd; only the grid values next to a sign change (the only
    ones a vertex depends on) are evaluated again with autograd and written back, so the graph is
    proportional to the surface, not to G³ (the same samples and gradients with either method).
    """
    planes = _one_asset(planes)
    box = float(model.box_half_size_ours())
    sdf, cost = sdf_grid(model, planes, grid, level, method, chunk, stride, dilate)
    if stats is not None:
        stats.update(vars(cost))
    if torch.is_grad_enabled() and (planes.requires_grad or any(p.requires_grad for p in model.parameters())):
        # A sample matters when a grid neighbour, or the marching cubes' positive padding, has the other sign.
        pos = F.pad(sdf >= 0, (1, 1, 1, 1, 1, 1), value=True)
        near = torch.zeros_like(pos)
        for axis in range(3):
            n = grid + 1
            flip = pos.narrow(axis, 0, n) ^ pos.narrow(axis, 1, n)
            near.narrow(axis, 0, n).logical_or_(flip)
            near.narrow(axis, 1, n).logical_or_(flip)
        near = near[1:-1, 1:-1, 1:-1]
        ijk = torch.nonzero(near)
        coords = torch.linspace(-box, box, grid, device=planes.device)
        live = -(query_density(model, planes, lattice_points(coords, *ijk.unbind(1)), chunk) - level)
        sdf = sdf.index_put((ijk[:, 0], ijk[:, 1], ijk[:, 2]), live)
    verts, faces = marching_cubes(sdf.float(), isovalue=0.0, backend=backend, normalize=True)
    return verts * (2.0 * box) - box, faces


def face_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Unit normals [F, 3] of counter-clockwise faces (outward for `extract_mesh`)."""
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return F.normalize(torch.cross(v1 - v0, v2 - v0, dim=-1), dim=-1)


@dataclass
class Surface:
    """What each pixel of V views sees of one mesh: rasterized once (`rasterize_mesh`), shaded any number of
    times (`shade`): texture refinement changes only the colour on a fixed mesh."""

    points: Tensor  # [V,H,W,3] surface point (our frame) at each pixel centre; 0 where nothing is hit
    depth: Tensor  # [V,H,W,1] planar z of that point (the contract's depth convention); 0 where nothing is hit
    hit: Tensor  # [V,H,W] bool: a triangle covers the pixel centre
    rast: Tensor  # [V,H,W,4] the rasterizer's output (u, v, z/w, triangle id + 1), for antialiasing
    clip: Tensor  # [V,N,4] the vertices in clip space
    faces: Tensor  # [F,3] int64
    rasterizer: Rasterizer  # the backend that rasterized it (and antialiases its shading)


def rasterize_mesh(rasterizer: Rasterizer, verts: Tensor, faces: Tensor, c2w: Tensor, K: Tensor,
                   height: int, width: int) -> Surface:
    """Rasterize mesh verts [N,3] / faces [F,3] (our frame) into V cameras: c2w [V,4,4] OpenCV, K [V,3,3]
    for height x width. Points, depth and clip positions are differentiable in `verts` (stage 2 moves them)."""
    if c2w.ndim != 3 or K.ndim != 3 or c2w.shape[0] != K.shape[0]:
        raise ValueError(f"c2w [V,4,4] and K [V,3,3] expected, got {tuple(c2w.shape)} and {tuple(K.shape)}")
    dev = verts.device
    verts, faces = verts.float(), faces.long()
    c2w, K = c2w.to(dev, torch.float32), K.to(dev, torch.float32)
    V = c2w.shape[0]
    mvp = opencv_to_clip(c2w, K, height, width, CLIP_NEAR, CLIP_FAR)  # [V, 4, 4]
    vh = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=1)  # [N, 4]
    clip = torch.einsum("nj,vij->vni", vh, mvp).contiguous()  # [V, N, 4] clip space
    z_cam = torch.einsum("nj,vj->vn", vh, torch.linalg.inv(c2w)[:, 2, :])[..., None]  # [V, N, 1] planar depth
    rast, _ = rasterizer.rasterize(clip, faces, (height, width))
    attrs = torch.cat([verts[None].expand(V, -1, -1), z_cam], dim=-1).contiguous()  # [V, N, 4]
    interp, _ = rasterizer.interpolate(attrs, rast, faces)  # [V, H, W, 4]
    hit = rast[..., 3] > 0
    return Surface(points=interp[..., :3], depth=interp[..., 3:] * hit[..., None], hit=hit, rast=rast,
                   clip=clip, faces=faces, rasterizer=rasterizer)


def _background(background: float | Tensor, device: torch.device) -> Tensor:
    bg = torch.as_tensor(background, dtype=torch.float32, device=device).reshape(-1)
    return bg.expand(3) if bg.numel() == 1 else bg


def shade(model: torch.nn.Module, planes: Tensor, surface: Surface, background: float | Tensor = 1.0,
          antialias: bool = True, chunk: int = 1 << 18, hard_color: bool = False) -> dict[str, Tensor]:
    """Colour a rasterized surface: rgb [V,3,H,W] = f_c at each hit point (`model.query_color`) composited
    on `background` (a float or [3]) by the coverage, and that coverage, mask [V,1,H,W].

    Differentiable in planes and f_c, and in the vertices through the surface. With `antialias` the
    silhouettes are smoothed (coverage becomes fractional and gives the mask gradients to vertices; for
    renders people look at and for reported PSNRs); refinement's loss leaves it out: the CPU twin's
    antialias backward costs 10x the rest of a step, and it only moves silhouette pixels. `hard_color`
    keeps the colour under the hard mask (f_c where a triangle covers the pixel centre, background elsewhere,
    the released `MeshGen._decode_appearance`) and antialiases only the mask.
    """
    planes = _one_asset(planes)
    V, H, W, _ = surface.points.shape
    bg = _background(background, surface.points.device)
    hit = surface.hit[..., None].to(surface.points.dtype)  # [V,H,W,1]
    rgb = torch.zeros(V, H, W, 3, device=surface.points.device, dtype=surface.points.dtype)
    pts = surface.points[surface.hit]  # [P,3]
    if len(pts):
        cols = torch.cat([model.query_color(planes, p[None])[0] for p in pts.split(chunk)])
        rgb = rgb.index_put((surface.hit,), cols.to(rgb.dtype))
    mask = hit
    if antialias and hard_color:
        mask = surface.rasterizer.antialias(hit.contiguous(), surface.rast, surface.clip, surface.faces)
        rgb = rgb + (1.0 - hit) * bg
    else:
        if antialias:
            mixed = surface.rasterizer.antialias(torch.cat([rgb, hit], dim=-1).contiguous(), surface.rast,
                                                 surface.clip, surface.faces)
            rgb, mask = mixed[..., :3], mixed[..., 3:]
        rgb = rgb + (1.0 - mask) * bg  # colour is premultiplied by coverage; background fills the rest
    return {"rgb": rgb.permute(0, 3, 1, 2), "mask": mask.permute(0, 3, 1, 2)}


def render_mesh(model: torch.nn.Module, planes: Tensor, verts: Tensor, faces: Tensor, c2w: Tensor, K: Tensor,
                H: int, W: int, background: float | Tensor = 1.0, rasterizer: Rasterizer | None = None,
                antialias: bool = True, chunk: int = 1 << 18, hard_color: bool = False) -> dict[str, Tensor]:
    """Render one asset's textured mesh from V cameras: `rasterize_mesh`, then `shade`.

    verts [N, 3], faces [F, 3] (normalised world frame); c2w [V, 4, 4] OpenCV, K [V, 3, 3] for an H×W image;
    background a float or [3]. Returns rgb [V, 3, H, W] (f_c at the surface point of each pixel, composited
    on the background by the mask), depth [V, 1, H, W] (planar z, 0 = empty, the contract's convention),
    mask [V, 1, H, W] (antialiased coverage) and normal [V, 3, H, W] (world-space face normals, 0 = empty).
    `hard_color`: colour under the hard mask, as released (`shade`).
    An empty mesh renders as background with zero mask and depth.
    """
    planes = _one_asset(planes)
    if c2w.ndim != 3 or K.ndim != 3 or c2w.shape[0] != K.shape[0]:
        raise ValueError(f"c2w [V,4,4] and K [V,3,3] expected, got {tuple(c2w.shape)} and {tuple(K.shape)}")
    V = c2w.shape[0]
    dev = verts.device
    if len(faces) == 0:
        bg = _background(background, dev)
        zeros = torch.zeros(V, 1, H, W, device=dev)
        return {"rgb": bg.view(1, 3, 1, 1).expand(V, 3, H, W).clone(), "depth": zeros, "mask": zeros.clone(),
                "normal": torch.zeros(V, 3, H, W, device=dev)}
    surface = rasterize_mesh(rasterizer or Rasterizer("auto", dev), verts, faces, c2w, K, H, W)
    out = shade(model, planes, surface, background, antialias, chunk, hard_color)
    fid = (surface.rast[..., 3].long() - 1).clamp(min=0)
    normal = face_normals(verts.float(), surface.faces)[fid] * surface.hit[..., None]  # [V, H, W, 3]
    return {**out, "depth": surface.depth.permute(0, 3, 1, 2), "normal": normal.permute(0, 3, 1, 2)}

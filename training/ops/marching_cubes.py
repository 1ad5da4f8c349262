"""Differentiable marching cubes: a pure-PyTorch twin of `diso.DiffMC`, and the backend switch.

Conventions (the same as diso's, read from its source; held against it in the GPU test):

- `grid` is a scalar field [X, Y, Z] sampled at integer index positions; a vertex's coordinate (x, y, z)
  is the (fractional) index along torch dimensions (0, 1, 2). The grid is padded by one cell of value
  isovalue + 1 on every side before extraction (as diso does), so a region that touches the border is closed and its
  vertices may lie up to one cell outside [0, dim − 1].
- A corner is "positive" when its value is >= `isovalue` (outside, for an sdf that is positive outside),
  in the cube code and in the edge test alike, exactly as diso's kernels (`data >= iso`).
  Triangles are wound counter-clockwise seen from the positive side: the right-hand normal
  (v1 − v0) × (v2 − v0) points towards increasing values (outwards for an sdf).
- A vertex lies on a grid edge whose end values straddle the isovalue, at t = (iso − d0) / (d1 − d0)
  (linear interpolation), so d(vertex)/d(d0, d1) is the analytic derivative of t: gradients reach the
  field values. With `deform` [X, Y, Z, 3], each grid corner moves by its offset first.
- Vertex order: sorted by (linear index of the edge's first corner in the padded grid, axis), which is
  diso's order; `normalize=True` divides by (dim − 1) so the grid spans [0, 1].
- An empty grid (no sign change) returns verts [0, 3] and faces [0, 3] and counts the event in
  `EMPTY_EVENTS`.

Differences from diso, on purpose: the triangle table is generated here (see
`_case_triangles`) with a face rule that is consistent between neighbouring cells, so closed fields give
watertight meshes. The triangulation of a cell may differ from diso's table (different diagonals, and
ambiguous faces), so face lists match in count and surface, not index by index.

Memory: the sign grid is one byte per sample; everything after that is proportional to the number of
crossing edges and surface cells (never G³ × table size).
"""

from __future__ import annotations

import functools
import importlib
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

# Counted events (e.g. "empty" extractions); read by trainers for logging.
EMPTY_EVENTS: Counter = Counter()

# Corner c in 0..7 has offset (c & 1, (c >> 1) & 1, (c >> 2) & 1) along torch dims (0, 1, 2).
_CORNERS = [(c & 1, (c >> 1) & 1, (c >> 2) & 1) for c in range(8)]


def _corner_id(p: tuple[int, int, int]) -> int:
    return p[0] | (p[1] << 1) | (p[2] << 2)


def _edge_of(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """The grid edge between adjacent corners a, b as (origin offset x, y, z, axis)."""
    axis = next(i for i in range(3) if a[i] != b[i])
    o = tuple(min(a[i], b[i]) for i in range(3))
    return (o[0], o[1], o[2], axis)


def _faces_ccw() -> list[list[tuple[int, int, int]]]:
    """The 6 cube faces, each as 4 corners counter-clockwise seen from outside the cube."""
    faces = []
    for axis in range(3):
        u, v = (axis + 1) % 3, (axis + 2) % 3  # e_u × e_v = e_axis
        for side in (0, 1):
            loop2d = [(0, 0), (1, 0), (1, 1), (0, 1)]  # CCW about +e_axis
            if side == 0:  # outward normal −e_axis: reverse
                loop2d = loop2d[::-1]
            corners = []
            for a, b in loop2d:
                p = [0, 0, 0]
                p[axis], p[u], p[v] = side, a, b
                corners.append(tuple(p))
            faces.append(corners)
    return faces


def _case_triangles(code: int) -> list[tuple[tuple[int, int, int, int], ...]]:
    """Triangles (as triples of grid edges) for cube case `code` (bit c set = corner c positive).

    On each face, walked counter-clockwise from outside, a crossing from negative to positive is a "rise",
    from positive to negative a "fall". Each fall is joined to the rise just before it, which cuts every
    positive corner off on its own when a face is ambiguous. The neighbouring cell walks the same face the
    other way, so it makes the same pairs in the opposite direction: the surface closes across cells and
    is consistently oriented. A segment fall → rise runs along n × f (n towards positive, f the outward
    face normal), so the joined loops run counter-clockwise about n and fan triangles face the positive side.
    """
    pos = [(code >> c) & 1 for c in range(8)]
    nxt: dict[tuple, tuple] = {}
    for face in _faces_ccw():
        events = []  # (kind, edge) in walking order
        for i in range(4):
            a, b = face[i], face[(i + 1) % 4]
            sa, sb = pos[_corner_id(a)], pos[_corner_id(b)]
            if sa != sb:
                events.append(("rise" if sb else "fall", _edge_of(a, b)))
        for j, (kind, edge) in enumerate(events):
            if kind == "fall":
                prev_kind, prev_edge = events[j - 1]
                assert prev_kind == "rise"
                nxt[edge] = prev_edge
    tris = []
    seen: set = set()
    for start in list(nxt):
        if start in seen:
            continue
        loop = [start]
        seen.add(start)
        e = nxt[start]
        while e != start:
            loop.append(e)
            seen.add(e)
            e = nxt[e]
        for k in range(1, len(loop) - 1):
            tris.append((loop[0], loop[k], loop[k + 1]))
    return tris


@functools.cache
def _tables() -> tuple[Tensor, Tensor]:
    """(table [256, T, 3, 4] int64 of (dx, dy, dz, axis) per triangle vertex, counts [256] int64)."""
    cases = [_case_triangles(c) for c in range(256)]
    tmax = max(len(t) for t in cases)
    table = torch.zeros(256, tmax, 3, 4, dtype=torch.int64)
    counts = torch.zeros(256, dtype=torch.int64)
    for c, tris in enumerate(cases):
        counts[c] = len(tris)
        for i, tri in enumerate(tris):
            table[c, i] = torch.tensor(tri)
    return table, counts


def _empty(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    EMPTY_EVENTS["empty"] += 1
    return (torch.zeros(0, 3, dtype=dtype, device=device), torch.zeros(0, 3, dtype=torch.long, device=device))


class TorchDiffMC(torch.nn.Module):
    """Pure-PyTorch `diso.DiffMC`: `TorchDiffMC(dtype)(grid, deform=None, isovalue=0.0, normalize=True)`.

    grid [X, Y, Z] (float), deform [X, Y, Z, 3] or None → verts [N, 3] (dtype), faces [F, 3] (long).
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype

    def forward(self, grid: Tensor, deform: Tensor | None = None, isovalue: float = 0.0,
                device: str | None = None, normalize: bool = True) -> tuple[Tensor, Tensor]:
        if grid.ndim != 3:
            raise ValueError(f"grid must be [X, Y, Z], got {tuple(grid.shape)}")
        if deform is not None and deform.shape != (*grid.shape, 3):
            raise ValueError(f"deform must be [X, Y, Z, 3] = {(*grid.shape, 3)}, got {tuple(deform.shape)}")
        grid = grid.to(self.dtype)
        dims = grid.shape
        with torch.no_grad():
            if bool((grid.min() >= isovalue) | (grid.max() <= isovalue)):  # diso's emptiness test
                return _empty(self.dtype, grid.device)
        gp = F.pad(grid, (1, 1, 1, 1, 1, 1), "constant", isovalue + 1.0)  # [X+2, Y+2, Z+2], diso's padding
        dp = None if deform is None else F.pad(deform.to(self.dtype), (0, 0, 1, 1, 1, 1, 1, 1), "constant", 0.0)
        P = gp.shape
        strides = torch.tensor([P[1] * P[2], P[2], 1], device=grid.device)

        with torch.no_grad():
            s = gp >= isovalue  # [P0, P1, P2] bool, diso's ">= iso is positive": the only dense temporary
            # 1. Crossing edges, keyed by (linear index of the first corner) * 3 + axis: diso's vertex order.
            keys = []
            for axis in range(3):
                n = P[axis] - 1
                a, b = s.narrow(axis, 0, n), s.narrow(axis, 1, n)
                idx = torch.nonzero(a ^ b)  # [E_axis, 3] in the sliced grid = padded index of corner 0
                keys.append((idx * strides).sum(1) * 3 + axis)
                del a, b, idx
            keys = torch.sort(torch.cat(keys)).values  # [N]
            # 2. Surface cells (cube code neither 0 nor 255); cells span padded indices 0..P-2.
            cs = [s.narrow(0, c[0], P[0] - 1).narrow(1, c[1], P[1] - 1).narrow(2, c[2], P[2] - 1)
                  for c in _CORNERS]
            code = torch.zeros(P[0] - 1, P[1] - 1, P[2] - 1, dtype=torch.uint8, device=grid.device)
            for c, sc in enumerate(cs):
                code |= sc.to(torch.uint8) << c
            del cs
            cells = torch.nonzero((code != 0) & (code != 255))  # [C, 3] in C order = diso's cell order
            cell_code = code[cells[:, 0], cells[:, 1], cells[:, 2]].long()
            del code, s
            # 3. Triangles: table rows of each surface cell → global edge keys → vertex ids.
            table, counts = _tables()
            table, counts = table.to(grid.device), counts.to(grid.device)
            n_tri = counts[cell_code]  # [C]
            cell_of_tri = torch.repeat_interleave(torch.arange(len(cells), device=grid.device), n_tri)
            first = torch.cumsum(n_tri, 0) - n_tri
            local = torch.arange(len(cell_of_tri), device=grid.device) - first[cell_of_tri]
            te = table[cell_code[cell_of_tri], local]  # [F, 3, 4]
            corner = cells[cell_of_tri][:, None, :] + te[..., :3]  # [F, 3, 3] padded index of edge origin
            tkeys = (corner * strides).sum(-1) * 3 + te[..., 3]
            faces = torch.searchsorted(keys, tkeys)  # [F, 3]
            if len(faces) and not bool((keys[faces.clamp(max=len(keys) - 1)] == tkeys).all()):
                raise RuntimeError("marching cubes: a triangle references an edge without a crossing")
            # Vertex end points (padded indices) for the differentiable part.
            axis = keys % 3
            lin = keys // 3
            i0 = torch.stack([lin // strides[0], (lin // strides[1]) % P[1], lin % P[2]], dim=1)  # [N, 3]
            step = F.one_hot(axis, 3)
            i1 = i0 + step
        # 4. Differentiable vertex positions (gradients flow to grid / deform through gathers).
        flat = gp.reshape(-1)
        l0, l1 = (i0 * strides).sum(1), (i1 * strides).sum(1)
        d0, d1 = flat[l0], flat[l1]
        t = ((isovalue - d0) / (d1 - d0))[:, None]  # in [0, 1]: the signs of d0 - iso and d1 - iso differ
        p0, p1 = i0.to(self.dtype), i1.to(self.dtype)
        if dp is not None:
            fd = dp.reshape(-1, 3)
            p0, p1 = p0 + fd[l0], p1 + fd[l1]
        verts = p0 + (p1 - p0) * t - 1.0  # undo the padding offset
        if normalize:
            verts = verts / (torch.tensor(dims, dtype=self.dtype, device=grid.device) - 1)
        return verts, faces


@functools.cache
def _diso_class() -> type:
    """diso.DiffMC, imported only when asked (it needs a CUDA build)."""
    return importlib.import_module("diso").DiffMC


def cuda_marching_cubes(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A `diso.DiffMC` instance (raises ImportError with a hint when diso is not installed)."""
    try:
        cls = _diso_class()
    except ImportError as e:
        raise ImportError("diso is not installed (pip install diso, needs CUDA and nvcc); "
                          "use backend='torch' for the PyTorch twin") from e
    return cls(dtype=dtype)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' → 'diso' on CUDA when diso imports, else 'torch'; explicit names are checked."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            try:
                _diso_class()
                return "diso"
            except ImportError:
                return "torch"
        return "torch"
    if backend not in ("torch", "diso"):
        raise ValueError(f"unknown marching-cubes backend {backend!r} (auto | torch | diso)")
    if backend == "diso" and device.type != "cuda":
        raise ValueError("marching-cubes backend 'diso' needs a CUDA tensor")
    return backend


@functools.lru_cache(maxsize=8)
def _extractor(backend: str, dtype: torch.dtype) -> torch.nn.Module:
    return cuda_marching_cubes(dtype) if backend == "diso" else TorchDiffMC(dtype)


def marching_cubes(grid: Tensor, isovalue: float = 0.0, backend: str = "auto", normalize: bool = True,
                   deform: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Extract the `isovalue` surface of grid [X, Y, Z] with the chosen backend → (verts [N, 3], faces [F, 3]).

    Both backends share the conventions in this module's docstring; an empty result is counted in
    `EMPTY_EVENTS` either way.
    """
    b = resolve_backend(backend, grid.device)
    dtype = grid.dtype if grid.dtype in (torch.float32, torch.float64) else torch.float32
    verts, faces = _extractor(b, dtype)(grid.to(dtype), deform, isovalue=isovalue, normalize=normalize)
    if b == "diso":
        if len(faces) == 0:
            EMPTY_EVENTS["empty"] += 1
        faces = faces.long()
    return verts, faces

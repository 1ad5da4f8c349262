"""The sdf grid a mesh is extracted from: every G³ sample (dense), or coarse-to-fine, which evaluates the
field only in coarse cells the surface passes through and gives the dense grid's mesh for every surface
component it finds.

    sdf, stats = coarse_to_fine_sdf(query, axis, stride=4, dilate=1)   # query(points [N,3]) -> sdf [N]

Coarse-to-fine, on the fine lattice `axis` [G] (the same sample positions as the dense grid):

1. the field is evaluated on the coarse lattice (every `stride`-th fine index per axis, plus the last);
2. a coarse cell is *active* when its 8 corners do not all have one sign (`>= 0` is positive, the marching
   cubes' rule; the grid is padded by one positive sample on every side, as the marching cubes pad it, so a
   boundary cell with a negative corner is active too); the active set is dilated by `dilate` coarse cells;
3. every fine sample of every active cell is evaluated exactly; every other fine sample takes the value of
   a coarse corner of its (inactive, single-signed) cell, so it has the sign all of that cell's corners have;
4. surface following: a fine cell (padding included) with mixed signs and a corner not evaluated means the
   surface leaves the evaluated region there; its coarse cell is activated and step 3 repeats until there
   is none (after `max_rounds` the whole grid is evaluated).

What this guarantees (tests/training/test_sdf_grid.py holds it against the dense grid): at the end every
fine cell with a sign change has 8 exactly evaluated corners, so every vertex and triangle of the result is
the dense grid's (the same tensors, in the same order, when nothing is missed), and a component of the dense
mesh is either extracted whole or not at all (its cells are connected through crossing edges, whose ends
are exact). A component is missed only when every fine cell it crosses lies in an inactive coarse cell: 8
corners of one sign, more than `dilate` coarse cells from any coarse sign change and never reached by
surface following. So what can be missed is a feature of the other sign that the coarse lattice threads
through without touching: its region in those cells holds no coarse sample. Every ball of radius √3/2·h_c
(h_c = `stride` fine cells) holds a coarse sample, so a missed convex blob, plate or tube is thinner than √3·h_c:
at stride 4, thinner than 7 fine cells (2.7 % of the box at 256³); a thinner feature is still found when it
touches a coarse sample, lies within `dilate` coarse cells of a coarse sign change, or joins a found
surface. A field whose features are all thicker than that (a smooth field) gives the dense extraction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SdfQuery = Callable[[Tensor], Tensor]  # points [N, 3] -> sdf [N]; called without autograd


@dataclass
class GridStats:
    """What an sdf grid cost: field evaluations, surface-following rounds, active / all coarse cells."""

    evaluated: int  # points the field was evaluated at (the dense grid: G³)
    rounds: int = 1  # evaluation rounds (1 + the surface-following repeats)
    active_cells: int = 0  # coarse cells evaluated at full resolution
    coarse_cells: int = 0  # coarse cells in the grid


def lattice_points(axis: Tensor, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
    """Points [N, 3] at fine indices (i, j, k) [N] of the lattice axis × axis × axis (dense grid order)."""
    return torch.stack([axis[i], axis[j], axis[k]], dim=-1)


def dense_sdf(query: SdfQuery, axis: Tensor) -> tuple[Tensor, GridStats]:
    """The field at all G³ lattice points → sdf [G, G, G] (index (i, j, k) ↔ (x, y, z))."""
    G = len(axis)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    return query(pts).reshape(G, G, G), GridStats(evaluated=G ** 3)


def _cell_corners(sign: Tensor) -> tuple[Tensor, Tensor]:
    """(any corner positive, all corners positive) per cell of a sign grid [X, Y, Z] → [X-1, Y-1, Z-1],
    axis by axis (3 + 3 passes instead of 8 + 8)."""
    any_pos, all_pos = sign, sign
    for axis in range(3):
        n = any_pos.shape[axis] - 1
        any_pos = any_pos.narrow(axis, 0, n) | any_pos.narrow(axis, 1, n)
        all_pos = all_pos.narrow(axis, 0, n) & all_pos.narrow(axis, 1, n)
    return any_pos, all_pos


def _corners_of(cells: Tensor) -> Tensor:
    """Samples [X+1, Y+1, Z+1] that are a corner of a marked cell of cells [X, Y, Z]."""
    out = cells
    for axis in range(3):
        out = F.pad(out, [0, 0] * (2 - axis) + [0, 1])
        out = out | out.roll(1, axis)
    return out


def _gather3(t: Tensor, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
    """t[i][:, j][:, :, k] for 1-D index vectors: an outer-product gather."""
    return t.index_select(0, i).index_select(1, j).index_select(2, k)


def _padded_mixed_cells(positive: Tensor) -> Tensor:
    """Cells [X+1, Y+1, Z+1] of a sign grid [X, Y, Z] padded by one positive sample on every side (the
    marching cubes' padding) whose 8 corners do not all have one sign."""
    any_pos, all_pos = _cell_corners(F.pad(positive, (1, 1, 1, 1, 1, 1), value=True))
    return any_pos & ~all_pos


def _cells_to_activate(cells: Tensor, cell_of: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Coarse cell (i, j, k) holding each padded fine cell [N, 3] (a padding cell: the boundary cell inside)."""
    fine = (cells - 1).clamp(0, len(cell_of) - 1)
    return cell_of[fine[:, 0]], cell_of[fine[:, 1]], cell_of[fine[:, 2]]


def coarse_to_fine_sdf(query: SdfQuery, axis: Tensor, stride: int = 4, dilate: int = 1,
                       max_rounds: int = 64) -> tuple[Tensor, GridStats]:
    """The sdf on the G³ lattice `axis` [G], evaluated coarse-to-fine (module docstring) → (sdf [G,G,G], stats).

    Values are exact wherever a mesh vertex or a sign can depend on them; elsewhere they are a coarse
    corner's value (the right sign unless a feature was missed). `stride` >= 2 is the coarse cell side in
    fine cells; `dilate` >= 0 the coarse cells added around each coarse sign change; after `max_rounds` of
    surface following the rest of the grid is evaluated (the dense result, at the dense cost). Raises
    ValueError on bad arguments.
    """
    if stride < 2 or dilate < 0 or max_rounds < 1:
        raise ValueError(f"coarse-to-fine needs stride >= 2, dilate >= 0, max_rounds >= 1; got {stride}, "
                         f"{dilate}, {max_rounds}")
    G = len(axis)
    dev = axis.device
    if G <= stride + 1:  # one coarse cell or less: nothing to save
        return dense_sdf(query, axis)
    cidx = torch.arange(0, G, stride, device=dev)
    if int(cidx[-1]) != G - 1:
        cidx = torch.cat([cidx, torch.tensor([G - 1], device=dev)])  # the last cell is thinner
    n = len(cidx)
    nc = n - 1  # coarse cells per axis
    ci, cj, ck = torch.meshgrid(cidx, cidx, cidx, indexing="ij")
    coarse = query(lattice_points(axis, ci.reshape(-1), cj.reshape(-1), ck.reshape(-1))).reshape(n, n, n)
    evaluated = n ** 3

    # Coarse sign changes, the padding included: a boundary cell with a negative corner meets the padding.
    cells = (torch.nonzero(_padded_mixed_cells(coarse >= 0)) - 1).clamp(0, nc - 1)
    active = torch.zeros(nc, nc, nc, dtype=torch.bool, device=dev)
    active[cells[:, 0], cells[:, 1], cells[:, 2]] = True
    if dilate:
        active = F.max_pool3d(active[None, None].float(), 2 * dilate + 1, 1, dilate)[0, 0] > 0

    fine_index = torch.arange(G, device=dev)
    lower = torch.searchsorted(cidx, fine_index, right=True) - 1  # the coarse sample at or below each index
    sdf = _gather3(coarse, lower, lower, lower).clone()  # exact on the coarse lattice, a cell corner elsewhere
    on_lattice = torch.zeros(G, dtype=torch.bool, device=dev)
    on_lattice[cidx] = True
    known = on_lattice[:, None, None] & on_lattice[None, :, None] & on_lattice[None, None, :]
    cell_of = (torch.arange(G - 1, device=dev) // stride).clamp(max=nc - 1)  # coarse cell of each fine cell

    rounds = 0
    while True:
        rounds += 1
        if rounds > max_rounds:  # a surface still growing cell by cell: finish it as the dense grid would
            active[:] = True
        fine_active = _gather3(active, cell_of, cell_of, cell_of)  # [G-1]^3
        new = _corners_of(fine_active) & ~known  # the 8 corners of every active fine cell
        idx = torch.nonzero(new)
        if len(idx):
            values = query(lattice_points(axis, idx[:, 0], idx[:, 1], idx[:, 2]))
            sdf[idx[:, 0], idx[:, 1], idx[:, 2]] = values.to(sdf.dtype)
            evaluated += len(idx)
            known |= new
        # A fine cell (padding included) with a sign change and a corner not evaluated: the surface leaves
        # the evaluated region there; its coarse cell joins the active set.
        _, all_known = _cell_corners(F.pad(known, (1, 1, 1, 1, 1, 1), value=True))
        escaped = torch.nonzero(_padded_mixed_cells(sdf >= 0) & ~all_known)
        if not len(escaped):
            break
        active[_cells_to_activate(escaped, cell_of)] = True
    return sdf, GridStats(evaluated=evaluated, rounds=rounds, active_cells=int(active.sum()),
                          coarse_cells=nc ** 3)

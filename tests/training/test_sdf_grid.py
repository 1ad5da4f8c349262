"""Coarse-to-fine extraction held against the dense grid: the same marching-cubes mesh (tensor for tensor) on
analytic fields and on a GTR with random smooth planes, what it can miss (a blob between coarse samples) and
the bound on it, and the same gradients to the planes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.config import ModelConfig
from training.mesh import extract_mesh
from training.model import GTR
from training.ops.marching_cubes import marching_cubes
from training.sdf_grid import coarse_to_fine_sdf, dense_sdf

BOX = 0.55
G = 64
STEP = 2 * BOX / (G - 1)  # fine cell side
AXIS = torch.linspace(-BOX, BOX, G, dtype=torch.float64)


def _sphere(c: tuple[float, float, float], r: float):
    centre = torch.tensor(c, dtype=torch.float64)
    return lambda p: (p - centre).norm(dim=-1) - r


def _torus(p: torch.Tensor) -> torch.Tensor:
    ring = p[:, :2].norm(dim=-1) - 0.25
    return torch.sqrt(ring ** 2 + p[:, 2] ** 2) - 0.08


def _union(*fields):
    return lambda p: torch.stack([f(p) for f in fields]).amin(0)


FIELDS = {
    "sphere": _sphere((0.02, -0.01, 0.03), 0.3),
    "torus": _torus,
    # a spherical shell 1.1 fine cells thick: thinner than a coarse cell (4 fine cells)
    "thin_shell": lambda p: (p.norm(dim=-1) - 0.3).abs() - 0.55 * STEP,
    "components": _union(_sphere((-0.25, -0.2, 0.0), 0.15), _sphere((0.25, 0.2, 0.1), 0.12),
                         _sphere((0.2, -0.25, -0.3), 1.2 * 4 * STEP), _torus),
    # inside at the box faces: the marching cubes' positive padding closes it there
    "touches_box": lambda p: 0.3 - p.norm(dim=-1),
}


def _mesh(sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return marching_cubes(sdf.float(), isovalue=0.0, backend="torch", normalize=True)


@pytest.mark.parametrize("name", sorted(FIELDS))
@pytest.mark.parametrize("stride,dilate", [(4, 1), (4, 0), (8, 1)])
def test_coarse_to_fine_gives_the_dense_mesh(name: str, stride: int, dilate: int) -> None:
    field = FIELDS[name]
    dense, _ = dense_sdf(field, AXIS)
    sdf, stats = coarse_to_fine_sdf(field, AXIS, stride, dilate)
    v_dense, f_dense = _mesh(dense)
    v, f = _mesh(sdf)
    assert len(f_dense) > 500
    assert torch.equal(f, f_dense) and torch.equal(v, v_dense)  # identical triangles, same order
    assert stats.evaluated <= G ** 3  # never more than the dense grid (64³ is small for stride 8)
    if stride == 4 and name != "touches_box":  # (at the box faces the padding's surface fills 6 faces of cells)
        assert stats.evaluated < 0.5 * G ** 3
    # every sample next to a sign change (padding included) is the field's own value
    pos = F.pad(dense >= 0, (1,) * 6, value=True)
    near = torch.zeros_like(pos)
    for ax in range(3):
        flip = pos.narrow(ax, 0, G + 1) ^ pos.narrow(ax, 1, G + 1)
        near.narrow(ax, 0, G + 1).logical_or_(flip)
        near.narrow(ax, 1, G + 1).logical_or_(flip)
    near = near[1:-1, 1:-1, 1:-1]
    assert torch.equal(sdf[near], dense[near])
    assert torch.equal(sdf >= 0, dense >= 0)  # nothing missed here: every sign is the dense grid's


def _triangles(v: torch.Tensor, f: torch.Tensor) -> set:
    return set(_triangles_list(v, f))


def test_a_blob_between_coarse_samples_can_be_missed_and_is_missed_whole() -> None:
    """A ball of radius 0.6·h_c centred in a coarse cell holds no coarse sample (they are √3/2·h_c away) and,
    far from other surfaces, is not seen: the result is the dense mesh without that component."""
    stride = 4
    hc = stride * STEP
    centre = (AXIS[4 * 11] + 2 * STEP).item()  # the centre of a coarse cell, away from the big sphere
    blob = _sphere((centre, centre, centre), 0.6 * hc)
    field = _union(_sphere((-0.2, -0.2, -0.2), 0.2), blob)
    dense, _ = dense_sdf(field, AXIS)
    sdf, _ = coarse_to_fine_sdf(field, AXIS, stride, dilate=0)
    got, want = _triangles(*_mesh(sdf)), _triangles(*_mesh(dense))
    only_big, _ = dense_sdf(_sphere((-0.2, -0.2, -0.2), 0.2), AXIS)
    assert got < want  # a strict subset: kept triangles are the dense grid's
    assert got == _triangles(*_mesh(only_big))  # ... and what is missing is the blob, whole
    # With a dilation that reaches the big sphere's coarse cells it is found.
    sdf, _ = coarse_to_fine_sdf(field, AXIS, stride, dilate=8)
    assert torch.equal(_mesh(sdf)[1], _mesh(dense)[1])


@pytest.mark.parametrize("seed", range(6))
def test_a_blob_holding_a_ball_of_half_a_coarse_diagonal_is_never_missed(seed: int) -> None:
    """The bound: every ball of radius √3/2·h_c holds a coarse sample, so it cannot be missed (dilate 0, far
    from anything else, at a random position)."""
    stride = 4
    g = torch.Generator().manual_seed(seed)
    centre = tuple((torch.rand(3, generator=g, dtype=torch.float64) * 0.3 + 0.1).tolist())
    r = math.sqrt(3) / 2 * stride * STEP * 1.01
    field = _union(_sphere((-0.3, -0.3, -0.3), 0.15), _sphere(centre, r))
    dense, _ = dense_sdf(field, AXIS)
    sdf, _ = coarse_to_fine_sdf(field, AXIS, stride, dilate=0)
    assert torch.equal(_mesh(sdf)[1], _mesh(dense)[1]) and torch.equal(_mesh(sdf)[0], _mesh(dense)[0])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="stride >= 2"):
        coarse_to_fine_sdf(FIELDS["sphere"], AXIS, stride=1)
    with pytest.raises(ValueError, match="unknown mesh extraction"):
        extract_mesh(GTR(ModelConfig()), torch.zeros(1, 3, 2, 4, 4), 16, 10.0, method="sparse")


def _trained_like(cells: int, inside: float) -> tuple[GTR, torch.Tensor, float]:
    """A GTR with its real f_d and random smooth planes (noise on a cells² lattice, upsampled), at the level
    that puts `inside` of the box inside: blobby components of many sizes, some at the box faces."""
    torch.manual_seed(0)
    model = GTR(ModelConfig(lift_hull=False)).eval()  # planes are made here: no lifted hull in them
    C, R = model.cfg.plane_channels, model.cfg.plane_res * model.cfg.upsample
    torch.manual_seed(1)
    planes = F.interpolate(torch.randn(3, C, cells, cells), size=(R, R), mode="bicubic", align_corners=False)[None]
    with torch.no_grad():
        pts = torch.stack(torch.meshgrid(*[torch.linspace(-0.5, 0.5, 24)] * 3, indexing="ij"), -1)
        density = model.query_density(planes, pts.reshape(1, -1, 3))[0, :, 0]
    return model, planes, float(density.quantile(1 - inside))


def test_gtr_triplane_mesh_and_gradients_equal_the_dense_extraction() -> None:
    model, planes, level = _trained_like(3, 0.1)
    planes.requires_grad_(True)
    meshes, grads, cost = {}, {}, {}
    for method in ("dense", "coarse_to_fine"):
        stats: dict = {}
        verts, faces = extract_mesh(model, planes, 48, level, backend="torch", method=method, stats=stats)
        (verts ** 2).sum().backward()
        meshes[method], grads[method], cost[method] = (verts.detach(), faces), planes.grad.clone(), stats
        planes.grad = None
    assert len(meshes["dense"][1]) > 1000
    assert torch.equal(meshes["dense"][1], meshes["coarse_to_fine"][1])
    assert torch.equal(meshes["dense"][0], meshes["coarse_to_fine"][0])
    torch.testing.assert_close(grads["dense"], grads["coarse_to_fine"], rtol=0, atol=0)
    assert cost["coarse_to_fine"]["evaluated"] < 0.5 * cost["dense"]["evaluated"] == 0.5 * 48 ** 3


def _components(faces: list[list[int]]) -> list[set[int]]:
    """Vertex sets of the edge-connected pieces of a triangle list."""
    parent: dict[int, int] = {}

    def root(a: int) -> int:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for a, b, c in faces:
        parent[root(b)] = root(a)
        parent[root(c)] = root(a)
    pieces: dict[int, set[int]] = {}
    for v in parent:
        pieces.setdefault(root(v), set()).add(v)
    return list(pieces.values())


def test_gtr_triplane_with_sub_cell_blobs_misses_only_small_whole_components() -> None:
    """A busier field (noise on 6² per plane, 10 % inside at 48³, 4-cell coarse cells) has blobs thinner than
    a coarse cell: what coarse-to-fine misses is whole components, each inside a ball of radius √3·h_c."""
    model, planes, level = _trained_like(6, 0.1)
    with torch.no_grad():
        vd, fd = extract_mesh(model, planes, 48, level, backend="torch", method="dense")
        vc, fc = extract_mesh(model, planes, 48, level, backend="torch", method="coarse_to_fine", dilate=0)
    # Triangles matched by their sorted corners to 1e-4 (not exactly: the two paths evaluate f_d in different
    # batches, and a vertex on an edge whose two densities nearly tie moves by more than the float noise).
    dense_in_c2f, c2f_in_dense = _matched(vd, fd, vc, fc), _matched(vc, fc, vd, fd)
    assert c2f_in_dense.all()  # coarse-to-fine adds nothing
    assert not dense_in_c2f.all()  # this field does have something to miss (the bound below is then not vacuous)
    missed = [tri for tri, hit in zip(fd.tolist(), dense_in_c2f) if not hit]
    assert len(missed) < 0.02 * len(fd)
    missed_vertices = {v for tri in missed for v in tri}
    kept_vertices = {v for tri, hit in zip(fd.tolist(), dense_in_c2f) if hit for v in tri}
    assert not missed_vertices & kept_vertices  # never half a component
    hc = 4 * 2 * model.box_half_size_ours() / 47
    for piece in _components(missed):
        p = vd[sorted(piece)]
        assert (p - p.mean(0)).norm(dim=-1).max() < math.sqrt(3) * hc


def _matched(va: torch.Tensor, fa: torch.Tensor, vb: torch.Tensor, fb: torch.Tensor, tol: float = 1e-4):
    """For each triangle of mesh a: does mesh b hold one with the same corners (any order) to `tol`?"""
    from scipy.spatial import cKDTree

    def keys(v: torch.Tensor, f: torch.Tensor) -> np.ndarray:
        corners = v.double().numpy()[f.numpy()]  # [F, 3, 3]
        order = np.lexsort(corners.transpose(2, 0, 1)[::-1], axis=-1)  # sort each triangle's corners by x, y, z
        return np.take_along_axis(corners, order[..., None], axis=1).reshape(len(f), 9)

    dist, _ = cKDTree(keys(vb, fb)).query(keys(va, fa), p=np.inf)
    return dist < tol


def _triangles_list(v: torch.Tensor, f: torch.Tensor) -> list:
    return [tuple(sorted(tuple(round(x, 6) for x in v[i].tolist()) for i in tri)) for tri in f.tolist()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_coarse_to_fine_on_cuda_gives_diso_the_dense_grid_mesh() -> None:
    """On the GPU, at 256³: the coarse-to-fine grid gives diso the dense grid's mesh (several components)."""
    axis = torch.linspace(-BOX, BOX, 256, device="cuda")
    field = FIELDS["components"]

    def on_cuda(p: torch.Tensor) -> torch.Tensor:
        return field(p.double().cpu()).to(p.device, torch.float32)

    dense, _ = dense_sdf(on_cuda, axis)
    sdf, stats = coarse_to_fine_sdf(on_cuda, axis)
    v_dense, f_dense = marching_cubes(dense, backend="diso")
    v, f = marching_cubes(sdf, backend="diso")
    # diso may emit vertices in any order (atomics): compare the vertex sets and the face counts
    assert len(f_dense) > 10_000 and len(f) == len(f_dense) and len(v) == len(v_dense)
    assert torch.equal(torch.unique(v, dim=0), torch.unique(v_dense, dim=0))
    assert stats.evaluated < 0.3 * 256 ** 3

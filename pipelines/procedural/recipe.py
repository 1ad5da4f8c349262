"""The recipe of one procedural world asset: parts, placements, augmentations and materials, drawn from
(seed, index, difficulty) only, before any geometry is built.

A recipe is plain frozen data, so an asset can be described (and a test can count kinds) without building
it, and the geometry (`pipelines.procedural.solid`) and textures (`pipelines.procedural.textures`) are pure
functions of it. Every random draw comes from one generator seeded by `SeedSequence([seed, index, 1])`.

`difficulty` in [0, 1] (quantised to 0.01) scales how wild the distribution is:

| difficulty | parts | per part: displaced / cut / wire-frame / separate | hard textures | materials |
| --- | --- | --- | --- | --- |
| 0 | 1 | never | 20 % | 1 |
| 0.5 | 1-5 | 20 % / 22 % / 8 % / 12 % | 47 % | 1 (65 %) or 2-4 |
| 1 | 1-9 | 40 % / 45 % / 16 % / 25 % | 60 % | 1 (30 %) or 2-4 |

At 1 it is the Zeroverse-class mix of LRM-Zero (up to 9 primitives, boolean cut-outs, wire-frames, height
fields); at 0 single primitives with mostly easy textures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.procedural.textures import EASY_KINDS, HARD_KINDS, TEXTURE_KINDS

PRIMITIVES = ("box", "rounded_box", "sphere", "cylinder", "cone", "frustum", "torus", "capsule", "tube",
              "tetrahedron", "octahedron", "pyramid", "prism", "icosahedron")
WIRE_KINDS = ("box", "tetrahedron", "octahedron", "pyramid", "prism")  # polyhedra whose edges become beams (an
# icosahedron's 30 would make one wire-frame cost as much as a whole asset)
CUTTERS = ("box", "sphere", "cylinder", "cone")
AUGMENTATIONS = ("bump", "heightfield", "cut", "hole", "wire", "separate")
MAX_PARTS = 9
MAX_MATERIALS = 4  # one texture atlas of at most 2 x 2 tiles

Matrix = tuple[float, float, float, float, float, float, float, float, float]  # 3x3 row-major
Vec = tuple[float, float, float]


@dataclass(frozen=True)
class Cut:
    """A boolean difference with a primitive cutter, in the frame of the part it cuts."""

    kind: str  # cutter primitive (CUTTERS)
    through: bool  # a hole through the part (genus + 1) rather than a bite out of its surface
    size: Vec  # cutter extents
    rotation: Matrix
    offset: Vec  # cutter centre


@dataclass(frozen=True)
class Part:
    kind: str  # PRIMITIVES
    size: Vec  # extents along the part's own axes (before rotation)
    rotation: Matrix  # part frame -> object frame
    position: Vec  # centre in the object frame
    material: int  # index into Recipe.materials
    segments: int  # circular segments of round primitives
    shape: float  # kind-specific: rounded_box corner / torus tube / tube wall / frustum top ratio, prism sides
    displacement: str  # "" | "bump" (along the normals) | "heightfield" (along the part's up axis)
    amplitude: float  # displacement amplitude, as a fraction of the part's smallest extent
    frequency: float  # displacement waves across the part's largest extent
    cut: Cut | None
    wire: float  # tube diameter of a wire-frame part as a fraction of the object's size (0: a solid part)
    separate: bool  # placed apart from its anchor part instead of overlapping it


@dataclass(frozen=True)
class Material:
    texture: str  # TEXTURE_KINDS
    detail: float  # coarse (0) to fine (1) features of the texture
    roughness: float
    metallic: float


@dataclass(frozen=True)
class Recipe:
    seed: int
    index: int
    difficulty: float
    parts: tuple[Part, ...]
    materials: tuple[Material, ...]

    def augmentations(self) -> list[str]:
        """The augmentations this recipe asks for, in AUGMENTATIONS order."""
        used = set()
        for p in self.parts:
            used |= {p.displacement} if p.displacement else set()
            used |= {"hole" if p.cut.through else "cut"} if p.cut else set()
            used |= {"wire"} if p.wire else set()
            used |= {"separate"} if p.separate else set()
        return [a for a in AUGMENTATIONS if a in used]


def quantise_difficulty(difficulty: float) -> float:
    """Difficulty as the recipe uses it (two decimals, so that the uid names it exactly)."""
    d = round(float(difficulty), 2)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"procedural_difficulty must be in [0, 1], got {difficulty}")
    return d


def _rotation(rng: np.random.Generator, free: bool, tilt: float = 0.0) -> np.ndarray:
    """A uniformly random rotation (`free`), else a turn about the up axis with an optional small tilt."""
    if free:
        q = rng.standard_normal(4)
        w, x, y, z = q / np.linalg.norm(q)
        return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    a, t = rng.uniform(0, 2 * np.pi), rng.uniform(-tilt, tilt)
    yaw = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    pitch = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return yaw @ pitch


def _mat(r: np.ndarray) -> Matrix:
    return tuple(float(v) for v in np.asarray(r).reshape(9))  # type: ignore[return-value]


def _vec(v: np.ndarray) -> Vec:
    return tuple(float(x) for x in np.asarray(v).reshape(3))  # type: ignore[return-value]


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _shape_param(kind: str, rng: np.random.Generator) -> float:
    if kind == "rounded_box":
        return rng.uniform(0.1, 0.35)  # corner radius / smallest extent
    if kind == "torus":
        return rng.uniform(0.15, 0.45)  # tube radius / ring radius
    if kind == "tube":
        return rng.uniform(0.5, 0.85)  # inner radius / outer radius
    if kind == "frustum":
        return rng.uniform(0.25, 0.8)  # top radius / bottom radius
    if kind == "prism":
        return float((3, 4, 5, 6, 8)[int(rng.integers(0, 5))])  # sides
    return 0.0


def _extents(kind: str, scale: float, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Extents with a varied aspect: each axis in [1 - spread, 1] of the largest, times `scale`."""
    e = rng.uniform(1.0 - spread, 1.0, 3)
    if kind in ("sphere", "torus", "icosahedron", "octahedron") and rng.random() < 0.5:
        e[:] = e.max()  # keep some round ones round
    return scale * e / e.max()


def _cut(part_size: np.ndarray, rng: np.random.Generator) -> Cut:
    if rng.random() < 0.4:  # a hole through the part along one of its axes (a cylinder or a square bar)
        axis = int(rng.integers(0, 3))
        others = [a for a in range(3) if a != axis]
        radius = rng.uniform(0.15, 0.3) * part_size[others].min()
        size = np.full(3, 2 * radius)
        size[2] = 3.0 * part_size.max()
        align = np.eye(3)[[others[0], others[1], axis]].T  # cutter z -> the part's `axis`
        offset = np.zeros(3)
        offset[others] = rng.uniform(-0.15, 0.15, 2) * part_size[others]
        kind = "cylinder" if rng.random() < 0.7 else "box"
        return Cut(kind=kind, through=True, size=_vec(size), rotation=_mat(align), offset=_vec(offset))
    kind = str(rng.choice(CUTTERS))
    size = part_size * rng.uniform(0.3, 0.7, 3)
    axis, sign = int(rng.integers(0, 3)), rng.choice([-1.0, 1.0])
    offset = rng.uniform(-0.4, 0.4, 3) * part_size
    offset[axis] = sign * part_size[axis] / 2 * rng.uniform(0.5, 1.0)  # centred near a side: a bite, a notch
    return Cut(kind=kind, through=False, size=_vec(size), rotation=_mat(_rotation(rng, True)), offset=_vec(offset))


def _material(rng: np.random.Generator, d: float) -> Material:
    hard = 0.5 + 2.5 * d  # weight of each hard kind; each easy kind weighs 1
    weights = np.array([hard if k in HARD_KINDS else 1.0 for k in TEXTURE_KINDS])
    assert set(EASY_KINDS) | set(HARD_KINDS) == set(TEXTURE_KINDS)
    kind = str(rng.choice(TEXTURE_KINDS, p=weights / weights.sum()))
    metallic = 0.0 if rng.random() < 0.75 else rng.uniform(0.1, 0.6)  # bright metals turn the white world grey
    return Material(texture=kind, detail=float(rng.uniform(0.0, 0.4 + 0.6 * d)),
                    roughness=float(rng.uniform(0.35, 1.0)), metallic=float(metallic))


def make_recipe(seed: int, index: int, difficulty: float) -> Recipe:
    """The recipe of world asset `index` under `seed` and `difficulty` (a pure function of the three)."""
    if seed < 0 or index < 0:
        raise ValueError(f"procedural seed and index must be >= 0, got seed={seed}, index={index}")
    d = quantise_difficulty(difficulty)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
    n = 1 + int(rng.integers(0, 1 + round((MAX_PARTS - 1) * d)))
    n_mat = 1 if n == 1 or rng.random() < 1.0 - 0.7 * d else int(rng.integers(2, min(MAX_MATERIALS, n) + 1))
    materials = tuple(_material(rng, d) for _ in range(n_mat))
    owners = np.concatenate([np.arange(n_mat), rng.integers(0, n_mat, n - n_mat)])  # every material is used
    rng.shuffle(owners)
    parts: list[Part] = []
    placed: list[tuple[np.ndarray, float]] = []  # (centre, bounding radius) of earlier parts
    for i in range(n):
        wire = rng.random() < 0.16 * d  # thin: a third of the assets at 0.5 with 0.25 was too many
        kind = str(rng.choice(WIRE_KINDS if wire else PRIMITIVES))
        if i == 0:
            size = _extents(kind, 1.0, rng, 0.5 + 0.3 * d)
            rot, pos, separate = _rotation(rng, False, tilt=0.35 * d), np.zeros(3), False
        else:
            anchor_c, anchor_r = placed[int(rng.integers(0, len(placed)))]
            size = _extents(kind, rng.uniform(0.25, 0.8) * placed[0][1] * 2 / np.sqrt(3), rng, 0.7)
            rot = _rotation(rng, rng.random() < 0.5 + 0.5 * d)
            u, r = _unit(rng), 0.5 * float(np.linalg.norm(size))
            separate = bool(rng.random() < 0.25 * d)
            if separate:  # bounding spheres apart: the two never touch
                pos = anchor_c + u * (anchor_r + r + rng.uniform(0.05, 0.3) * anchor_r)
            else:
                pos = anchor_c + u * anchor_r * rng.uniform(0.3, 0.9)
        shape = _shape_param(kind, rng)
        if kind == "torus":  # a round tube: the height is the tube's diameter, set by the ring's size
            size[2] = size[:2].mean() * shape / (1.0 + shape)
        displacement, amplitude, frequency, cut = "", 0.0, 0.0, None
        if not wire and rng.random() < 0.4 * d:
            displacement = "bump" if rng.random() < 0.6 else "heightfield"
            amplitude = float(rng.uniform(0.03, 0.08))
            frequency = float(rng.uniform(1.5, 4.0) if displacement == "bump" else rng.uniform(1.0, 2.5))
        if not wire and rng.random() < 0.45 * d:
            cut = _cut(size, rng)
        segments = int(rng.integers(16, 33))
        if kind in ("sphere", "capsule", "torus"):
            segments = max(24, segments)  # curved both ways: fewer segments show as facets in the silhouette
        if i > 0:  # a smaller part needs fewer (and the union's cost follows the triangles)
            segments = max(12, round(segments * min(1.0, 0.5 + size.max() / (2 * placed[0][1]))))
        parts.append(Part(kind=kind, size=_vec(size), rotation=_mat(rot), position=_vec(pos),
                          material=int(owners[i]), segments=segments, shape=float(shape),
                          displacement=displacement, amplitude=amplitude, frequency=frequency, cut=cut,
                          wire=float(rng.uniform(0.01, 0.03)) if wire else 0.0, separate=separate))
        placed.append((pos, 0.5 * float(np.linalg.norm(size))))
    return Recipe(seed=int(seed), index=int(index), difficulty=d, parts=tuple(parts), materials=materials)

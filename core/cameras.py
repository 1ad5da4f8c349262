"""Camera conventions of the toolkit (docs/CONTRACTS.md "Coordinates and cameras"), in numpy, with no Blender import.

World: Blender's, right-handed, Z up. Poses are camera-to-world 4x4 float32 in **OpenCV** axes (x right,
y down, z forward). Blender's camera axes (x right, y up, looking down -z) convert in exactly one place:
`blender_to_opencv`. Intrinsics K are 3x3 float32 in pixels, square pixels, principal point at the centre.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

# c2w_cv = c2w_blender @ FLIP_YZ, and back (FLIP_YZ is its own inverse).
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0]).astype(np.float32)


def blender_to_opencv(c2w_blender: np.ndarray) -> np.ndarray:
    """The one conversion from a Blender camera matrix_world to an OpenCV c2w ([..., 4, 4])."""
    return (np.asarray(c2w_blender, dtype=np.float64) @ FLIP_YZ).astype(np.float32)


def opencv_to_blender(c2w_cv: np.ndarray) -> np.ndarray:
    """Inverse of `blender_to_opencv` (to place a Blender camera from a stored pose)."""
    return (np.asarray(c2w_cv, dtype=np.float64) @ FLIP_YZ).astype(np.float32)


def spherical_position(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """r * (cos el cos az, cos el sin az, sin el)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([distance * math.cos(el) * math.cos(az), distance * math.cos(el) * math.sin(az),
                     distance * math.sin(el)], dtype=np.float64)


def look_at(eye: np.ndarray, target: np.ndarray | None = None, up: np.ndarray | None = None) -> np.ndarray:
    """OpenCV c2w of a camera at `eye` looking at `target` with world `up` (+Z) pointing up in the image."""
    eye = np.asarray(eye, dtype=np.float64)
    target = np.zeros(3) if target is None else np.asarray(target, dtype=np.float64)
    up = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, dtype=np.float64)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-8:  # looking straight along up: pick any right vector
        x = np.cross(z, np.array([0.0, 1.0, 0.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)  # image rows run downwards: y = z x x points "down" in the world
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w.astype(np.float32)


def intrinsics(fov_deg: float, width: int, height: int | None = None) -> np.ndarray:
    """K for a horizontal field of view `fov_deg` (square pixels; for square images it is also vertical)."""
    height = width if height is None else height
    f = 0.5 * width / math.tan(0.5 * math.radians(fov_deg))
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]], dtype=np.float32)


def uid_seed(uid: str) -> int:
    """A stable 64-bit seed from a uid (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "little")


def random_views(uid: str, n: int = 32, distance: tuple[float, float] = (2.4, 2.8),
                 elevation_deg: tuple[float, float] = (-30.0, 70.0)) -> dict[str, np.ndarray]:
    """The contract's random training views, seeded by the uid.

    Azimuth uniform in [0, 360), elevation area-uniform in the band (sin(el) uniform), distance uniform.
    Returns arrays `azimuth`, `elevation`, `distance` (degrees / units) and `c2w` [n, 4, 4].
    """
    rng = np.random.default_rng(uid_seed(uid))
    az = rng.uniform(0.0, 360.0, n)
    s0, s1 = math.sin(math.radians(elevation_deg[0])), math.sin(math.radians(elevation_deg[1]))
    el = np.degrees(np.arcsin(rng.uniform(s0, s1, n)))
    r = rng.uniform(distance[0], distance[1], n)
    c2w = np.stack([look_at(spherical_position(a, e, d)) for a, e, d in zip(az, el, r)])
    return {"azimuth": az, "elevation": el, "distance": r, "c2w": c2w}


def orbit_views(n: int = 20, distance: float = 2.6) -> dict[str, np.ndarray]:
    """The evaluation orbit: azimuth 18°·i (for 20 views), elevation 30°·sin(2·azimuth)."""
    az = np.array([360.0 * i / n for i in range(n)])
    el = 30.0 * np.sin(np.radians(2.0 * az))
    r = np.full(n, distance)
    c2w = np.stack([look_at(spherical_position(a, e, d)) for a, e, d in zip(az, el, r)])
    return {"azimuth": az, "elevation": el, "distance": r, "c2w": c2w}


EVAL_PROTOCOLS = ("instantmesh", "lrm64")  # render.eval_protocol: the ground-truth views of an eval set
GRID_ELEVATIONS = (0.0, 20.0, 40.0, 60.0)  # the lrm64 protocol (GS-LRM, MeshLRM, LRM-Zero): 4 rings of 16


def grid_views(azimuths: int = 16, elevations: tuple[float, ...] = GRID_ELEVATIONS, distance: float = 2.7
               ) -> dict[str, np.ndarray]:
    """Rings of `azimuths` views (360°/azimuths apart from 0°) at each elevation, ring by ring: the 64-view
    protocol (16 × elevations 0/20/40/60) at one distance."""
    az = np.array([360.0 * i / azimuths for _ in elevations for i in range(azimuths)])
    el = np.array([e for e in elevations for _ in range(azimuths)], dtype=np.float64)
    r = np.full(len(az), distance)
    c2w = np.stack([look_at(spherical_position(a, e, d)) for a, e, d in zip(az, el, r)])
    return {"azimuth": az, "elevation": el, "distance": r, "c2w": c2w}


def eval_views(protocol: str, orbit_views_n: int, distance: float, grid_distance: float) -> dict[str, np.ndarray]:
    """The ground-truth views of `protocol`: `instantmesh` = the paper's 20-view orbit (`orbit_views`) at
    `distance`; `lrm64` = `grid_views` at `grid_distance`. ValueError for another name."""
    if protocol == "instantmesh":
        return orbit_views(orbit_views_n, distance)
    if protocol == "lrm64":
        return grid_views(distance=grid_distance)
    raise ValueError(f"render.eval_protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {protocol!r}")


def eval_input_views(elevation_deg: float = 20.0, distance: float = 2.6) -> dict[str, np.ndarray]:
    """The 4 evaluation input views: azimuth 0, 90, 180, 270 at one elevation."""
    az = np.array([0.0, 90.0, 180.0, 270.0])
    el = np.full(4, elevation_deg)
    r = np.full(4, distance)
    c2w = np.stack([look_at(spherical_position(a, e, d)) for a, e, d in zip(az, el, r)])
    return {"azimuth": az, "elevation": el, "distance": r, "c2w": c2w}


def project(points: np.ndarray, c2w: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points [N,3] -> pixel coordinates [N,2] (x right, y down; pixel centres at +0.5) and depth z [N]."""
    w2c = np.linalg.inv(np.asarray(c2w, dtype=np.float64))
    p = np.asarray(points, dtype=np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    uv = p @ np.asarray(K, dtype=np.float64).T
    return uv[:, :2] / uv[:, 2:3], p[:, 2]


def unproject_depth(depth: np.ndarray, c2w: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Planar depth image [H,W] (0 = no hit) -> world points [M,3] of the hit pixels (pixel centres)."""
    h, w = depth.shape
    v, u = np.nonzero(depth > 0)
    z = depth[v, u].astype(np.float64)
    Kinv = np.linalg.inv(np.asarray(K, dtype=np.float64))
    pix = np.stack([u + 0.5, v + 0.5, np.ones_like(z)], axis=1)
    cam = (pix @ Kinv.T) * z[:, None]
    c2w = np.asarray(c2w, dtype=np.float64)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]

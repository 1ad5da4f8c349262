"""core/cameras.py against closed forms: orthonormal poses, OpenCV axes, the contract's angles, area-uniform
elevation statistics, projection/unprojection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.cameras import (
    blender_to_opencv,
    eval_input_views,
    eval_views,
    grid_views,
    intrinsics,
    look_at,
    opencv_to_blender,
    orbit_views,
    project,
    random_views,
    spherical_position,
    unproject_depth,
)
from core.layout import view_name


def test_look_at_is_orthonormal_right_handed_and_opencv():
    rng = np.random.default_rng(0)
    for _ in range(50):
        eye = rng.normal(size=3) * 3
        c2w = look_at(eye).astype(np.float64)
        R = c2w[:3, :3]
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-6)
        assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(c2w[:3, 3], eye, atol=1e-5)
        np.testing.assert_allclose(R[:, 2], -eye / np.linalg.norm(eye), atol=1e-6)  # +z looks at the origin
        assert R[2, 1] <= 1e-6  # image y (down) has no upward world component
        assert abs(R[2, 0]) < 1e-6  # image x stays horizontal


def test_camera_on_x_axis_has_known_axes():
    # At (2,0,0) looking at the origin with +Z up: forward -X, right +Y... x = z × up = (-1,0,0)×(0,0,1) = (0,1,0).
    c2w = look_at(np.array([2.0, 0, 0]))
    np.testing.assert_allclose(c2w[:3, 0], [0, 1, 0], atol=1e-7)
    np.testing.assert_allclose(c2w[:3, 1], [0, 0, -1], atol=1e-7)
    np.testing.assert_allclose(c2w[:3, 2], [-1, 0, 0], atol=1e-7)


def test_blender_opencv_conversion_flips_y_and_z():
    c2w = look_at(np.array([1.0, 2.0, 3.0]))
    b = opencv_to_blender(c2w)
    np.testing.assert_allclose(b[:3, 1], -c2w[:3, 1], atol=1e-7)  # Blender y up = -OpenCV y
    np.testing.assert_allclose(b[:3, 2], -c2w[:3, 2], atol=1e-7)  # Blender looks down -z
    np.testing.assert_allclose(blender_to_opencv(b), c2w, atol=1e-7)


def test_intrinsics_field_of_view():
    K = intrinsics(40.0, 128)
    # The image edge (x = 0) is at half the field of view from the axis.
    assert math.degrees(math.atan(K[0, 2] / K[0, 0])) == pytest.approx(20.0)
    assert K[0, 2] == K[1, 2] == 64.0 and K[0, 0] == K[1, 1]


def test_orbit_angles_follow_design():
    v = orbit_views(20, 2.6)
    np.testing.assert_allclose(v["azimuth"], 18.0 * np.arange(20))
    np.testing.assert_allclose(v["elevation"], 30.0 * np.sin(np.radians(36.0 * np.arange(20))), atol=1e-9)
    pos = v["c2w"][:, :3, 3].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(pos, axis=1), 2.6, rtol=1e-6)
    np.testing.assert_allclose(np.degrees(np.arcsin(pos[:, 2] / 2.6)), v["elevation"], atol=1e-4)
    np.testing.assert_allclose(np.degrees(np.arctan2(pos[:, 1], pos[:, 0])) % 360, v["azimuth"], atol=1e-4)
    e = eval_input_views(20.0, 2.6)
    np.testing.assert_allclose(e["c2w"][1, :3, 3], spherical_position(90, 20, 2.6), atol=1e-5)


def test_random_views_are_seeded_and_area_uniform():
    a, b, c = random_views("uid-a", 32), random_views("uid-a", 32), random_views("uid-b", 32)
    np.testing.assert_array_equal(a["c2w"], b["c2w"])
    assert not np.allclose(a["c2w"], c["c2w"])
    big = random_views("stats", 20000)
    el, r = big["elevation"], big["distance"]
    assert el.min() >= -30 and el.max() <= 70 and r.min() >= 2.4 and r.max() <= 2.8
    # Area-uniform: sin(el) uniform on [sin -30°, sin 70°]; its CDF at sin(el) is linear (KS test).
    from scipy import stats

    s0, s1 = math.sin(math.radians(-30)), math.sin(math.radians(70))
    assert stats.kstest((np.sin(np.radians(el)) - s0) / (s1 - s0), "uniform").pvalue > 1e-3
    # ... whereas elevation itself is not uniform (more views near the equator).
    assert stats.kstest((el + 30) / 100, "uniform").pvalue < 1e-6
    # The tangent cone of the sphere inscribed in the normalised box (radius 0.5) stays inside the 40°
    # frustum. The contract's "bounding sphere (radius √3/2) stays in frame" does not hold below distance 2.53:
    # box corners can leave a 64-px frame by ~2 px at distance 2.4 (see docs/render.md).
    assert (np.degrees(np.arcsin(0.5 / r)) < 20.0).all()
    assert np.degrees(np.arcsin(math.sqrt(3) / 2 / 2.4)) > 20.0


@pytest.mark.parametrize("azimuth, world_of", [
    # camera on the -Y axis looking along +Y: image x = world +X, image y (down) = world -Z
    (-90.0, lambda xc, yc, z: (xc, -2.5 + z, -yc)),
    # camera on the +X axis looking along -X: image x = world +Y, image y (down) = world -Z
    (0.0, lambda xc, yc, z: (2.5 - z, xc, -yc)),
])
def test_unproject_known_pixel_centres_closed_form(azimuth, world_of):
    """fov 90° at 64 px: f = 32, principal point (32, 32). Pixel (u, v) has its centre at (u+.5, v+.5), so at
    planar depth z it sits at camera x = (u + .5 - 32)·z/32, y = (v + .5 - 32)·z/32."""
    c2w = look_at(spherical_position(azimuth, 0.0, 2.5))
    K = intrinsics(90.0, 64)
    assert np.allclose(K, [[32, 0, 32], [0, 32, 32], [0, 0, 1]])
    depth = np.zeros((64, 64))
    depth[15, 47] = 2.0  # row v = 15, column u = 47: centre (47.5, 15.5) -> camera (0.96875, -1.03125, 2)
    depth[32, 32] = 1.0  # centre (32.5, 32.5) -> camera (1/64, 1/64, 1)
    depth[0, 0] = 0.5  # the corner pixel: centre (0.5, 0.5) -> camera (-0.4921875, -0.4921875, 0.5)
    want = np.array([world_of(-0.4921875, -0.4921875, 0.5), world_of(0.96875, -1.03125, 2.0),
                     world_of(1 / 64, 1 / 64, 1.0)])  # row-major pixel order: (0,0), (15,47), (32,32)
    got = unproject_depth(depth, c2w, K)
    np.testing.assert_allclose(got, want, atol=1e-6)  # float32 c2w / K
    uv, z = project(want, c2w, K)  # and back onto the same pixel centres and depths
    np.testing.assert_allclose(uv, [[0.5, 0.5], [47.5, 15.5], [32.5, 32.5]], atol=1e-5)
    np.testing.assert_allclose(z, [0.5, 2.0, 1.0], atol=1e-6)


def test_view_name_pads_to_the_largest_index():
    assert view_name(3, "rgba", 32) == "03.rgba.png" and view_name(0, "depth", 1) == "00.depth.png"
    assert view_name(7, "normal", 100) == "07.normal.png"  # 99 is the largest index: still two digits
    assert view_name(7, "normal", 101) == "007.normal.png" and view_name(100, "rgba", 101) == "100.rgba.png"
    with pytest.raises(ValueError, match="kind"):
        view_name(0, "mask", 4)
    with pytest.raises(ValueError, match="outside"):
        view_name(4, "rgba", 4)


def test_grid_protocol_is_16_azimuths_at_4_elevations():
    g = grid_views()
    assert g["c2w"].shape == (64, 4, 4)
    centres = g["c2w"][:, :3, 3].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 2.7, atol=1e-5)
    el = np.degrees(np.arcsin(centres[:, 2] / 2.7))
    np.testing.assert_allclose(el, np.repeat([0.0, 20.0, 40.0, 60.0], 16), atol=1e-4)
    az = np.degrees(np.arctan2(centres[:, 1], centres[:, 0])) % 360
    np.testing.assert_allclose(az, np.tile(22.5 * np.arange(16), 4), atol=1e-4)
    for c in g["c2w"]:  # every camera looks at the origin
        np.testing.assert_allclose(c[:3, 2], -c[:3, 3] / np.linalg.norm(c[:3, 3]), atol=1e-6)
    np.testing.assert_allclose(eval_views("instantmesh", 20, 2.6, 2.7)["c2w"], orbit_views(20, 2.6)["c2w"])
    np.testing.assert_allclose(eval_views("lrm64", 20, 2.6, 2.0)["distance"], 2.0)
    with pytest.raises(ValueError, match="eval_protocol"):
        eval_views("lgm", 20, 2.6, 2.7)

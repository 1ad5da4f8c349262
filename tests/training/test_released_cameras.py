"""Our camera conventions (core/cameras.py, training/cameras.py, training/recon_inputs.py) against the released
code's cameras (fixture official-gtr-tiny-v2 `cameras`, README "cameras.safetensors"): Blender matrix_world →
world-to-camera, the Zero123++ `prepare_mv` cameras (and with them the released frame scale 2), and the
inference orbit with its OpenGL projection.

Every key of the fixture is held below (`HELD`)."""

from __future__ import annotations

import json

import numpy as np
import torch

from core.cameras import blender_to_opencv, intrinsics, look_at, spherical_position
from core.config import load_config
from tests.training.released import fixture, metadata
from training.cameras import opencv_to_clip, to_official_frame
from training.recon_inputs import (
    RELEASED_FRAME_SCALE,
    ZERO123PP_AZIMUTHS,
    ZERO123PP_ELEVATIONS,
    ZERO123PP_FOV,
    released_to_ours,
    zero123pp_cameras,
)

F = fixture("cameras")
HELD = {"blender_matrix_world", "blender_w2c_opencv_yup", "blender_w2c_opencv_zup", "blender_c2w_opencv_yup",
        "zero123pp_cam_ext_file", "zero123pp_fx_fy_cx_cy_h_w_file", "zero123pp_c2w_opencv_exact",
        "zero123pp_elevation_deg", "zero123pp_azimuth_deg", "orbit_c2w", "orbit_w2c", "orbit_proj_mtx",
        "orbit_mvp_mtx", "orbit_camera_positions", "orbit_azimuth", "orbit_elevation",
        "orbit_nerf_poses_opencv_c2w", "orbit_nerf_intrinsics"}
# Our poses are float32 (the contract's dtype): rotations to ~6e-8, centres at distance ≤ 4 to ~4e-7.
ATOL = 1e-6
FLIP_GL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))  # OpenCV <-> OpenGL camera axes


def test_every_fixture_key_is_held_here():
    assert set(F) == HELD


def test_blender_matrix_world_to_world_to_camera():
    # Blender's camera (x right, y up, looking down −z) → OpenCV in exactly one function; the released
    # get_world2cam_from_blender is its inverse, in Blender's Z-up world or (meshlab) their Y-up one.
    M = F["blender_matrix_world"]
    c2w_zup = torch.from_numpy(blender_to_opencv(M.numpy()).astype(np.float64))
    torch.testing.assert_close(torch.linalg.inv(c2w_zup), F["blender_w2c_opencv_zup"], atol=ATOL, rtol=0)
    c2w_yup = to_official_frame(c2w_zup, 1.0)  # the released function does not scale (unit matrix_world)
    torch.testing.assert_close(c2w_yup, F["blender_c2w_opencv_yup"], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(c2w_yup), F["blender_w2c_opencv_yup"], atol=ATOL, rtol=0)
    # camera 0 at (0, −2.5, 0.8) in Blender sits at (0, 0.8, 2.5) in theirs: p_model = (x, z, −y)
    torch.testing.assert_close(c2w_yup[0, :3, 3], torch.tensor([0.0, 0.8, 2.5], dtype=torch.float64), atol=ATOL, rtol=0)


def test_zero123pp_cameras_are_the_prepare_mv_cameras():
    c2w, K = zero123pp_cameras(512)
    theirs = to_official_frame(torch.from_numpy(c2w).double(), RELEASED_FRAME_SCALE)
    # The same six cameras, not rotated about the up axis: radius 4 in their frame is 2 in ours, so the
    # released frame scale (official_frame_scale) is 2.
    torch.testing.assert_close(theirs, F["zero123pp_c2w_opencv_exact"], atol=ATOL, rtol=0)
    assert load_config("configs/official.yaml").model.official_frame_scale == RELEASED_FRAME_SCALE == 2.0
    # the camera files store w2c rounded to 6 decimals (%f): within 5e-7 per entry, plus our float32
    torch.testing.assert_close(torch.linalg.inv(theirs), F["zero123pp_cam_ext_file"], atol=2e-6, rtol=0)
    # ... and read back through the released-camera path they give the same cameras in our frame
    ours_from_file = released_to_ours(np.linalg.inv(F["zero123pp_cam_ext_file"].numpy()))
    np.testing.assert_allclose(ours_from_file, c2w, atol=3e-6, rtol=0)
    fxfycxcy_hw = F["zero123pp_fx_fy_cx_cy_h_w_file"]
    for k in range(6):
        assert np.allclose([K[k, 0, 0], K[k, 1, 1], K[k, 0, 2], K[k, 1, 2]], fxfycxcy_hw[k, :4].numpy(), atol=1e-3)
        assert fxfycxcy_hw[k, 4:].tolist() == [512, 512]
    # elevations as stored; azimuths: theirs run from +Z towards +X (Y-up), ours from +X towards +Y (Z-up)
    assert list(ZERO123PP_ELEVATIONS) == F["zero123pp_elevation_deg"].tolist()
    assert [a + 90.0 for a in ZERO123PP_AZIMUTHS] == F["zero123pp_azimuth_deg"].tolist()
    meta = json.loads(metadata("cameras")["zero123pp"])
    assert meta["fov_deg"] == ZERO123PP_FOV and meta["radius"] == 4


def _orbit_ours() -> tuple[torch.Tensor, torch.Tensor]:
    """The released inference orbit (get_cameras(azimuths, 20°, fov 50, distance 3.5), their frame) as our
    cameras: position 3.5·(cos e cos a, sin e, cos e sin a) Y-up is 1.75·(cos e cos(−a), cos e sin(−a), sin e)
    in ours, so our look_at at azimuth −a, elevation e, distance 3.5 / 2."""
    az, el = F["orbit_azimuth"].double(), F["orbit_elevation"].double()
    c2w = np.stack([look_at(spherical_position(-a, e, 3.5 / RELEASED_FRAME_SCALE)) for a, e in zip(az.tolist(), el.tolist())])
    return to_official_frame(torch.from_numpy(c2w.astype(np.float64)), RELEASED_FRAME_SCALE), az


def test_inference_orbit_poses():
    theirs_cv, az = _orbit_ours()
    assert torch.allclose(az[1:] - az[:-1], torch.full((49,), 7.2, dtype=torch.float64), atol=1e-4)
    assert (F["orbit_elevation"] == 20).all()
    torch.testing.assert_close(theirs_cv.float(), F["orbit_nerf_poses_opencv_c2w"], atol=ATOL, rtol=0)
    # their c2w is OpenGL [right, up, −look-at]: ours with the y and z camera axes negated
    torch.testing.assert_close((theirs_cv @ FLIP_GL).float(), F["orbit_c2w"], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(theirs_cv @ FLIP_GL).float(), F["orbit_w2c"], atol=ATOL, rtol=0)
    torch.testing.assert_close(theirs_cv[:, :3, 3].float(), F["orbit_camera_positions"], atol=ATOL, rtol=0)
    K = intrinsics(50.0, 1024)
    assert np.allclose(F["orbit_nerf_intrinsics"].numpy(), [K[0, 0], K[1, 1], K[0, 2], K[1, 2]], atol=1e-3)


def test_inference_orbit_projection():
    """Their OpenGL projection (+1/tan(fovy/2) at [1,1], near 0.1, far 1000) rasterizes with row 0 at the
    image bottom; ours (opencv_to_clip) keeps OpenCV rows, so the two differ by exactly a flip of clip y."""
    theirs_cv, _ = _orbit_ours()
    K = torch.from_numpy(intrinsics(50.0, 512)).double().expand(50, 3, 3)
    ours = opencv_to_clip(theirs_cv, K, 512, 512, near=0.1, far=1000.0)
    flip_y = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close((flip_y @ ours).float(), F["orbit_mvp_mtx"], atol=2e-6, rtol=1e-6)
    proj = opencv_to_clip(torch.eye(4, dtype=torch.float64).expand(50, 4, 4), K, 512, 512, near=0.1, far=1000.0)
    # the projection alone: theirs takes OpenGL camera coordinates, ours OpenCV ones (y, z negated)
    torch.testing.assert_close((flip_y @ proj @ FLIP_GL).float(), F["orbit_proj_mtx"], atol=1e-6, rtol=1e-6)

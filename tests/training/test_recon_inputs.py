"""Tests for training/recon_inputs.py: layouts' cameras against closed forms, folder formats, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from training.recon_inputs import (
    InputError,
    eval4_cameras,
    read_views,
    split_grid,
    zero123pp_cameras,
)


def _project(c2w: np.ndarray, K: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = np.linalg.inv(c2w.astype(np.float64)) @ np.append(p, 1.0)
    uv = K.astype(np.float64) @ q[:3]
    return uv[:2] / uv[2]


def _check_orbit_camera(c2w, K, size, az, el, dist, fov):
    a, e = math.radians(az), math.radians(el)
    want = dist * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    np.testing.assert_allclose(c2w[:3, 3], want, atol=1e-5)
    # OpenCV: +z looks at the origin, which lands on the image centre.
    np.testing.assert_allclose(c2w[:3, 2], -want / dist, atol=1e-5)
    np.testing.assert_allclose(_project(c2w, K, np.zeros(3)), [size / 2, size / 2], atol=1e-3)
    # World up (+Z) appears upwards in the image (smaller row), and is not tilted sideways.
    top = _project(c2w, K, np.array([0.0, 0.0, 0.2]))
    assert top[1] < size / 2 and abs(top[0] - size / 2) < 1e-3
    # The azimuth runs counter-clockwise seen from above: a point at +90° azimuth from the camera's own
    # azimuth appears on the image's right for a camera looking at the origin (right-handed, Z up).
    side = 0.2 * np.array([math.cos(a + math.pi / 2), math.sin(a + math.pi / 2), 0.0])
    assert _project(c2w, K, side)[0] > size / 2
    # Focal length from the field of view.
    assert abs(K[0, 0] - 0.5 * size / math.tan(math.radians(fov) / 2)) < 1e-3
    np.testing.assert_allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-5)


def test_eval4_layout_matches_design():
    c2w, K = eval4_cameras(64)
    assert c2w.shape == (4, 4, 4) and K.shape == (4, 3, 3)
    for i, az in enumerate([0.0, 90.0, 180.0, 270.0]):
        _check_orbit_camera(c2w[i], K[i], 64, az, 20.0, 2.6, 40.0)


def test_zero123pp_layout_matches_its_definition():
    c2w, K = zero123pp_cameras(320)
    assert c2w.shape == (6, 4, 4)
    for k in range(6):
        # Zero123++ v1.2 (the released prepare_mv): azimuth 30 + 60k from +Z towards +X in their Y-up frame,
        # i.e. −60 + 60k from +X towards +Y in ours; elevation 20 / -10 alternating, FoV 30, radius 4 in
        # [-1, 1]^3 = radius 2 for our [-0.5, 0.5]^3 object (tests/training/test_released_cameras.py holds
        # these against the released cameras themselves).
        _check_orbit_camera(c2w[k], K[k], 320, -60.0 + 60.0 * k, 20.0 if k % 2 == 0 else -10.0, 2.0, 30.0)


def test_split_grid_reads_row_by_row():
    grid = np.zeros((6, 4, 1))
    for r in range(3):
        for c in range(2):
            grid[2 * r:2 * r + 2, 2 * c:2 * c + 2] = 10 * r + c
    tiles = split_grid(grid, 3, 2)
    assert [t[0, 0, 0] for t in tiles] == [0, 1, 10, 11, 20, 21]
    with pytest.raises(InputError, match="divisible"):
        split_grid(np.zeros((7, 4, 1)), 3, 2)


def _rgba(size: int, color=(255, 0, 0), alpha: bool = True) -> Image.Image:
    a = np.zeros((size, size, 4), np.uint8)
    a[..., :3] = color
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4, 3] = 255
    return Image.fromarray(a, "RGBA") if alpha else Image.fromarray(a[..., :3], "RGB")


def _write_json(folder, frames):
    (folder / "cameras.json").write_text(json.dumps({"frames": frames}))


def test_json_folder_resizes_and_scales_K(tmp_path):
    c2w, K = eval4_cameras(64)
    frames = []
    for i in range(4):
        _rgba(64, (0, 0, 0)).save(tmp_path / f"v{i}.png")  # black colour under transparent pixels
        frames.append({"file": f"v{i}.png", "c2w": c2w[i].tolist(), "K": K[i].tolist()})
    _write_json(tmp_path, frames)
    v = read_views(tmp_path, 32, background=1.0)
    assert v.rgb.shape == (4, 32, 32, 3) and v.source == "json"
    np.testing.assert_allclose(v.K[0], eval4_cameras(32)[1][0], atol=1e-4)
    # Inside: black object; outside: white background (composited), mask 1 / 0.
    assert v.mask[0, 16, 16] == 1 and v.mask[0, 0, 0] == 0
    assert v.rgb[0, 16, 16].max() < 1e-6 and v.rgb[0, 0, 0].min() > 1 - 1e-6


def test_premultiplied_resize_has_no_dark_halo(tmp_path):
    # Red object with black (invisible) colour outside: a straight resize would darken the edge pixels.
    a = np.zeros((64, 64, 4), np.uint8)
    a[16:48, 16:48] = (255, 0, 0, 255)
    a[16:48, 15] = (255, 0, 0, 128)  # soft edge
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    c2w, K = eval4_cameras(64)
    for i in range(4):
        Image.fromarray(a, "RGBA").save(tmp_path / f"{i}.png")
    (tmp_path / "a.png").unlink()
    v = read_views(tmp_path, 16, layout="eval4", background=0.0)
    edge = v.mask[0] > 0.01
    red = v.rgb[0][..., 0][edge] / v.mask[0][edge]  # un-premultiply the composite on black
    np.testing.assert_allclose(red, 1.0, atol=1e-4)


def test_render_folder(tmp_path):
    c2w, K = eval4_cameras(48)
    np.savez(tmp_path / "cameras.npz", c2w=c2w, K=K, width=48, height=48)
    for i in range(4):
        _rgba(48).save(tmp_path / f"{i:02d}.rgba.png")
        Image.fromarray(np.zeros((48, 48), np.uint16)).save(tmp_path / f"{i:02d}.depth.png")
    v = read_views(tmp_path, 48)
    assert v.source == "render" and len(v) == 4 and v.names[0] == "00.rgba.png"
    np.testing.assert_allclose(v.c2w, c2w)


def test_zero123pp_grid_image(tmp_path):
    grid = np.zeros((3 * 40, 2 * 40, 4), np.uint8)
    for k in range(6):
        r, c = divmod(k, 2)
        grid[r * 40 + 10:r * 40 + 30, c * 40 + 10:c * 40 + 30] = (40 * k, 0, 0, 255)
    Image.fromarray(grid, "RGBA").save(tmp_path / "grid.png")
    v = read_views(tmp_path, 40, layout="zero123pp")
    assert len(v) == 6
    np.testing.assert_allclose(v.rgb[:, 20, 20, 0], [40 * k / 255 for k in range(6)], atol=1e-6)


def test_rgb_with_mask_file(tmp_path):
    for i in range(4):
        _rgba(32, alpha=False).save(tmp_path / f"{i}.png")
        m = np.zeros((32, 32), np.uint8)
        m[8:24, 8:24] = 255
        Image.fromarray(m).save(tmp_path / f"{i}_mask.png")
    v = read_views(tmp_path, 32, layout="eval4")
    assert len(v) == 4 and v.mask[0, 16, 16] == 1 and v.mask[0, 0, 0] == 0


# ---- bad input: each gets an InputError naming the problem ------------------------------------------


def test_wrong_number_of_images(tmp_path):
    for i in range(3):
        _rgba(32).save(tmp_path / f"{i}.png")
    with pytest.raises(InputError, match="needs 4 images.*has 3"):
        read_views(tmp_path, 32, layout="eval4")
    with pytest.raises(InputError, match="needs 6 images"):
        read_views(tmp_path, 32, layout="zero123pp")


def test_expected_views_checked(tmp_path):
    for i in range(4):
        _rgba(32).save(tmp_path / f"{i}.png")
    with pytest.raises(InputError, match="4 input views, but this model takes 6"):
        read_views(tmp_path, 32, layout="eval4", expected_views=6)


def test_missing_alpha_without_mask(tmp_path):
    for i in range(4):
        _rgba(32, alpha=False).save(tmp_path / f"{i}.png")
    with pytest.raises(InputError, match="0.png has no alpha channel and no mask"):
        read_views(tmp_path, 32, layout="eval4")


def test_mask_of_another_size(tmp_path):
    for i in range(4):
        _rgba(32, alpha=False).save(tmp_path / f"{i}.png")
        Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / f"{i}.mask.png")
    with pytest.raises(InputError, match="mask .* is 16x16 but its image"):
        read_views(tmp_path, 32, layout="eval4")


def test_images_and_cameras_that_do_not_match(tmp_path):
    c2w, K = eval4_cameras(64)  # K for 64² images ...
    frames = []
    for i in range(4):
        _rgba(32).save(tmp_path / f"{i}.png")  # ... but the files are 32²
        frames.append({"file": f"{i}.png", "c2w": c2w[i].tolist(), "K": K[i].tolist()})
    _write_json(tmp_path, frames)
    with pytest.raises(InputError, match="does not describe a 32x32 image"):
        read_views(tmp_path, 32)
    # An image without a camera.
    K32 = eval4_cameras(32)[1]
    for f in frames:
        f["K"] = K32[0].tolist()
    _write_json(tmp_path, frames[:3])
    with pytest.raises(InputError, match="have no camera in cameras.json: 3.png"):
        read_views(tmp_path, 32)
    # A camera whose image is missing.
    _write_json(tmp_path, frames + [{"file": "9.png", "c2w": c2w[0].tolist(), "K": K32[0].tolist()}])
    with pytest.raises(InputError, match="'9.png', which does not exist"):
        read_views(tmp_path, 32)
    # A render folder with fewer cameras than images.
    (tmp_path / "cameras.json").unlink()
    np.savez(tmp_path / "cameras.npz", c2w=c2w[:2], K=K32[:2])
    for i in range(4):
        _rgba(32).save(tmp_path / f"{i:02d}.rgba.png")
    with pytest.raises(InputError, match="2 cameras but there are 4"):
        read_views(tmp_path, 32)


def test_bad_poses_and_paths(tmp_path):
    c2w, K = eval4_cameras(32)
    _rgba(32).save(tmp_path / "0.png")
    bad = c2w[0].copy()
    bad[:3, :3] *= 2.0
    _write_json(tmp_path, [{"file": "0.png", "c2w": bad.tolist(), "K": K[0].tolist()}])
    with pytest.raises(InputError, match="not a rigid"):
        read_views(tmp_path, 32)
    behind = c2w[0].copy()
    behind[:3, 2] *= -1
    behind[:3, 0] *= -1  # still a rotation, but looking away from the object
    _write_json(tmp_path, [{"file": "0.png", "c2w": behind.tolist(), "K": K[0].tolist()}])
    with pytest.raises(InputError, match="behind the camera"):
        read_views(tmp_path, 32)
    _write_json(tmp_path, [{"file": "../x.png", "c2w": c2w[0].tolist(), "K": K[0].tolist()}])
    with pytest.raises(InputError, match="outside the input folder"):
        read_views(tmp_path, 32)
    (tmp_path / "cameras.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_views(tmp_path, 32)


def test_no_cameras_and_unknown_layout_and_bad_files(tmp_path):
    _rgba(32).save(tmp_path / "0.png")
    with pytest.raises(InputError, match="neither cameras.npz .* nor cameras.json"):
        read_views(tmp_path, 32)
    with pytest.raises(InputError, match="unknown layout 'nine'"):
        read_views(tmp_path, 32, layout="nine")
    with pytest.raises(InputError, match="does not exist"):
        read_views(tmp_path / "nope", 32)
    for i in range(1, 4):
        (tmp_path / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="1.png: cannot read the image"):
        read_views(tmp_path, 32, layout="eval4")
    for i in range(4):
        Image.fromarray(np.zeros((32, 40, 4), np.uint8) + 255, "RGBA").save(tmp_path / f"{i}.png")
    with pytest.raises(InputError, match="must be square"):
        read_views(tmp_path, 32, layout="eval4")

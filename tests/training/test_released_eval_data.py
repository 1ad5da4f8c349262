"""Reading the released inference folder (training/recon_inputs.py: `rgb_NNN.png` + `cam_NNN.txt`) against the
released `scripts/inference.py: load_eval_data` (fixture official-gtr-tiny-v2 `eval_data`, README
"eval_data.safetensors"): poses, intrinsics, OpenGL world-to-camera, projections and their products for the
six Zero123++ camera files and one custom camera; the image/mask means through our compositing.

Every key of the fixture is held below (`HELD`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import OFFICIAL_TINY_V2
from tests.training.released import fixture
from training.cameras import opencv_to_clip, to_official_frame
from training.recon_inputs import (
    RELEASED_FRAME_SCALE,
    InputError,
    read_released_camera,
    read_views,
    zero123pp_cameras,
)

E = fixture("eval_data")
HELD = {f"{p}_cond_{k}" for p in ("zero123pp", "custom")
        for k in ("poses", "intrinsics", "m2vs", "projections", "mvps", "imgs_mean", "masks_mean")}
CAMS = OFFICIAL_TINY_V2 / "cams"
FLIP_GL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
# The camera files hold w2c rounded to 6 decimals (%f, ≤ 5e-7 per entry); the released loader inverts it in
# float64 and casts to float32, we do the same and convert frames in float64, then store float32: ≤ 2e-6
# on centres at distance 4. Their m2v is [Rᵀ | −Rᵀt] of that inverse, ≤ 3.4e-6 from the true inverse (README).
ATOL_POSE, ATOL_M2V = 2e-6, 5e-6


def test_every_fixture_key_is_held_here():
    assert set(E) == HELD


def _images(folder, means: torch.Tensor, mask_means: torch.Tensor) -> None:
    """Stand-ins for the un-vendored rgb_NNN.png (README: a random colour with an alpha disk): a disk of
    exactly round(m·512²) pixels and the uniform colour c that the stored means imply, since compositing
    on white is linear in alpha: mean = c·m + (1 − m)."""
    yy, xx = np.mgrid[:512, :512]
    order = np.argsort(((yy - 255.5) ** 2 + (xx - 255.5) ** 2).reshape(-1), kind="stable")
    for i, (mean, m) in enumerate(zip(means.numpy(), mask_means.numpy())):
        alpha = np.zeros(512 * 512, np.uint8)
        alpha[order[:int(round(float(m) * 512 * 512))]] = 255
        c = np.clip(1 - (1 - mean) / m, 0, 1)
        rgba = np.zeros((512, 512, 4), np.uint8)
        rgba[..., :3] = np.round(c * 255).astype(np.uint8)
        rgba[..., 3] = alpha.reshape(512, 512)
        Image.fromarray(rgba).save(folder / f"rgb_{i:03d}.png")


def test_zero123pp_folder(tmp_path):
    for p in sorted((CAMS / "zero123pp").glob("cam_*.txt")):
        shutil.copy(p, tmp_path / p.name)
    _images(tmp_path, E["zero123pp_cond_imgs_mean"], E["zero123pp_cond_masks_mean"])
    views = read_views(tmp_path, 512)
    assert views.source == "released" and len(views) == 6
    # our frame: the same cameras as the Zero123++ layout (which test_released_cameras holds exactly)
    np.testing.assert_allclose(views.c2w, zero123pp_cameras(512)[0], atol=3e-6, rtol=0)
    theirs = to_official_frame(torch.from_numpy(views.c2w).double(), RELEASED_FRAME_SCALE)
    torch.testing.assert_close(theirs.float(), E["zero123pp_cond_poses"], atol=ATOL_POSE, rtol=0)
    K = torch.from_numpy(views.K).double()
    torch.testing.assert_close(torch.stack([K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]], -1).float(),
                               E["zero123pp_cond_intrinsics"], atol=1e-3, rtol=0)
    torch.testing.assert_close((FLIP_GL @ torch.linalg.inv(theirs)).float(), E["zero123pp_cond_m2vs"],
                               atol=ATOL_M2V, rtol=0)
    # OpenGL projection with −1/tan(fovy/2) at [1,1] (row 0 = image top) times the OpenGL w2c is exactly our
    # OpenCV → nvdiffrast clip matrix (same near/far), for centred principal points
    torch.testing.assert_close(opencv_to_clip(theirs, K, 512, 512, 0.1, 100.0).float(), E["zero123pp_cond_mvps"],
                               atol=2e-5, rtol=1e-5)
    proj = opencv_to_clip(torch.eye(4, dtype=torch.float64).expand(6, 4, 4), K, 512, 512, 0.1, 100.0)
    torch.testing.assert_close((proj @ FLIP_GL).float(), E["zero123pp_cond_projections"], atol=1e-5, rtol=1e-6)
    # white compositing and alpha: their loader truncates the composite to uint8 (up to 1/255 lower)
    torch.testing.assert_close(torch.from_numpy(views.mask.reshape(6, -1).mean(1)), E["zero123pp_cond_masks_mean"],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(views.rgb.reshape(6, -1, 3).mean(1)), E["zero123pp_cond_imgs_mean"],
                               atol=5e-3, rtol=0)


def test_custom_camera_and_the_released_projection_quirks(tmp_path):
    w2c, K, (h, w) = read_released_camera(CAMS / "custom" / "cam_000.txt")
    assert (h, w) == (256, 256)
    K512 = K * np.array([[512 / w], [512 / h], [1.0]])  # load_eval_data rescales K by input_img_res / height
    assert np.allclose([K512[0, 0], K512[1, 1], K512[0, 2], K512[1, 2]], E["custom_cond_intrinsics"][0].numpy())
    c2w = torch.from_numpy(np.linalg.inv(w2c))  # their frame, radius 1: no rescaling
    torch.testing.assert_close(c2w[None].float(), E["custom_cond_poses"], atol=ATOL_POSE, rtol=0)
    torch.testing.assert_close((FLIP_GL @ torch.linalg.inv(c2w))[None].float(), E["custom_cond_m2vs"],
                               atol=ATOL_M2V, rtol=0)
    # Two released quirks, documented rather than copied: the fov uses the rescaled fx with the file's width
    # (2·600/256 = 4.6875 instead of 2·600/512), and the symmetric projection ignores the principal point
    # (cx 240 of 512). Our clip matrix is the camera's own: 2fx/W and 2cx/W − 1.
    P = E["custom_cond_projections"][0].double()
    assert P[0, 0].item() == pytest.approx(2 * K512[0, 0] / w) and P[1, 1].item() == pytest.approx(-2 * K512[1, 1] / h)
    assert P[0, 2] == 0 and P[1, 2] == 0
    raw = opencv_to_clip(torch.eye(4, dtype=torch.float64), torch.from_numpy(K512), 512, 512, 0.1, 100.0)
    assert raw[0, 0].item() == pytest.approx(600 / 256) and raw[0, 2].item() == pytest.approx(2 * 240 / 512 - 1)
    torch.testing.assert_close((raw @ FLIP_GL)[2:], P[2:], atol=1e-6, rtol=0)  # depth rows agree (near 0.1, far 100)
    torch.testing.assert_close(E["custom_cond_mvps"][0].double(), P @ (FLIP_GL @ torch.linalg.inv(c2w)),
                               atol=2e-5, rtol=1e-5)
    # Our reader refuses such a camera: we need square pixels and a centred principal point (the model's
    # ray maps are trained on those); the message names the file and the problem
    shutil.copy(CAMS / "custom" / "cam_000.txt", tmp_path / "cam_000.txt")
    mean, m = E["custom_cond_imgs_mean"], E["custom_cond_masks_mean"]
    _images(tmp_path, mean, m)
    img = Image.open(tmp_path / "rgb_000.png").resize((256, 256), Image.NEAREST)
    img.save(tmp_path / "rgb_000.png")
    with pytest.raises(InputError, match=r"rgb_000.png: K .* \(principal point at its centre\)"):
        read_views(tmp_path, 512)
    # the image means through our reader with a fixed camera: its compositing, as above
    np.testing.assert_allclose(np.asarray(Image.open(tmp_path / "rgb_000.png"))[..., 3].mean() / 255, m[0].item(),
                               atol=2e-3)

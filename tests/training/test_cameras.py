"""training/cameras.py against independent references: numpy projection (core/cameras.py), closed-form
Plücker identities, and the released model's own input tensor (in test_convert_official)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import cameras as npcam
from training import cameras


def _camera(az: float = 30.0, el: float = 20.0, r: float = 2.6, size: int = 9):
    c2w = torch.from_numpy(npcam.look_at(npcam.spherical_position(az, el, r)))
    K = torch.from_numpy(npcam.intrinsics(40.0, size))
    return c2w, K


def test_rays_pass_through_pixel_centres():
    # A point along every ray must project (numpy, independent code) back onto that pixel's centre.
    c2w, K = _camera(size=7)
    o, d = cameras.camera_rays(c2w.double(), K.double(), 7, 7)
    assert o.shape == d.shape == (7, 7, 3)
    np.testing.assert_allclose(d.norm(dim=-1).numpy(), 1.0, atol=1e-12)
    pts = (o + 1.7 * d).reshape(-1, 3).numpy()
    uv, z = npcam.project(pts, c2w.numpy(), K.numpy())
    jj, ii = np.meshgrid(np.arange(7), np.arange(7), indexing="ij")
    np.testing.assert_allclose(uv[:, 0], ii.ravel() + 0.5, atol=1e-9)
    np.testing.assert_allclose(uv[:, 1], jj.ravel() + 0.5, atol=1e-9)
    assert (z > 0).all()
    # odd image, principal point at the centre: the middle pixel looks at the origin (look_at target)
    np.testing.assert_allclose(d[3, 3].numpy(), -c2w[:3, 3].numpy() / np.linalg.norm(c2w[:3, 3]), atol=1e-7)


def test_patch_rays_are_the_window_of_the_full_image():
    c2w, K = _camera(size=16)
    _, d_full = cameras.camera_rays(c2w, K, 16, 16)
    _, d_patch = cameras.camera_rays(c2w, K, 16, 16, patch=(3, 5, 4, 6))
    torch.testing.assert_close(d_patch, d_full[3:7, 5:11])
    with pytest.raises(ValueError, match="does not fit"):
        cameras.camera_rays(c2w, K, 16, 16, patch=(14, 0, 4, 4))


def test_plucker_closed_form():
    rng = np.random.default_rng(0)
    o = torch.from_numpy(rng.normal(size=(50, 3)))
    d = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(50, 3))), dim=-1)
    pl = cameras.plucker(o, d)
    m = pl[:, 3:]
    torch.testing.assert_close(pl[:, :3], d)
    # the moment is a property of the line: the same from any point on it
    torch.testing.assert_close(cameras.plucker(o + 2.5 * d, d)[:, 3:], m)
    # |o x d| = distance from the origin to the line, closed form |o|^2 - (o.d)^2
    dist2 = (o * o).sum(-1) - (o * d).sum(-1) ** 2
    torch.testing.assert_close((m * m).sum(-1), dist2)
    torch.testing.assert_close((m * d).sum(-1), torch.zeros(50, dtype=m.dtype))  # orthogonal to d
    # explicit components of o x d for one ray
    o0, d0 = o[0].numpy(), d[0].numpy()
    expected = [o0[1] * d0[2] - o0[2] * d0[1], o0[2] * d0[0] - o0[0] * d0[2], o0[0] * d0[1] - o0[1] * d0[0]]
    np.testing.assert_allclose(m[0].numpy(), expected, atol=1e-12)
    torch.testing.assert_close(cameras.plucker(o, d, "d_cross_o")[:, 3:], -m)
    with pytest.raises(ValueError):
        cameras.plucker(o, d, "nope")


def test_build_input_layouts():
    B, V, H = 2, 3, 8
    rgb, mask = torch.rand(B, V, 3, H, H), (torch.rand(B, V, 1, H, H) > 0.5).float()
    c2w = torch.stack([torch.stack([_camera(30.0 * i + 100 * b, 10.0, 2.5, H)[0] for i in range(V)])
                       for b in range(B)])
    K = _camera(size=H)[1].expand(B, V, 3, 3)
    ours = cameras.build_input(rgb, mask, c2w, K, "rgb_mask_plucker")
    theirs = cameras.build_input(rgb, mask, c2w, K, "rgb_dir_moment_mask")
    assert ours.shape == theirs.shape == (B, V, 10, H, H)
    o, d = cameras.camera_rays(c2w, K, H, H)
    torch.testing.assert_close(ours[:, :, :3], rgb)
    torch.testing.assert_close(ours[:, :, 3:4], mask)
    torch.testing.assert_close(ours[:, :, 4:7], d.permute(0, 1, 4, 2, 3))
    torch.testing.assert_close(theirs[:, :, 3:6], d.permute(0, 1, 4, 2, 3))
    torch.testing.assert_close(theirs[:, :, 6:9], -ours[:, :, 7:10])  # d x o = -(o x d)
    torch.testing.assert_close(theirs[:, :, 9:], mask)
    with pytest.raises(ValueError, match="mask"):
        cameras.build_input(rgb, mask[:, :, :, :4], c2w, K)
    with pytest.raises(ValueError, match="order"):
        cameras.build_input(rgb, mask, c2w, K, "bgr")


def test_clip_space_matches_numpy_projection():
    W, H, near, far = 64, 48, 0.5, 10.0
    c2w = torch.from_numpy(npcam.look_at(npcam.spherical_position(75.0, -20.0, 2.7))).double()
    K = torch.from_numpy(npcam.intrinsics(40.0, W, H)).double()
    K[0, 2] += 3.0  # an off-centre principal point must carry through as well
    pts = np.random.default_rng(1).uniform(-0.6, 0.6, size=(200, 3))
    mvp = cameras.opencv_to_clip(c2w, K, H, W, near, far)
    clip = torch.cat([torch.from_numpy(pts), torch.ones(200, 1, dtype=torch.float64)], 1) @ mvp.T
    ndc = clip[:, :3] / clip[:, 3:]
    uv, z = npcam.project(pts, c2w.numpy(), K.numpy())
    np.testing.assert_allclose((ndc[:, 0].numpy() + 1) / 2 * W, uv[:, 0], atol=1e-9)
    np.testing.assert_allclose((ndc[:, 1].numpy() + 1) / 2 * H, uv[:, 1], atol=1e-9)  # rows: no flip
    np.testing.assert_allclose(clip[:, 3].numpy(), z, atol=1e-9)  # w = camera z
    # NDC depth: -1 at the near plane, +1 at the far plane, increasing with z
    zs = torch.tensor([near, 2.0, far], dtype=torch.float64)
    cam_pts = torch.stack([torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), zs, torch.ones(3, dtype=torch.float64)], 1)
    world = cam_pts @ c2w.T
    clip2 = world @ mvp.T
    zn = (clip2[:, 2] / clip2[:, 3]).numpy()
    np.testing.assert_allclose(zn[[0, 2]], [-1.0, 1.0], atol=1e-9)
    assert -1 < zn[1] < 1


def test_official_frame_similarity():
    c2w, K = _camera(az=200.0, el=35.0, size=16)
    s = 2.0
    c2w_o = cameras.to_official_frame(c2w.double(), s)
    R = c2w_o[:3, :3]
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=torch.float64))  # still a rigid pose
    assert torch.det(R) > 0
    # world up (+Z ours) is +Y theirs; data [-0.5, 0.5]^3 maps to [-1, 1]^3
    torch.testing.assert_close(cameras.points_to_official_frame(torch.tensor([[0.0, 0.0, 0.5]]), s),
                               torch.tensor([[0.0, 1.0, 0.0]]))
    S = cameras.official_frame_matrix(s)
    torch.testing.assert_close(S[:3, :3] @ S[:3, :3].T, s * s * torch.eye(3))
    # images do not change: a point and its image under the similarity project to the same pixel
    pts = np.random.default_rng(2).uniform(-0.5, 0.5, size=(20, 3))
    uv, z = npcam.project(pts, c2w.numpy(), K.numpy())
    pts_o = cameras.points_to_official_frame(torch.from_numpy(pts), s).numpy()
    uv_o, z_o = npcam.project(pts_o, c2w_o.numpy(), K.numpy())
    np.testing.assert_allclose(uv_o, uv, atol=1e-6)
    np.testing.assert_allclose(z_o, s * z, atol=1e-6)


def test_intrinsics_from_fxfycxcy():
    K = cameras.intrinsics_from_fxfycxcy(torch.tensor([[10.0, 11.0, 4.0, 5.0]]))
    torch.testing.assert_close(K[0], torch.tensor([[10.0, 0, 4], [0, 11, 5], [0, 0, 1]]))

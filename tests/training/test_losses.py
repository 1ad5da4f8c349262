"""Losses: the ray-opacity regulariser against closed forms, PSNR against skimage, LPIPS against lpips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import (
    LPIPSLoss,
    depth_loss,
    mse,
    psnr,
    ray_opacity_regulariser,
    ray_opacity_samples,
)

BOX = 0.5


def axis_rays(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n rays along +x from x = -2, entering the box [-0.5, 0.5]^3 at t = 1.5 and leaving at t = 2.5."""
    o = torch.zeros(1, n, 3)
    o[..., 0] = -2.0
    o[..., 1:] = (torch.rand(1, n, 2, generator=gen) - 0.5) * 0.9  # inside the box's cross-section
    d = torch.zeros(1, n, 3)
    d[..., 0] = 1.0
    return o, d


def test_regulariser_constant_density_is_exact():
    """Constant σ: a point at fraction u of an empty stretch L sees 1 − exp(−σ·(1−u)·L) to its end."""
    gen = torch.Generator().manual_seed(0)
    o, d = axis_rays(64, gen)
    depth = torch.full((1, 64, 1), 1.8)  # surface at t = 1.8: L = 0.3 past the entry at 1.5
    u = torch.rand(1, 64, 1, generator=gen)
    sigma = 3.0
    loss = ray_opacity_regulariser(lambda p: torch.full(p.shape[:-1] + (1,), sigma), o, d, depth, BOX, u=u)
    want = (1 - torch.exp(-sigma * (1 - u) * 0.3)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_regulariser_point_lies_between_entry_and_surface():
    o, d = axis_rays(3, torch.Generator().manual_seed(1))
    depth = torch.tensor([[[1.9], [0.0], [1.7]]])  # second ray: background -> box exit (t = 2.5)
    u = torch.tensor([[[0.0], [0.5], [1.0]]])
    seen = []
    ray_opacity_regulariser(lambda p: seen.append(p) or torch.zeros(p.shape[:-1] + (1,)), o, d, depth, BOX, u=u)
    x = seen[0][0, :, 0]  # world x of each sample; entry at x = -0.5
    assert torch.allclose(x, torch.tensor([-0.5, -2.0 + 2.0, -2.0 + 1.7]), atol=1e-6)
    s = ray_opacity_samples(o, d, depth, BOX, u=u)
    # the length left to the end of the stretch: 0.4 to the surface, 0.5 to the exit, 0 at the surface
    torch.testing.assert_close(s["length"][0, :, 0], torch.tensor([0.4, 0.5, 0.0]), atol=1e-6, rtol=0)


def test_regulariser_linear_density_matches_the_integral():
    """σ grows linearly from the box entry, σ = a·s (s = distance past the entry). The point is uniform on
    [0, L] and its opacity is 1 − exp(−a·s·(L − s)); its expectation is ∫₀¹ 1 − exp(−a·L²·u(1−u)) du,
    integrated here by scipy (L = surface depth − entry, or the whole chord for background rays)."""
    from scipy.integrate import quad

    gen = torch.Generator().manual_seed(2)
    n = 200_000
    o, d = axis_rays(n, gen)
    depth = torch.full((1, n, 1), 2.2)  # L = 0.7
    depth[:, n // 2:] = 0.0  # background half: L = 1.0 (the chord)
    a = 4.0
    loss = ray_opacity_regulariser(lambda p: a * (p[..., :1] + BOX), o, d, depth, BOX, generator=gen)

    def expected(L: float) -> float:
        return quad(lambda u: 1 - math.exp(-a * L * L * u * (1 - u)), 0.0, 1.0)[0]

    closed = 0.5 * (expected(0.7) + expected(1.0))
    # Monte Carlo with 2e5 rays: the per-ray opacity has std < 0.3, so the mean's std < 1e-3.
    assert loss.item() == pytest.approx(closed, abs=3e-3)


def test_regulariser_counts_missed_rays_as_zero_and_has_gradient():
    o = torch.tensor([[[-2.0, 0.0, 0.0], [-2.0, 5.0, 0.0]]])  # the second ray passes beside the box
    d = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    depth = torch.zeros(1, 2, 1)
    u = torch.full((1, 2, 1), 0.5)  # the middle of the chord: 0.5 left to the exit
    w = torch.tensor(2.0, requires_grad=True)
    loss = ray_opacity_regulariser(lambda p: w * torch.ones(p.shape[:-1] + (1,)), o, d, depth, BOX, u=u)
    # the mean over both rays, the missed one being 0 (the released L1 over all rays)
    assert loss.item() == pytest.approx(0.5 * (1 - math.exp(-1.0)), rel=1e-6)
    loss.backward()
    assert w.grad.item() == pytest.approx(0.5 * 0.5 * math.exp(-1.0), rel=1e-5)  # ½ · d/dw (1 − e^{−0.5w})


def test_regulariser_lengths_use_the_direction_norm():
    """Directions need not be unit (the released code passes camera-z-1 directions): t is in units of |d|
    and the length back in the frame's units, so scaling d changes nothing but t."""
    o, d = axis_rays(8, torch.Generator().manual_seed(3))
    u = torch.rand(1, 8, 1, generator=torch.Generator().manual_seed(4))
    depth = torch.full((1, 8, 1), 2.0)
    one = ray_opacity_samples(o, d, depth, BOX, u=u)
    two = ray_opacity_samples(o, 2 * d, depth / 2, BOX, u=u)
    torch.testing.assert_close(two["points"], one["points"])
    torch.testing.assert_close(two["length"], one["length"])
    torch.testing.assert_close(two["t"], one["t"] / 2)


def test_psnr_matches_skimage():
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 16, 16)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    ours = psnr(torch.from_numpy(a), torch.from_numpy(b))
    for i in range(2):
        assert ours[i].item() == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=1.0), rel=1e-5)


def test_weighted_mse_and_depth_loss():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 2.0], [0.0, 1.0]]]])  # zeros = background in depth maps
    assert mse(pred, target).item() == pytest.approx((1 + 0 + 9 + 9) / 4)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert mse(pred, target, mask).item() == pytest.approx((1 + 9) / 2)
    assert depth_loss(pred, target).item() == pytest.approx((0 + 9) / 2)  # only where depth > 0


@pytest.fixture(scope="module")
def lpips_vgg():
    from training.lpips_weights import LpipsWeightsMissing

    try:
        return LPIPSLoss("vgg")
    except LpipsWeightsMissing as e:
        pytest.skip(f"LPIPS weights not fetched (make setup): {e}")


def test_lpips_takes_unit_range_like_lpips_normalize(lpips_vgg):
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    ref = lpips_vgg.net(a, b, normalize=True).mean()  # lpips' own [0,1] -> [-1,1] conversion
    assert lpips_vgg(a, b).item() == pytest.approx(ref.item(), rel=1e-5)
    assert lpips_vgg(a, a).item() == pytest.approx(0.0, abs=1e-6)
    # Similar images score lower than unrelated ones (a real backbone, not a random one).
    noisy = (a + 0.03 * torch.randn_like(a)).clamp(0, 1)
    assert lpips_vgg(a, noisy) < 0.5 * lpips_vgg(a, b)


def test_lpips_resize_and_gradients(lpips_vgg):
    resized = LPIPSLoss.__new__(LPIPSLoss)
    torch.nn.Module.__init__(resized)
    resized.net, resized.size = lpips_vgg.net, 32
    a = torch.rand(1, 3, 64, 64, requires_grad=True)
    b = torch.rand(1, 3, 64, 64)
    v = resized(a, b)
    v.backward()
    assert torch.isfinite(v) and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_vgg.parameters())
    lpips_vgg.train()
    assert not lpips_vgg.net.training  # the metric stays in eval mode

"""Image metrics against closed forms, skimage and the lpips package."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from eval import metrics as M
from training import lpips_weights as lw

HAVE_LPIPS = all(lw.weights_path(n).is_file() for n in lw.NETS)


def _images(seed: int = 0, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A natural image crop and a distorted copy, HWC float64 in [0, 1]."""
    img = data.astronaut()[120:120 + size, 170:170 + size].astype(np.float64) / 255
    rng = np.random.default_rng(seed)
    noisy = np.clip(img + rng.normal(0, 0.05, img.shape) + 0.03, 0, 1)
    return img, noisy


def _t(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)


def test_psnr_closed_forms():
    gt = torch.zeros(3, 3, 8, 8)
    pred = gt.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1, :, :4] = 1.0  # half the pixels off by 1 -> MSE 0.5 -> 10·log10 2
    out = M.psnr(pred, gt)
    assert out[0].item() == pytest.approx(20.0, abs=1e-4)
    assert out[1].item() == pytest.approx(10 * math.log10(2), abs=1e-5)
    assert math.isinf(out[2].item())  # identical
    assert M.mean_finite(out.numpy()) == pytest.approx((20.0 + 10 * math.log10(2)) / 2, abs=1e-4)


def test_psnr_equals_skimage():
    a, b = _images()
    ref = peak_signal_noise_ratio(a, b, data_range=1.0)
    assert M.psnr(_t(b), _t(a)).item() == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("size", [(11, 11), (48, 48), (37, 53)])
def test_ssim_equals_skimage(size):
    img, _ = _images(size=64)
    a = img[:size[0], :size[1]]
    b = np.clip(a + np.random.default_rng(3).normal(0, 0.1, a.shape), 0, 1)
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=1.0, channel_axis=-1)
    got = M.ssim(_t(b), _t(a)).item()
    assert got == pytest.approx(ref, abs=1e-6)  # float32 inside (mean-shifted planes); observed ≤ 2e-7


def test_ssim_batched_and_bounds():
    a, b = _images()
    out = M.ssim(_t(a, b, a), _t(a, a, b))
    assert out[0].item() == pytest.approx(1.0, abs=1e-6)
    assert out[1].item() == pytest.approx(out[2].item(), abs=1e-7)  # symmetric
    assert out[1].item() < 0.95
    with pytest.raises(ValueError, match="at least 11"):
        M.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="one shape"):
        M.ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))



def test_ssim_equals_skimage_on_a_render_with_flat_white_background():
    # Renders are mostly exact white: there E[x²] − E[x]² cancels two numbers near 1, the worst case for
    # float32 filtering; several chunks (chunk_pixels) and a size that is no multiple of the filter block.
    rng = np.random.default_rng(7)
    img, _ = _images(size=64)
    a = np.ones((3, 75, 70, 3))
    a[:, 20:60, 15:55] = img[:40, :40]
    b = a.copy()
    b[:, 20:60, 15:55] = np.clip(a[:, 20:60, 15:55] + rng.normal(0, 0.02, (3, 40, 40, 3)), 0, 1)
    b[1, :5] = 0.999  # a faint difference inside the white
    ref = [structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=-1) for x, y in zip(b, a)]
    got = M.ssim(_t(*b), _t(*a), chunk_pixels=75 * 70)  # one image per chunk
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)

def test_composite_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # transparent -> white
    rgba[1, 0] = (0, 0, 0, 51)  # 20 % black over white -> 0.8
    out = M.composite_on_white(rgba)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out[0, 0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out[0, 1], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(out[1, 0], [0.8, 0.8, 0.8], atol=1e-6)


@pytest.mark.skipif(not HAVE_LPIPS, reason="run `python -m training.lpips_weights fetch` first")
def test_lpips_equals_lpips_package():
    """Batched, chunked, [0,1] -> [-1,1] inside: equal to the lpips package called per image on [-1,1]."""
    import lpips

    torch.set_num_threads(2)
    a, b = _images(size=64)
    c = np.clip(a[::-1].copy() * 0.9, 0, 1)
    pred, gt = _t(b, c, a).float(), _t(a, a, a).float()
    metric = M.Lpips(chunk=2)
    for net in ("alex", "vgg"):
        ref_model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        trunk, _ = lw.find_trunk(net)
        ref_model.net.load_state_dict({_lpips_key(ref_model, k): v for k, v in trunk.items()})
        ref = torch.stack([ref_model(p[None] * 2 - 1, g[None] * 2 - 1).flatten()[0] for p, g in zip(pred, gt)])
        got = metric(pred, gt, net)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert got[2].item() == pytest.approx(0.0, abs=1e-7)
        assert got[1].item() > got[0].item() > 0.01  # flipped image is further than a noisy one


def _lpips_key(model: torch.nn.Module, tv_key: str) -> str:
    """torchvision `features.<i>.<p>` -> lpips' `slice<s>.<i>.<p>` (lpips keeps each module's index)."""
    _, idx, pname = tv_key.split(".")
    for slice_name, sl in model.net.named_children():
        if idx in dict(sl.named_children()):
            return f"{slice_name}.{idx}.{pname}"
    raise KeyError(tv_key)


@pytest.mark.skipif(not HAVE_LPIPS, reason="run `python -m training.lpips_weights fetch` first")
def test_image_metrics_keys():
    a, b = _images(size=32)
    out = M.image_metrics(_t(a, b).float(), _t(b, b).float(), M.Lpips())
    assert set(out) == {"psnr", "ssim", "lpips_vgg", "lpips_alex"}
    assert all(v.shape == (2,) for v in out.values())

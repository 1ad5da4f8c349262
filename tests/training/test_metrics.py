"""training/metrics.py: the one PSNR against closed forms and skimage, and its callers agreeing with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.metrics import psnr


def test_closed_forms_and_the_cap():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1, :, :2] = 0.5  # half the pixels off by 0.5: MSE 0.125 -> 10·log10(8)
    got = psnr(b, a)
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert got[0].item() == pytest.approx(20.0, abs=1e-4)
    assert got[1].item() == pytest.approx(10 * math.log10(8), abs=1e-4)
    assert psnr(b * 255, a * 255, data_range=255.0)[0].item() == pytest.approx(20.0, abs=1e-4)
    # identical images: 100 dB by default (finite training curves), +inf uncapped (evaluation)
    assert psnr(a, a).tolist() == [100.0, 100.0]
    assert psnr(a, a, max_db=None).isinf().all()
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:1])


def test_matches_skimage_in_float64_where_float32_would_drift():
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 64, 64))
    y = np.clip(x + rng.normal(0, 1e-4, x.shape), 0, 1)  # ~80 dB: float32 MSE would lose digits
    got = psnr(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    for i in range(3):
        ref = peak_signal_noise_ratio(x[i].astype(np.float32).astype(np.float64),
                                      y[i].astype(np.float32).astype(np.float64), data_range=1.0)
        assert got[i].item() == pytest.approx(ref, abs=1e-3)


def test_callers_use_it():
    from bench.render import psnr as bench_psnr
    from eval.metrics import psnr as eval_psnr
    from training.losses import psnr as loss_psnr
    from training.refine import psnr as refine_psnr

    rng = np.random.default_rng(1)
    x, y = rng.random((2, 3, 8, 8)), rng.random((2, 3, 8, 8))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert loss_psnr is psnr
    assert torch.equal(eval_psnr(tx.float(), ty.float()), psnr(tx.float(), ty.float(), max_db=None))
    whole = -10 * math.log10(np.mean((x - y) ** 2))  # refine: one MSE over every view
    assert refine_psnr(tx, ty) == pytest.approx(whole, abs=1e-5)  # float32 result
    assert bench_psnr(x[0].transpose(1, 2, 0), y[0].transpose(1, 2, 0)) == pytest.approx(
        -10 * math.log10(np.mean((x[0] - y[0]) ** 2)), abs=1e-5)
    assert math.isinf(refine_psnr(tx, tx)) and math.isinf(bench_psnr(x[0], x[0]))

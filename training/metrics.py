"""The one PSNR of the toolkit: training logs, texture refinement, benchmarks and evaluation all call it."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0, max_db: float | None = 100.0) -> Tensor:
    """Per image 10·log10(range² / MSE) over all pixels and channels: [N, ...] -> [N] float32.

    Computed in float64 (a float32 MSE of near-identical images loses the digits PSNR is about).
    Identical images: `max_db` caps the value (default 100 dB, i.e. an MSE floor of 1e-10 at range 1) so
    training curves and means stay finite; `max_db=None` gives +inf, which evaluation keeps (the paper's
    protocol scores images; eval.metrics.mean_finite averages the finite ones).
    """
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    err = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    db = 10.0 * torch.log10(data_range ** 2 / err)
    if max_db is not None:
        db = db.clamp(max=max_db)
    return db.float()

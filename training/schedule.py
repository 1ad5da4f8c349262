"""The learning-rate schedule of the toolkit: linear warm-up, then cosine to 0 (both training stages and
texture refinement use it)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak LR before optimisation step `step` (0-based): linear warm-up over `warmup`
    steps, then half a cosine from 1 at the end of warm-up to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))

"""Quality flags for a rendered asset: empty, tiny in frame, cut off at the border, all black or all white.

Works on the decoded views (no Blender), so it can also re-check a render folder later. Thresholds are
fields of RenderConfig. A flagged asset is still rendered (status ok); the shard stage leaves it out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLAGS = ("empty", "tiny", "cut_off", "too_dark", "too_bright")

# Rec. 709 luma weights on the sRGB-encoded values: "all black / all white" is about what a person sees.
_LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)


def assess(rgb: np.ndarray, alpha: np.ndarray, cfg: Any) -> dict[str, Any]:
    """Flag an asset from its views.

    rgb: [V,H,W,3] straight (not premultiplied) colour in [0,1]; alpha: [V,H,W] in [0,1].
    cfg: anything with min_foreground, max_border_fraction, dark_threshold, bright_threshold (RenderConfig).
    Returns {"ok": bool, "flags": [str], "stats": {...}}.
    """
    rgb = np.asarray(rgb, np.float32)
    alpha = np.asarray(alpha, np.float32)
    assert rgb.ndim == 4 and rgb.shape[-1] == 3 and alpha.shape == rgb.shape[:3], (rgb.shape, alpha.shape)
    fg = alpha > 0.5
    fg_fraction = fg.mean(axis=(1, 2))  # [V]
    border = np.concatenate([fg[:, 0, :], fg[:, -1, :], fg[:, 1:-1, 0], fg[:, 1:-1, -1]], axis=1)
    border_fraction = border.mean(axis=1)  # [V]
    w = alpha[..., None]
    lum = float((rgb * w).reshape(-1, 3).sum(0) @ _LUMA / max(float(alpha.sum()), 1e-6))
    flags = []
    if not fg.any():
        flags.append("empty")
    else:
        if float(fg_fraction.mean()) < cfg.min_foreground:
            flags.append("tiny")
        if float(border_fraction.max()) > cfg.max_border_fraction:
            flags.append("cut_off")
        if lum < cfg.dark_threshold:
            flags.append("too_dark")
        if lum > cfg.bright_threshold:
            flags.append("too_bright")
    stats = {"foreground_mean": float(fg_fraction.mean()), "foreground_min": float(fg_fraction.min()),
             "border_max": float(border_fraction.max()), "luminance": lum}
    return {"ok": not flags, "flags": flags, "stats": stats}

"""Test helper: closed-form ground truth for the model tests, no renderer involved."""

from __future__ import annotations

import numpy as np


def sphere_mask(c2w: np.ndarray, K: np.ndarray, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """[size, size] float32: 1 where the ray through the pixel centre (OpenCV c2w / K, centres at +0.5) hits
    the sphere, by the ray-sphere discriminant."""
    v, u = np.mgrid[0:size, 0:size] + 0.5
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ np.asarray(c2w)[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    oc = np.asarray(c2w)[:3, 3] - centre
    b = (d * oc).sum(-1)
    return ((b * b - (oc @ oc - radius**2)) > 0).astype(np.float32)

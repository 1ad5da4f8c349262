"""render/quality.py on synthetic views whose verdict is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import RenderConfig
from render.quality import assess

H = 64


def views(alpha_fn, color=(0.5, 0.5, 0.5), v: int = 3) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.zeros((v, H, H), np.float32)
    for i in range(v):
        alpha[i] = alpha_fn(i)
    rgb = np.broadcast_to(np.array(color, np.float32), (v, H, H, 3)).copy()
    return rgb, alpha


def square(side: int, offset: int | None = None):
    def fn(_):
        a = np.zeros((H, H), np.float32)
        o = (H - side) // 2 if offset is None else offset
        a[o:o + side, o:o + side] = 1.0
        return a
    return fn


def test_good_object_is_ok():
    rgb, alpha = views(square(32))
    q = assess(rgb, alpha, RenderConfig())
    assert q["ok"] and q["flags"] == []
    assert q["stats"]["foreground_mean"] == pytest.approx(32 * 32 / H**2)
    assert q["stats"]["luminance"] == pytest.approx(0.5, abs=1e-6)


def test_empty():
    rgb, alpha = views(lambda _: np.zeros((H, H)))
    assert assess(rgb, alpha, RenderConfig())["flags"] == ["empty"]


def test_tiny_by_threshold():
    rgb, alpha = views(square(4))  # 16 / 4096 = 0.0039 of the frame
    assert "tiny" in assess(rgb, alpha, RenderConfig(min_foreground=0.005))["flags"]
    assert "tiny" not in assess(rgb, alpha, RenderConfig(min_foreground=0.003))["flags"]


def test_cut_off_at_border():
    rgb, alpha = views(square(40, offset=0))  # touches the top and left border: 79 of 252 border pixels
    q = assess(rgb, alpha, RenderConfig(max_border_fraction=0.02))
    assert q["flags"] == ["cut_off"]
    assert q["stats"]["border_max"] == pytest.approx(79 / (4 * H - 4))
    assert "cut_off" not in assess(rgb, alpha, RenderConfig(max_border_fraction=0.5))["flags"]


@pytest.mark.parametrize("color,flag", [((0.0, 0.0, 0.01), "too_dark"), ((1.0, 1.0, 1.0), "too_bright")])
def test_black_and_white(color, flag):
    rgb, alpha = views(square(32), color=color)
    assert assess(rgb, alpha, RenderConfig())["flags"] == [flag]


def test_background_colour_does_not_count():
    rgb, alpha = views(square(32), color=(0.5, 0.5, 0.5))
    rgb[alpha == 0] = 0.0  # black background under zero alpha must not make the asset "dark"
    assert assess(rgb, alpha, RenderConfig())["ok"]


def test_shape_check():
    with pytest.raises(AssertionError):
        assess(np.zeros((2, H, H, 3)), np.zeros((3, H, H)), RenderConfig())

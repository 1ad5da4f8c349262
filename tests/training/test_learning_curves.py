"""bench.learning_curves / bench.learning_rung1 plumbing on fake render folders (no Blender, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from core.config import ModelConfig
from tests.fake_renders import write_render_folder

TINY = ModelConfig(width=32, depth=1, heads=2, head_dim=16, plane_res=4, upsample=2, plane_channels=8,
                   samples_per_ray=8)


def _folders(tmp_path: Path, n: int) -> list[Path]:
    for i in range(n):
        write_render_folder(tmp_path, f"asset-{i}", views=12, size=32, seed=i)
    return [tmp_path / f"asset-{i}" for i in range(n)]


def test_triplane_spread_is_zero_for_identical_inputs_and_positive_otherwise(tmp_path):
    from bench.learning import load_views, split
    from bench.learning_rung1 import MemoriseSettings, triplane_spread
    from training.model import GTR

    torch.manual_seed(0)
    a, b = (split(load_views(f), held_out=4) for f in _folders(tmp_path, 2))
    model, s = GTR(TINY), MemoriseSettings(input_size=32)
    assert triplane_spread(model, [a, a], s) == pytest.approx(0.0, abs=1e-6)
    assert triplane_spread(model, [a, b], s) > 0.01


def test_memorise_scores_unseen_assets_and_plot_writes_both_panels(tmp_path):
    from bench.learning import HELD_OUT
    from bench.learning_curves import plot
    from bench.learning_rung1 import MemoriseSettings, memorise

    folders = _folders(tmp_path, 3)
    assert HELD_OUT < 12
    s = MemoriseSettings(steps=4, eval_every=2, batch=2, rays=64, input_size=32, eval_size=16, eval_views=2)
    curve = memorise(folders[:2], s, TINY, held_assets=folders[2:])
    assert [p["step"] for p in curve] == [2, 4]
    for p in curve:
        assert 0 < p["psnr"] < 60 and 0 < p["held_psnr"] < 60 and 0 <= p["held_iou"] <= 1 and p["spread"] >= 0
    png = plot(tmp_path / "c.png", [("steps", [2, 4], {"PSNR": [p["held_psnr"] for p in curve]}),
                                    ("assets", [1, 2, 4], {"PSNR": [1.0, 2.0, 3.0], "IoU": [0.1, 0.2, 0.3]})])
    img = Image.open(png)
    assert img.size == (840, 300) and img.convert("L").getextrema()[0] < 128  # two panels, something drawn

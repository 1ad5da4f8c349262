"""Shared inputs of the loader tests: fake render folders (tests/fake_renders.py) packed into shards by
pipelines.shards, and the numpy reference for straight-alpha compositing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.config import Config
from core.layout import shard_urls
from training.data.stream import make_loader

UIDS = [f"asset{i:02d}" for i in range(9)]
SIZE, VIEWS = 32, 6


def cfg_for(out: Path) -> Config:
    cfg = Config(out=str(out))
    cfg.shards.val_fraction = 0.0
    cfg.shards.max_count = 2  # 9 assets -> 5 shards, enough for 2 nodes x 2 workers
    cfg.loader.input_views, cfg.loader.input_size = 2, SIZE
    cfg.loader.shuffle_buffer = 4
    cfg.nerf.sup_views, cfg.nerf.render_size, cfg.nerf.patch_size = 2, SIZE, 0
    cfg.mesh.sup_views, cfg.mesh.render_size = 3, SIZE
    return cfg


def composite(rgba: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[H,W,4] u8 -> rgb [3,H,W], alpha [1,H,W] in float64 (the reference for straight-alpha compositing)."""
    a = rgba[..., 3:].astype(np.float64) / 255.0
    rgb = rgba[..., :3].astype(np.float64) / 255.0 * a + bg.astype(np.float64) * (1.0 - a)
    return rgb.transpose(2, 0, 1), a.transpose(2, 0, 1)


def epoch(cfg: Config, stage: str = "mesh", **kw):
    """A finite pass (resampled=False) over the shards: (loader, its batches)."""
    loader = make_loader(cfg, shard_urls(cfg.out), stage, resampled=False, **kw)
    return loader, list(loader)

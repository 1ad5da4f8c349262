"""The learning ladder, rung 0: a triplane and f_d / f_c fitted directly to one asset's Blender renders
reproduce its held-out views through both renderers (volume, and mesh at the agreeing level).

The reference is Blender's pixels of views the fit never saw. Floors are what was measured on the shared
2-core machine with a margin (FLOORS; docs/training.md, "The learning ladder"), not today's output. The
issue's volume floor of 32 dB needs 128² planes and 48 samples (`bench.learning.FLOOR_FIT`, the benchmark's
rows: box 32.56 dB, duck 35.82 dB), four times this test's cost; the mesh floor (28 dB) and IoU (0.98) are
the issue's. A 300-step fit takes 35–40 s on 2 quiet cores, renders aside.
"""

from __future__ import annotations

import time

import pytest

STEPS = 300
# asset: (volume dB, mesh dB, volume IoU, mesh IoU). Measured 2026-12-02 after the rasterizer twin's
# antialiasing found the silhouette (docs/mesh.md): box volume 29.31 dB / IoU 0.989, mesh at the agreeing level
# (19.95, grid 96) 30.30 / 0.989; duck volume 34.24 / 0.988, mesh (8.91) 31.11 / 0.980 (28.70 / 0.971 with the
# old twin). The duck's mesh IoU floor is the measured one with a margin, below the 0.98: the agreeing
# level is a little high on its soft field (docs/training.md, rung 0), a known gap kept visible.
FLOORS = {
    "procedural-0000": (28.0, 28.0, 0.98, 0.98),
    "pybullet-duck": (32.0, 29.5, 0.98, 0.975),
}


@pytest.fixture(scope="module")
def rung0_folders(tmp_path_factory) -> dict:
    pytest.importorskip("bpy")
    from bench.learning import rung0_config, rung0_jobs
    from core.config import load_config

    out = tmp_path_factory.mktemp("rung0")
    cfg = rung0_config(load_config("configs/demo.yaml", [f"out={out}"]))
    return {uid: (job, cfg, out) for uid, job in rung0_jobs(out / "assets").items()}


@pytest.mark.slow
@pytest.mark.blender
@pytest.mark.parametrize("uid", sorted(FLOORS))
def test_rung0_direct_fit_reproduces_held_out_views(rung0_folders, uid: str) -> None:
    import torch

    from bench.learning import (
        FitSettings,
        agreeing_level,
        fit_direct,
        load_views,
        render_job,
        score_mesh,
        score_volume,
        split,
    )
    from bench.learning_assets import MISSING

    if uid not in rung0_folders:
        pytest.skip(MISSING)
    job, cfg, out = rung0_folders[uid]
    torch.set_num_threads(2)
    train, held = split(load_views(render_job(cfg, job, out / "renders" / uid)))
    t0 = time.perf_counter()
    fit = fit_direct(train, FitSettings(steps=STEPS))
    vol = score_volume(fit, held)
    level = agreeing_level(fit, train.take([0, 6, 12, 18]))
    mesh = score_mesh(fit, held, level, grid=96)
    print(f"{uid}: fit {fit.seconds:.0f} s, all {time.perf_counter() - t0:.0f} s; volume {vol['psnr']:.2f} dB "
          f"IoU {vol['iou']:.4f}; mesh at level {level:.1f}: {mesh['psnr']:.2f} dB IoU {mesh['iou']:.4f}")
    v_db, m_db, v_iou, m_iou = FLOORS[uid]
    assert vol["psnr"] >= v_db and vol["iou"] >= v_iou, (vol["psnr"], vol["iou"])
    assert mesh["psnr"] >= m_db and mesh["iou"] >= m_iou, (level, mesh["psnr"], mesh["iou"])

"""`make train-nerf` end to end on real data: procedural assets → Blender renders → shards → training."""

from __future__ import annotations

import pytest

from core import manifest
from core.config import Config


def build_shards(cfg: Config, assets: int) -> dict:
    """The real stages at tiny sizes: procedural .glb → `render.blender.render_asset` → `pipelines.shards.pack`."""
    from core.cameras import random_views
    from pipelines.procedural.basic import make_procedural_asset
    from pipelines.shards import pack
    from render import blender as rb

    out = cfg.out_path
    rows = []
    for i in range(assets):
        info = make_procedural_asset(i, out / "assets" / f"proc{i}.glb", 64)
        uid = info["uid"]
        c2w = random_views(uid, cfg.render.views, (cfg.render.distance_min, cfg.render.distance_max))["c2w"]
        job = {"uid": uid, "path": info["path"], "format": "glb", "source": "procedural",
               "license": info["license"], "attribution": info["attribution"], "name": info["name"]}
        row = rb.render_asset(job, out / "renders" / uid, cfg.render, {"": c2w}, threads=2)
        assert row["status"] == "ok", row
        rows.append(row)
    manifest.write_rows(manifest.manifest_path(out, "render"), rows)
    return pack(cfg, executor="local")


# The demo config as it is (model, optimiser, loss weights, 4 assets x 1 whole 32² supervision view), on 3
# assets rendered at 64² (inputs 64²), for STEPS steps. The reference is independent of the trainer: the
# untrained model on the same fixed batch of whole training views. Measured on the shared 2-core machine
# (docs/training.md, "The demo"): 12.90 dB before, 19.98 dB after 75 steps, 20.72 dB after 150; the test took
# 3 min 04 s in all (Blender renders included) while another training run shared the cores. The bar, +5 dB,
# leaves room for seeds and thread timing; the untrained model stays below 13 dB.
STEPS = 150
TEST_ARGS = ["render.resolution=64", "render.views=12", "render.samples=4", "loader.input_size=64",
             f"nerf.steps={STEPS}", "nerf.log_every=10", f"nerf.image_every={STEPS // 2}",
             f"nerf.ckpt_every={STEPS // 2}", "shards.val_fraction=0.0"]


@pytest.mark.slow
@pytest.mark.blender
def test_demo_training_raises_training_view_psnr(tmp_path):
    pytest.importorskip("bpy")
    import torch

    from core.config import load_config
    from training import train_nerf
    from training.model import GTR
    from training.nerf_objective import NerfObjective

    torch.set_num_threads(2)
    cfg = load_config("configs/demo.yaml", [f"out={tmp_path}", *TEST_ARGS])
    build_shards(cfg, 3)
    # PSNR of the untrained model on the fixed validation batch (= training assets here, whole views).
    val = train_nerf.fixed_val_batch(cfg, str(tmp_path / "shards" / "train-*.tar"))
    torch.manual_seed(cfg.seed)
    before = NerfObjective(GTR(cfg.model), cfg.nerf).eval().validate(val)["psnr"]
    result = train_nerf.run(cfg)
    after = result.val[cfg.nerf.steps]["psnr"]
    print(f"training-view PSNR: {before:.2f} dB before, {result.val} after {cfg.nerf.steps} steps")
    assert result.step == cfg.nerf.steps and result.skipped == 0
    assert after > before + 5.0, (before, result.val)
    run_dir = tmp_path / "runs" / "nerf"
    assert (run_dir / "config.yaml").is_file() and (run_dir / f"images/step-{cfg.nerf.steps}.png").is_file()
    assert sorted(p.name for p in run_dir.glob("step-*")) == [f"step-{STEPS}", f"step-{STEPS // 2}"]

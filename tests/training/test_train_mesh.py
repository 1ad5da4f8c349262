"""`make train-mesh` on real data: a procedural asset → Blender renders → shards → a stage-1 checkpoint →
mesh-stage training lowers the mesh loss; an all-empty mesh step is counted and does not crash. The
empty-step loss reaches every trainable parameter (what DDP needs), checked by autograd directly. And a run
of 2 loader workers stopped and rerun continues exactly where the uninterrupted run would be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core import manifest
from core.cameras import intrinsics, look_at, spherical_position
from core.config import Config, load_config


def _cfg(out: Path, *extra: str) -> Config:
    return load_config(None, [f"out={out}", "render.resolution=32", "render.views=12", "render.samples=4",
                              "loader.input_size=32", "loader.shuffle_buffer=1", "shards.val_fraction=0.0",
                              "mesh.render_size=32", "mesh.sup_views=8", "mesh.grid=32", "mesh.lpips_weight=0",
                              "mesh.reg_rays=512", "mesh.lr=0.002", "mesh.steps=6", "mesh.ckpt_every=3",
                              "mesh.log_every=3", "mesh.image_every=6", *extra])


def _shards(cfg: Config) -> None:
    from core.cameras import random_views
    from pipelines.procedural.basic import make_procedural_asset
    from pipelines.shards import pack
    from render import blender as rb

    pytest.importorskip("bpy")
    out = cfg.out_path
    info = make_procedural_asset(0, out / "assets" / "proc0.glb", 64)
    uid = info["uid"]
    c2w = random_views(uid, cfg.render.views)["c2w"]
    job = {"uid": uid, "path": info["path"], "format": "glb", "source": "procedural",
           "license": info["license"], "attribution": info["attribution"], "name": info["name"]}
    row = rb.render_asset(job, out / "renders" / uid, cfg.render, {"": c2w}, threads=2)
    assert row["status"] == "ok", row
    manifest.write_rows(manifest.manifest_path(out, "render"), [row])
    pack(cfg, executor="local")


def _stage1_checkpoint(cfg: Config) -> Path:
    """A stage-1 stand-in: the tiny GTR fitted so that f_d crosses the level (a ball of radius 0.3), saved
    with the trainer's own checkpoint writer under OUT/runs/nerf."""
    from training.checkpoint import TrainState, rng_state, save_checkpoint
    from training.data.stream import make_loader
    from training.model import GTR

    torch.manual_seed(0)
    model = GTR(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = make_loader(cfg, str(cfg.out_path / "shards" / "train-*.tar"), "mesh", batch_size=1, resampled=True,
                         epoch_samples=1000, workers=0)
    batches = iter(loader)
    for _ in range(60):
        b = next(batches)
        planes = model.triplane(torch.cat([b["input_rgb"], b["input_mask"]], 2), b["input_c2w"], b["input_K"])
        p = (torch.rand(1, 4096, 3) * 2 - 1) * 0.55
        target = 10.0 + 40.0 * (0.3 - p.norm(dim=-1, keepdim=True))
        dens, _ = model.query(planes, p)
        loss = ((dens - target.clamp(min=0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(cfg.out_path / "runs" / "nerf", TrainState(step=60, position=60), model, opt, sched,
                           [rng_state()])


def _fixed_loss(objective, batch: dict) -> float:
    torch.manual_seed(123)  # the regulariser's ray draw
    with torch.no_grad():
        outs, planes = objective.render(batch)
        loss, _ = objective.losses(batch, outs, planes)
    return float(loss)


@pytest.mark.slow
@pytest.mark.blender
def test_mesh_stage_lowers_loss_and_handles_empty_meshes(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    from training.checkpoint import latest_checkpoint, load_weights
    from training.data.stream import make_loader
    from training.mesh_objective import MeshObjective
    from training.model import GTR
    from training.train_mesh import run

    cfg = _cfg(tmp_path)
    _shards(cfg)
    _stage1_checkpoint(cfg)
    val = next(iter(make_loader(cfg, str(tmp_path / "shards" / "train-*.tar"), "mesh", batch_size=1,
                                resampled=False, workers=0, seed=7)))
    start = GTR(cfg.model)
    load_weights(tmp_path / "runs" / "nerf", start)
    before = _fixed_loss(MeshObjective(start, cfg.mesh), val)

    result = run(cfg)
    assert result.step == 6 and result.skipped == 0
    ckpt = latest_checkpoint(tmp_path / "runs" / "mesh")
    assert ckpt is not None and ckpt.name == "step-6"
    # What the run logged: the step losses it returned (mesh.log_every=3), validation at the last step
    # (mesh.image_every=6) with its picture sheet, read back from TensorBoard's event file.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "mesh" / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == [3, 6] and all(abs(logged[k] - result.losses[k]) < 1e-5 for k in logged), logged
    assert [e.step for e in acc.Scalars("val/psnr")] == [6] and acc.Scalars("val/psnr")[0].value == pytest.approx(
        result.val[6]["psnr"], abs=1e-4)
    assert (tmp_path / "runs" / "mesh" / "images" / "step-6.png").is_file()
    trained = GTR(cfg.model)
    load_weights(ckpt, trained)
    after = _fixed_loss(MeshObjective(trained, cfg.mesh), val)
    assert after < 0.9 * before, (before, after)

    # A level no density reaches: every mesh is empty; the step is counted, nothing crashes or is skipped.
    cfg_empty = _cfg(tmp_path / "empty", "mesh.level_mode=fixed", "mesh.sdf_level=1000000.0", "mesh.steps=2", "mesh.ckpt_every=2",
                     f"mesh.init={ckpt}", f"mesh.shards={tmp_path / 'shards' / 'train-*.tar'}")
    model = GTR(cfg_empty.model)
    load_weights(ckpt, model)
    objective = MeshObjective(model, cfg_empty.mesh)
    res = run(cfg_empty, objective=objective)
    assert res.step == 2 and res.skipped == 0
    assert objective.empty_total >= 2


def test_all_empty_step_gives_every_trainable_parameter_a_zero_grad() -> None:
    """DDP without find_unused_parameters raises on the step after one where a parameter got no gradient; an
    all-empty mesh step must therefore still reach f_d and f_c (and everything else that trains)."""
    from training.mesh_objective import MeshObjective
    from training.model import GTR

    torch.manual_seed(0)
    cfg = Config()
    model = GTR(cfg.model)
    objective = MeshObjective(model, cfg.mesh, lpips=torch.nn.Identity())
    B, V, S = 2, 2, 32
    images = torch.rand(B, V, 4, S, S)
    c2w = torch.from_numpy(np.stack([look_at(spherical_position(90.0 * i, 20.0, 2.6)) for i in range(V)]))
    K = torch.from_numpy(intrinsics(40.0, S))
    planes = model.triplane(images, c2w.expand(B, V, 4, 4), K.expand(B, V, 3, 3))
    loss, terms = objective.losses({}, [None] * B, planes)
    assert loss.item() == 0.0 and terms["empty_meshes"].item() == B
    loss.backward()
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert any("density" in n or "f_d" in n for n, _ in trainable)  # the decoders are among them
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    assert all(torch.count_nonzero(p.grad) == 0 for _, p in trainable)


# A tiny GTR and mesh stage on fake 32² renders: each step takes well under a second on one CPU core.
TINY = ["model.width=32", "model.heads=2", "model.head_dim=16", "model.depth=1", "model.plane_res=4",
        "model.upsample=2", "model.plane_channels=4", "model.mlp_hidden=16", "loader.input_size=32",
        "loader.input_views=2", "loader.shuffle_buffer=1", "shards.val_fraction=0.0", "shards.max_count=2",
        "mesh.batch_size=1", "mesh.sup_views=2", "mesh.render_size=16", "mesh.grid=16", "mesh.lpips_weight=0",
        "mesh.reg_rays=64", "mesh.lr=0.001", "mesh.steps=7", "mesh.ckpt_every=100", "mesh.log_every=100",
        "mesh.image_every=100", "mesh.val_assets=1",
        # the fresh model's density lies in ~[0.02, 0.16]: a level inside it gives every asset a surface
        "mesh.level_mode=fixed", "mesh.sdf_level=0.09"]


def test_resume_of_a_2_worker_run_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    """loader.workers=2: each worker streams its own epoch of `epoch_samples`, so an epoch is 2x the
    per-worker batch count. A run stopped at step 3 (inside epoch 0) and rerun must read epoch 0's fourth
    batch next, as the straight run does; the per-step losses after the resume must be the straight run's
    (same seed, bitwise here; 1e-6 is the resume contract)."""
    from pipelines.shards import pack
    from tests.fake_renders import write_renders
    from training.checkpoint import TrainState, latest_checkpoint, rng_state, save_checkpoint
    from training.model import GTR
    from training.train_mesh import run

    torch.set_num_threads(1)
    data = tmp_path / "data"
    write_renders(data, [f"asset{i}" for i in range(6)], views=6, size=32)
    pack(load_config(None, [f"out={data}", *TINY]), executor="local")
    torch.manual_seed(0)
    init_cfg = load_config(None, TINY)
    model = GTR(init_cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stage1 = save_checkpoint(data / "runs" / "nerf", TrainState(step=1), model, opt,
                             torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), [rng_state()])

    def cfg(out: Path) -> Config:
        # 2 workers x 2 batches of one sample: epochs of 4 batches; 7 steps = epoch 0, epoch 1, one of epoch 2
        return load_config(None, [f"out={out}", *TINY, "loader.workers=2", "loader.epoch_samples=2",
                                  f"mesh.init={stage1}", f"mesh.shards={data / 'shards' / 'train-*.tar'}"])

    straight = run(cfg(tmp_path / "a"))
    assert straight.step == 7 and sorted(straight.losses) == list(range(1, 8))
    first = run(cfg(tmp_path / "b"), stop_at=3)
    assert first.step == 3 and latest_checkpoint(tmp_path / "b" / "runs" / "mesh").name == "step-3"
    for step in (1, 2, 3):
        assert abs(first.losses[step] - straight.losses[step]) <= 1e-6, step
    resumed = run(cfg(tmp_path / "b"))
    assert resumed.resumed_from is not None and sorted(resumed.losses) == [4, 5, 6, 7]
    # the losses tell the batches apart: a resume at the wrong place would not match
    assert len({round(v, 6) for v in straight.losses.values()}) == 7, straight.losses
    for step in range(4, 8):
        assert abs(resumed.losses[step] - straight.losses[step]) <= 1e-6, (step, resumed.losses, straight.losses)


def test_the_stage1_checkpoint_it_starts_from_is_printed(tmp_path: Path, capsys) -> None:
    """`make train-mesh` says which stage-1 checkpoint it loads (the newest of OUT/runs/nerf, or mesh.init),
    and that it resumes its own run instead once that has a checkpoint."""
    from training.checkpoint import TrainState, rng_state, save_checkpoint
    from training.model import GTR
    from training.train_mesh import init_weights

    cfg = load_config(None, [f"out={tmp_path}"])
    model = GTR(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (10, 20):
        save_checkpoint(tmp_path / "runs" / "nerf", TrainState(step=step), model, opt, sched, [rng_state()])
    assert init_weights(cfg, GTR(cfg.model), tmp_path / "runs" / "mesh") == tmp_path / "runs" / "nerf" / "step-20"
    assert f"starting from stage-1 checkpoint {tmp_path / 'runs' / 'nerf' / 'step-20'}" in capsys.readouterr().out
    cfg.mesh.init = str(tmp_path / "runs" / "nerf" / "step-10")
    init_weights(cfg, GTR(cfg.model), tmp_path / "runs" / "mesh")
    assert f"stage-1 checkpoint {tmp_path / 'runs' / 'nerf' / 'step-10'}" in capsys.readouterr().out
    save_checkpoint(tmp_path / "runs" / "mesh", TrainState(step=5), model, opt, sched, [rng_state()])
    assert init_weights(cfg, GTR(cfg.model), tmp_path / "runs" / "mesh") is None
    assert f"resuming {tmp_path / 'runs' / 'mesh' / 'step-5'}" in capsys.readouterr().out

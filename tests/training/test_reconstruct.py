"""Tests for training/reconstruct.py: the API on a model with a known surface, the command end to end, and
each bad input (exit code 2 with the problem named)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import Config, load_config, save_config
from training.model import GTR
from training.reconstruct import (
    CheckpointMismatch,
    EmptyMeshError,
    load_model,
    main,
    reconstruct,
)

SMALL = ["loader.input_size=48", "refine.render_size=48", "mesh.grid=24", "refine.texture_size=64",
         "refine.steps=6", "mesh.level_mode=fixed"]  # the analytic sphere below is the level-10 set


class SphereGTR(GTR):
    """A real GTR whose density is replaced by an analytic sphere of radius 0.35 (colour stays f_c on the
    triplane), so the mesh is known in closed form and the texture path is the real one."""

    def query(self, planes, points):
        _, rgb = super().query(planes, points)
        density = 10.0 + 40.0 * (0.35 - points.norm(dim=-1, keepdim=True))  # level 10 at |p| = 0.35
        return density, rgb


def _fresh(model_cls=GTR, overrides=()) -> tuple[GTR, Config]:
    cfg = load_config(None, SMALL + list(overrides))
    torch.manual_seed(0)
    model = model_cls(cfg.model).eval()
    for layer in model.color_mlp.layers:  # He init: a default-init f_c is flat (see test_refine.py)
        torch.nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
        torch.nn.init.zeros_(layer.bias)
    return model, cfg


def _views(size: int = 48):
    """4 eval-layout views of a two-coloured sphere (left half red, right half blue) with its mask."""
    import trimesh

    from training.ops.raster import make_rasterizer
    from training.recon_inputs import eval4_cameras
    from training.refine import rasterize_surface

    m = trimesh.creation.icosphere(subdivisions=4, radius=0.35)
    c2w, K = (torch.tensor(a) for a in eval4_cameras(size))
    surf = rasterize_surface(make_rasterizer("torch"), torch.tensor(m.vertices, dtype=torch.float32),
                             torch.tensor(m.faces), c2w, K, size, size)
    rgb = torch.ones(4, size, size, 3)
    red = surf.points[..., 1] > 0
    rgb[surf.hit & red] = torch.tensor([0.9, 0.1, 0.1])
    rgb[surf.hit & ~red] = torch.tensor([0.1, 0.2, 0.9])
    mask = surf.hit.float()
    return torch.cat([rgb.permute(0, 3, 1, 2), mask[:, None]], 1), c2w, K


def test_api_feedforward_and_refined_on_a_known_surface():
    torch.set_num_threads(2)
    model, cfg = _fresh(SphereGTR)
    images, c2w, K = _views()
    ff = reconstruct(model, images, c2w, K, cfg, refine=False)
    # The mesh is the analytic sphere: every vertex at radius 0.35 (grid 24 over 1.1: cell 0.048).
    r = ff.verts.norm(dim=-1)
    assert abs(r.mean().item() - 0.35) < 0.01 and (r - 0.35).abs().max() < 0.03
    assert ff.psnr_before == ff.psnr_after and set(ff.timings) == {"triplane", "mesh", "refine"}
    ref = reconstruct(model, images, c2w, K, cfg, refine=True)
    assert ref.psnr_after > ref.psnr_before + 1.0, (ref.psnr_before, ref.psnr_after)
    assert abs(ref.psnr_before - ff.psnr_before) < 1e-4  # same feed-forward start
    # Colours exported come from the refined planes and f_c: the refined render equals the colour function
    # evaluated at the surface points of the render.
    col = ref.color_fn(model)(np.array([[0.0, 0.35, 0.0], [0.0, -0.35, 0.0]], np.float32))
    assert col.shape == (2, 3) and np.isfinite(col).all()
    t = reconstruct(model, images, c2w, K, cfg, refine=True, tune="triplane")
    assert t.refine is not None and t.refine.color_mlp is not model.color_mlp


def test_empty_field_is_a_clear_error():
    model, cfg = _fresh()  # a fresh model's density (softplus of ~0) never reaches level 10
    images, c2w, K = _views()
    with pytest.raises(EmptyMeshError, match="no surface at level 10"):
        reconstruct(model, images, c2w, K, cfg, refine=False)


def _save_run(tmp_path, overrides=()) -> tuple:
    """A run folder with one step checkpoint of a fresh demo model and its config.yaml."""
    from training.checkpoint import TrainState, rng_state, save_checkpoint

    model, cfg = _fresh(GTR, overrides)
    run = tmp_path / "runs" / "mesh"
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(run, TrainState(step=3), model, opt, sched, [rng_state()])
    save_config(cfg, run / "config.yaml")
    return run, cfg


def _input_folder(tmp_path, n=4, size=48):
    folder = tmp_path / "inputs"
    folder.mkdir()
    images, _, _ = _views(size)
    for i in range(n):
        rgba = images[i].permute(1, 2, 0).numpy()
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
def test_command_end_to_end(tmp_path, capsys, monkeypatch):
    torch.set_num_threads(2)
    # The command builds `training.model.GTR`; the sphere double gives it a known, small surface.
    monkeypatch.setattr("training.model.GTR", SphereGTR)
    run, cfg = _save_run(tmp_path)
    inputs = _input_folder(tmp_path)
    out = tmp_path / "out"
    args = ["--input", str(inputs), "--checkpoint", str(run), "--layout", "eval4", "--output", str(out),
            "--config", "configs/demo.yaml", *SMALL, "refine.vertex_colors=true"]
    assert main(args) == 0
    for name in ("mesh.glb", "mesh_vc.glb", "mesh_texture.png", "turntable.gif", "inputs_sheet.png", "timings.json"):
        assert (out / name).is_file(), name
    t = json.loads((out / "timings.json").read_text())
    assert set(t["seconds"]) == {"triplane", "mesh", "refine", "export"}
    assert t["psnr_input_views"]["after_refinement"] > t["psnr_input_views"]["before_refinement"]
    from training.export import load_glb

    mesh = load_glb(out / "mesh.glb")
    r = np.linalg.norm(mesh.vertices, axis=1)  # the sphere, back in the canonical frame
    assert abs(r.mean() - 0.35) < 0.01 and np.abs(r - 0.35).max() < 0.03
    assert Image.open(out / "turntable.gif").n_frames == 24
    # Rerun: complete output is skipped.
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out


# ---- bad input through the command: exit code 2 and the problem named -------------------------------------


def _run_bad(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_bad_inputs_exit_2(tmp_path, capsys):
    run, _ = _save_run(tmp_path)
    inputs = _input_folder(tmp_path, n=3)
    base = ["--checkpoint", str(run), "--output", str(tmp_path / "o"), *SMALL]
    err = _run_bad(["--input", str(inputs), "--layout", "eval4", *base], capsys)
    assert "needs 4 images" in err and "has 3" in err
    err = _run_bad(["--input", str(inputs), *base], capsys)
    assert "neither cameras.npz" in err
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(inputs / "3.png")  # RGB, no mask
    err = _run_bad(["--input", str(inputs), "--layout", "eval4", *base], capsys)
    assert "3.png has no alpha channel and no mask" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_config(tmp_path, capsys):
    run, _ = _save_run(tmp_path)
    inputs = _input_folder(tmp_path)
    args = ["--input", str(inputs), "--layout", "eval4", "--checkpoint", str(run), "--output", str(tmp_path / "o"),
            *SMALL, "model.width=64"]
    err = _run_bad(args, capsys)
    assert "another model config" in err and "model.width: checkpoint 128, config 64" in err
    # Without the run's config.yaml the weights themselves do not fit: still a clear error.
    (run / "config.yaml").unlink()
    with pytest.raises(CheckpointMismatch, match="does not fit|cannot load"):
        load_model(run, load_config(None, SMALL + ["model.width=64"]))
    # A released checkpoint file with our config; and with the official preset but the wrong sizes.
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[3] / "shared/fixtures/official-gtr-tiny/official_tiny_ckpt.pth"
    if not tiny.is_file():
        tiny = Path("/work/shared/fixtures/official-gtr-tiny/official_tiny_ckpt.pth")
    with pytest.raises(CheckpointMismatch, match="configs/official.yaml"):
        load_model(tiny, load_config(None, SMALL))
    with pytest.raises(CheckpointMismatch, match="does not fit the configured official model"):
        load_model(tiny, load_config("configs/official.yaml", ["model.depth=2", "model.width=64"]))
    with pytest.raises(CheckpointMismatch, match="does not exist"):
        load_model(tmp_path / "nope", load_config(None))
    with pytest.raises(CheckpointMismatch, match="no complete checkpoint"):
        load_model(inputs, load_config(None))

"""Tests for training/reconstruct.py, the command: end to end on a model with a known surface, a checkpoint
of another config, and each bad input (exit code 2 with the problem named)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import load_config, save_config
from tests.training.test_inference import SMALL, SphereGTR, fresh_model, sphere_views
from training.inference import CheckpointMismatch, load_model
from training.model import GTR
from training.reconstruct import main


def _save_run(tmp_path, overrides=()) -> tuple:
    """A run folder with one step checkpoint of a fresh demo model and its config.yaml."""
    from training.checkpoint import TrainState, rng_state, save_checkpoint

    model, cfg = fresh_model(GTR, overrides)
    run = tmp_path / "runs" / "mesh"
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(run, TrainState(step=3), model, opt, sched, [rng_state()])
    save_config(cfg, run / "config.yaml")
    return run, cfg


def _input_folder(tmp_path, n=4, size=48):
    folder = tmp_path / "inputs"
    folder.mkdir()
    images, _, _ = sphere_views(size)
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
    from tests.fixtures import OFFICIAL_TINY

    tiny = OFFICIAL_TINY / "official_tiny_ckpt.pth"
    with pytest.raises(CheckpointMismatch, match="configs/official.yaml"):
        load_model(tiny, load_config(None, SMALL))
    with pytest.raises(CheckpointMismatch, match="does not fit the configured official model"):
        load_model(tiny, load_config("configs/official.yaml", ["model.depth=2", "model.width=64"]))
    with pytest.raises(CheckpointMismatch, match="does not exist"):
        load_model(tmp_path / "nope", load_config(None))
    with pytest.raises(CheckpointMismatch, match="no complete checkpoint"):
        load_model(inputs, load_config(None))

"""Tests for training/reconstruct.py, the command: end to end on a model with a known surface, a checkpoint
of another config, and each bad input (exit code 2 with the problem named)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import load_config, save_config
from tests.node_tools import missing, validate_gltf
from tests.training.test_inference import SMALL, SphereGTR, fresh_model, sphere_views
from training.inference import CheckpointMismatch, load_model
from training.model import GTR
from training.reconstruct import asset_name, main, output_folder


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
    if not missing("gltf-validator"):  # what a viewer gets passes the Khronos validator, texture included
        tex, vc = validate_gltf(out / "mesh.glb", out / "mesh_vc.glb")
        assert tex["errors"] == 0 and vc["errors"] == 0 and tex["hasTextures"], (tex["messages"], vc["messages"])
    # Without --output: OUT/reconstruct/<asset>, the asset's folder name standing in for a generic "inputs"
    chair = tmp_path / "chair"
    chair.mkdir()
    inputs.rename(chair / "inputs")
    named = ["--input", str(chair / "inputs"), *args[2:6], "--out", str(tmp_path / "run"), *args[8:]]
    assert main(named) == 0
    assert (tmp_path / "run" / "reconstruct" / "chair" / "mesh.glb").is_file()
    assert not (tmp_path / "run" / "reconstruct" / "inputs").exists()


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


# ---- where the output goes: named after the asset, never over another reconstruction ---------------------


def test_output_is_named_after_the_asset(tmp_path):
    render = tmp_path / "evalsets" / "procedural-heldout" / "renders_eval" / "procedural-100" / "inputs"
    render.mkdir(parents=True)
    (render / "meta.json").write_text(json.dumps({"uid": "procedural-100"}))
    assert asset_name(render) == "procedural-100"  # the render folder's uid, not "inputs"
    (render / "meta.json").write_text(json.dumps({"uid": "has.dot"}))  # not a uid: named by the path
    assert asset_name(render) == "procedural-100"
    photos = tmp_path / "My Chair (2).v2" / "images"
    photos.mkdir(parents=True)
    assert asset_name(photos) == "My-Chair-2-v2"  # generic "images" -> the parent, made safe (no dots)
    assert asset_name(tmp_path / "teapot") == "teapot"
    assert asset_name(tmp_path / "..." / "inputs") == "reconstruction"


def test_two_reconstructions_never_share_a_folder(tmp_path):
    root = tmp_path / "reconstruct"
    a = {"input": "/x/a/inputs", "checkpoint": "/c/step-3", "layout": None, "refine": True, "tune": "both"}
    b = {**a, "input": "/y/a/inputs"}  # another asset folder with the same name
    c = {**a, "checkpoint": "/c/step-9"}  # the same input, another model
    assert output_folder(root, "a", a) == (root / "a", False)
    (root / "a").mkdir(parents=True)
    (root / "a" / "timings.json").write_text(json.dumps({**a, "seconds": {}}))
    assert output_folder(root, "a", a) == (root / "a", True)  # the same reconstruction: done
    assert output_folder(root, "a", a, force=True) == (root / "a", False)  # --force redoes it in place
    assert output_folder(root, "a", b) == (root / "a-2", False)
    (root / "a-2").mkdir()
    (root / "a-2" / "timings.json").write_text(json.dumps(b))
    assert output_folder(root, "a", c) == (root / "a-3", False)
    assert output_folder(root, "a", b) == (root / "a-2", True)
    (root / "b").mkdir()  # a folder that is not a reconstruction of ours is never taken over
    assert output_folder(root, "b", a) == (root / "b-2", False)

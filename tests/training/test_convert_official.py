"""training/convert_official.py: the released tiny model, converted, reproduces the released code's own
outputs (fixture tests/fixtures/official-gtr-tiny/) through our input builder, generator, sampler and MLPs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from core.config import load_config
from tests.fixtures import OFFICIAL_TINY
from training import cameras
from training.convert_official import (
    ConversionError,
    convert_state_dict,
    load_official,
    main,
    model_config_from_official,
    read_checkpoint,
)
from training.model import GTR

FIXTURE = OFFICIAL_TINY

# float32 rounding: the fixture was computed in float32 by different code (einsum/xformers vs our SDPA,
# other summation orders); differences of a few ulps of O(1) values are expected, nothing more.
ATOL = 1e-5


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "official_tiny_io.safetensors"))


@pytest.fixture(scope="module")
def model() -> GTR:
    cfg = model_config_from_official(json.loads((FIXTURE / "official_tiny_config.json").read_text()))
    return load_official(FIXTURE / "official_tiny_ckpt.pth", cfg).eval()


def _inputs(io):
    rgb = io["cond_imgs"].permute(0, 1, 4, 2, 3)  # [B,V,H,W,3] -> [B,V,3,H,W]
    mask = io["cond_masks"].permute(0, 1, 4, 2, 3)
    K = cameras.intrinsics_from_fxfycxcy(io["cond_intrinsics"])
    return rgb, mask, io["cond_poses"], K


def test_input_builder_reproduces_cond_input(io):
    rgb, mask, c2w, K = _inputs(io)
    x = cameras.build_input(rgb, mask, c2w, K, "rgb_dir_moment_mask")
    torch.testing.assert_close(x, io["cond_input"], atol=ATOL, rtol=0)


def test_generator_reproduces_triplane(io, model):
    rgb, mask, c2w, K = _inputs(io)
    with torch.no_grad():
        planes = model.triplane(torch.cat([rgb, mask], dim=2), c2w, K)  # cameras fed as they are (their frame)
        from_theirs = model.generate(io["cond_input"])
    torch.testing.assert_close(planes, io["triplane"], atol=ATOL, rtol=0)
    torch.testing.assert_close(from_theirs, io["triplane"], atol=ATOL, rtol=0)


def test_sampler_and_mlps_reproduce_density_and_rgb(io, model):
    with torch.no_grad():
        density, rgb = model.query(io["triplane"], io["points"])
    torch.testing.assert_close(density, io["density"], atol=ATOL, rtol=0)
    torch.testing.assert_close(rgb, io["rgb"], atol=ATOL, rtol=0)


def _full_layout() -> dict[str, dict[str, torch.Tensor]]:
    """The released checkpoint's full-size layout as meta tensors (shapes only)."""
    pipeline: dict[str, dict[str, torch.Tensor]] = {"generator": {}, "field": {}}
    lines = (FIXTURE / "official_full_keys.txt").read_text().splitlines()
    for line in lines[1:]:
        key, shape = line.split(" ", 1)
        dims = tuple(int(x) for x in re.findall(r"\d+", shape))
        _, part, rest = key.split(".", 2)
        keys = [rest]
        if ".attn_layers.0." in f".{rest}":
            keys = [rest.replace("attn_layers.0.", f"attn_layers.{i}.") for i in range(24)]
        for k in keys:
            pipeline[part][k] = torch.empty(dims, device="meta")
    return pipeline


def test_full_released_layout_converts_into_the_official_preset():
    pipeline = _full_layout()
    pipeline["field"]["aabb"] = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    header = (FIXTURE / "official_full_keys.txt").read_text().splitlines()[0]
    released = int(re.search(r"(\d+) parameters", header).group(1))
    state = convert_state_dict(pipeline, load_config("configs/official.yaml").model)
    assert sum(v.numel() for v in state.values()) == released


def test_bad_checkpoints_are_refused_with_the_keys_named(model):
    cfg = model.cfg
    good = read_checkpoint(FIXTURE / "official_tiny_ckpt.pth")

    def variant(edit):
        p = {k: dict(v) for k, v in good.items()}
        edit(p)
        return p

    with pytest.raises(ConversionError, match=r"missing.*transformer\.blocks\.1\.attn\.to_q\.weight"):
        convert_state_dict(variant(lambda p: p["generator"].pop("attn_layers.1.self_attn.to_q.weight")), cfg)
    with pytest.raises(ConversionError, match=r"unexpected keys: generator\.extra"):
        convert_state_dict(variant(lambda p: p["generator"].__setitem__("extra", torch.zeros(1))), cfg)
    with pytest.raises(ConversionError, match=r"shape mismatches: generator\.conv_proj\.weight"):
        convert_state_dict(variant(lambda p: p["generator"].__setitem__("conv_proj.weight", torch.zeros(64, 10, 2, 2))), cfg)
    with pytest.raises(ConversionError, match="aabb"):
        convert_state_dict(variant(lambda p: p["field"].__setitem__("aabb", torch.tensor([-2.0] * 3 + [2.0] * 3))), cfg)
    with pytest.raises(ConversionError, match="exactly 'generator' and 'field'"):
        convert_state_dict({"generator": good["generator"]}, cfg)


class Payload:  # any object beyond tensors/containers must be refused, never constructed
    def __reduce__(self):
        return (print, ("constructed!",))


def test_untrusted_pickles_stay_data(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"pipeline": {"generator": Payload(), "field": {}}}, bad)
    with pytest.raises(ConversionError, match="weights-only"):
        read_checkpoint(bad)
    assert "constructed!" not in capsys.readouterr().out
    with pytest.raises(ConversionError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(ConversionError, match="limit"):
        read_checkpoint(FIXTURE / "official_tiny_ckpt.pth", max_bytes=10)
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="'pipeline'"):
        read_checkpoint(tmp_path / "other.pth")


def test_cli_writes_safetensors_that_load_into_the_model(tmp_path, io, model):
    out = tmp_path / "tiny.safetensors"
    rc = main([str(FIXTURE / "official_tiny_ckpt.pth"), str(out), "--sizes",
               str(FIXTURE / "official_tiny_config.json")])
    assert rc == 0 and out.is_file()
    fresh = GTR(model.cfg).eval()
    fresh.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.generate(io["cond_input"]), io["triplane"], atol=ATOL, rtol=0)
    # against the full-size preset the tiny checkpoint is refused with a clear error and no output
    out2 = tmp_path / "full.safetensors"
    assert main([str(FIXTURE / "official_tiny_ckpt.pth"), str(out2), "--config", "configs/official.yaml"]) == 2
    assert not out2.exists() and not list(tmp_path.glob(".tmp-*"))

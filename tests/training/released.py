"""Shared by the tests that hold our code against the released GTR code's own numbers
(tests/fixtures/official-gtr-tiny-v2/README.md documents every key): the tiny model and the fixture files."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.fixtures import OFFICIAL_TINY, OFFICIAL_TINY_V2
from training.convert_official import load_official, model_config_from_official
from training.model import GTR


def tiny_model() -> GTR:
    """A fresh copy of the released tiny model, converted, in eval mode. Its frame is the released one
    (`official_frame` off: the fixture's cameras and points are already in their Y-up [-1, 1]^3 frame)."""
    cfg = model_config_from_official(json.loads((OFFICIAL_TINY / "official_tiny_config.json").read_text()))
    return load_official(OFFICIAL_TINY / "official_tiny_ckpt.pth", cfg).eval()


def fixture(name: str) -> dict[str, torch.Tensor]:
    """All tensors of `official-gtr-tiny-v2/<name>.safetensors`."""
    return load_file(str(OFFICIAL_TINY_V2 / f"{name}.safetensors"))


def tiny_io() -> dict[str, torch.Tensor]:
    """The first fixture's inputs and outputs (`official_tiny_io.safetensors`: cond views, triplane, ...)."""
    return load_file(str(OFFICIAL_TINY / "official_tiny_io.safetensors"))


def metadata(name: str) -> dict[str, str]:
    with safe_open(str(OFFICIAL_TINY_V2 / f"{name}.safetensors"), "pt") as f:
        return f.metadata() or {}

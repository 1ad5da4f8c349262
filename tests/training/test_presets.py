"""configs/paper.yaml builds the paper's architecture where the paper states it and the released model's where
it is silent (docs/model.md "Paper preset"); the MLP initialisations. Parameter counts: tests/training/test_model.py."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig
from training.model import GTR


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_mlp_init(init):
    torch.manual_seed(0)
    m = GTR(ModelConfig(mlp_init=init, mlp_hidden=256, plane_channels=64, width=32, heads=2, head_dim=16,
                        depth=1, plane_res=4, upsample=2))
    for layer in list(m.density_mlp.layers) + list(m.color_mlp.layers):
        fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
        assert (layer.bias == 0).all() or (init == "kaiming" and layer is m.density_mlp.layers[-1]
                                           or layer is m.color_mlp.layers[-1])
        if init == "xavier":  # U(−a, a) with a = sqrt(6 / (fan_in + fan_out)): variance a²/3
            a = (6 / (fan_in + fan_out)) ** 0.5
            assert layer.weight.abs().max() <= a
            assert layer.weight.var().item() == pytest.approx(a * a / 3, rel=0.2)
    with pytest.raises(ValueError, match="unknown MLP init"):
        GTR(ModelConfig(mlp_init="orthogonal"))

"""Decoders: separate shallow MLPs for density (f_d) and colour (f_c) on sampled triplane features.

Separate networks (paper §3.1) let the texture-refinement stage fine-tune colour with the geometry frozen.
Hidden activations are exact GELU, as in the released model.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

INITS = ("kaiming", "xavier")


class MLP(nn.Module):
    """`layers` linear layers with GELU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int, init: str = "kaiming") -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"an MLP needs at least one layer, got {layers}")
        if init not in INITS:
            raise ValueError(f"unknown MLP init {init!r} (one of {', '.join(INITS)})")
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        if init == "xavier":
            # The released SeparateField.init_weights (models/decoders/fields.py:391-396, snap_gtr 2916db7):
            # xavier_uniform on every Linear, biases 0.
            for layer in self.layers:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
            return
        # He init for the layers followed by GELU (≈ ReLU gain), zero biases: PyTorch's default Linear init
        # (variance 1/(3·fan_in)) shrinks the features ~2.5x per layer, so f_d's output starts ~0.05 and
        # needs hundreds of Adam steps to reach the densities (>10, the mesh level) an opaque surface needs.
        # The output layer keeps the default (small) init: the field starts near softplus(bias) everywhere.
        # Only the starting point changes; converted/released weights overwrite all of it.
        for layer in self.layers[:-1]:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)  # exact (erf) form, not tanh
        return x


class DensityMLP(MLP):
    """Features [..., F] → density σ [..., 1] ≥ 0 through softplus(x + bias)."""

    def __init__(self, in_dim: int, hidden: int, layers: int = 3, bias: float = 0.0, init: str = "kaiming") -> None:
        super().__init__(in_dim, hidden, 1, layers, init)
        self.bias = bias  # shifts the initial density; 0 in the released model

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(super().forward(x) + self.bias)


class ColorMLP(MLP):
    """Features [..., F] → RGB [..., 3] in [−ε, 1 + ε]: sigmoid stretched by ε = 0.001 (released model).

    The stretch lets exact 0 and 1 (white backgrounds) be reached with finite pre-activations.
    """

    def __init__(self, in_dim: int, hidden: int, layers: int = 4, stretch: float = 0.001,
                 init: str = "kaiming") -> None:
        super().__init__(in_dim, hidden, 3, layers, init)
        self.stretch = stretch

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).sigmoid() * (1 + 2 * self.stretch) - self.stretch

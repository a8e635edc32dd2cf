"""Plain torch networks: the encoder and decoder MLPs.

The default is the one-stochastic-layer architecture of the IWAE paper (Burda,
Grosse & Salakhutdinov 2015): 784-200-200-50 with tanh for the encoder (which
outputs a location and a scale per latent dimension) and 50-200-200-784 for the
decoder. Widths, depth and activation are configurable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import PplVaeError

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def mlp(in_features: int, hidden_sizes: Sequence[int], out_features: int, activation: str = "tanh") -> nn.Sequential:
    """A multilayer perceptron: Linear layers with ``activation`` between them, none after the last.

    Works on any number of leading batch dimensions, which is what lets Pyro's
    vectorized particles (an extra leading dimension on ``z``) pass through.
    """
    if activation not in ACTIVATIONS:
        raise PplVaeError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    sizes = [in_features, *hidden_sizes, out_features]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian over z; the scale is a softplus, so always > 0."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_sizes: Sequence[int], activation: str = "tanh"):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp(data_dim, hidden_sizes, 2 * latent_dim, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.net(x).split(self.latent_dim, dim=-1)
        # The small floor keeps log q finite if a unit's scale is driven to zero.
        return loc, nn.functional.softplus(raw_scale) + 1e-6

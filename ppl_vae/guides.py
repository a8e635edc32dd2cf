"""Guides q_phi(z | x): amortized encoders that return a distribution over z.

Interface: ``guide_net(x) -> Distribution`` with batch shape ``x.shape[:-1]`` and
``event_shape == (latent_dim,)``.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from .networks import GaussianEncoder


class DiagonalGaussianGuide(nn.Module):
    """q(z | x) = N(z; mu_phi(x), diag(sigma_phi(x)^2)), the standard amortized VAE encoder."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_sizes: Sequence[int], activation: str = "tanh"):
        super().__init__()
        self.encoder = GaussianEncoder(data_dim, latent_dim, hidden_sizes, activation)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale).to_event(1)


GUIDES = {"diagonal": DiagonalGaussianGuide}

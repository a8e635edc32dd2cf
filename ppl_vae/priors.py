"""Priors p(z): modules that return a ``pyro.distributions`` distribution over z.

Interface: ``prior(batch_shape) -> Distribution`` with ``event_shape == (latent_dim,)``.
Parameters (if any) live in the module, so they train with the rest of the model
and save with ``state_dict``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        # A buffer, so that ``.to(device)`` moves it with the model.
        self.register_buffer("zero", torch.zeros(()))

    def forward(self, batch_shape: torch.Size | tuple[int, ...] = ()) -> dist.Distribution:
        loc = self.zero.expand(*batch_shape, self.latent_dim)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


PRIORS = {"standard": StandardNormalPrior}

"""Guides q_phi(z | x): amortized encoders that return a distribution over z.

Interface: ``guide_net(x) -> Distribution`` with batch shape ``x.shape[:-1]`` and
``event_shape == (latent_dim,)``, reparameterized (``has_rsample``) so SVI gets
pathwise gradients. The networks are MLPs or convolutional (``network="conv"`` among the
options, see :mod:`ppl_vae.networks`); they take x flat, [..., D]. A user's own guide is any
module with this interface, passed as ``VAE(config, guide_net=...)``.

Built in (``--guide``):

* ``diagonal`` -- N(mu_phi(x), diag(sigma_phi(x)^2)), the standard VAE encoder;
* ``fullcov`` -- N(mu_phi(x), L_phi(x) L_phi(x)^T) with a lower-triangular L (positive diagonal);
* ``iaf`` -- a diagonal Gaussian followed by k inverse autoregressive flows conditioned
  on features of x (Kingma et al. 2016): z = f_k(...f_1(eps; h(x))...). Sampling and the
  density of a sampled z each take one parallel pass per flow.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.nn import functional as F

from .networks import GaussianEncoder, as_flat, encoder_net


class DiagonalGaussianGuide(nn.Module):
    """q(z | x) = N(z; mu_phi(x), diag(sigma_phi(x)^2))."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_sizes: Sequence[int], activation: str = "tanh", **options):
        super().__init__()
        self.encoder = GaussianEncoder(data_dim, latent_dim, hidden_sizes, activation, **options)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale).to_event(1)


class FullCovarianceGaussianGuide(nn.Module):
    """q(z | x) = N(z; mu_phi(x), L L^T): the encoder outputs mu, the diagonal of L (softplus) and its lower part."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_sizes: Sequence[int], activation: str = "tanh", **options):
        super().__init__()
        self.latent_dim, self.data_dim = latent_dim, data_dim
        self.num_off_diagonal = latent_dim * (latent_dim - 1) // 2
        self.net = encoder_net(data_dim, hidden_sizes, 2 * latent_dim + self.num_off_diagonal, activation, **options)
        self.register_buffer("rows", torch.tril_indices(latent_dim, latent_dim, offset=-1)[0])
        self.register_buffer("cols", torch.tril_indices(latent_dim, latent_dim, offset=-1)[1])

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        out = self.net(as_flat(x, self.data_dim))
        loc, raw_diag, off = out.split([self.latent_dim, self.latent_dim, self.num_off_diagonal], dim=-1)
        scale_tril = torch.diag_embed(F.softplus(raw_diag) + 1e-5)
        scale_tril[..., self.rows, self.cols] = off
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)


class IAFGuide(nn.Module):
    """q(z | x): eps ~ N(mu_phi(x), diag(sigma_phi(x)^2)), then k conditional affine autoregressive flows.

    The flows are Pyro's ``ConditionalAffineAutoregressive`` transforms, conditioned on a
    context vector h(x) from the encoder's trunk; permutations between them mix the order.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden_sizes: Sequence[int], activation: str = "tanh",
                 num_flows: int = 2, context_dim: int = 0, **options):
        super().__init__()
        self.latent_dim, self.data_dim = latent_dim, data_dim
        context_dim = context_dim or max(latent_dim, 16)
        self.trunk = encoder_net(data_dim, hidden_sizes, 2 * latent_dim + context_dim, activation, **options)
        hidden = [4 * latent_dim, 4 * latent_dim]
        self.flows = nn.ModuleList(
            T.conditional_affine_autoregressive(latent_dim, context_dim, hidden_dims=hidden) for _ in range(num_flows)
        )
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("permutations", torch.stack([torch.randperm(latent_dim, generator=generator) for _ in range(num_flows)]))

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        out = self.trunk(as_flat(x, self.data_dim))
        loc, raw_scale, context = out.split([self.latent_dim, self.latent_dim, out.shape[-1] - 2 * self.latent_dim], dim=-1)
        base = dist.Normal(loc, F.softplus(raw_scale) + 1e-6).to_event(1)
        transforms = []
        for flow, permutation in zip(self.flows, self.permutations):
            transforms += [flow.condition(torch.tanh(context)), T.Permute(permutation)]
        return dist.TransformedDistribution(base, transforms)


GUIDES: dict[str, type[nn.Module]] = {
    "diagonal": DiagonalGaussianGuide,
    "fullcov": FullCovarianceGaussianGuide,
    "iaf": IAFGuide,
}

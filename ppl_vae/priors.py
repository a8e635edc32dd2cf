"""Priors p(z): modules that return a ``pyro.distributions`` distribution over z.

Interface: ``prior() -> Distribution`` with ``batch_shape == ()`` and
``event_shape == (latent_dim,)``; the data plate broadcasts it over datapoints.
Parameters (if any) live in the module, so they train with the rest of the model
and save with ``state_dict``. A user's own prior is any ``nn.Module`` with this
interface, passed as ``VAE(config, prior=...)``.

Built in (``--prior``):

* ``standard`` -- p(z) = N(0, I);
* ``gaussian`` -- a learnable diagonal Gaussian N(mu, diag(sigma^2));
* ``mixture`` -- sum_k pi_k N(z; mu_k, diag(sigma_k^2)) with K learnable components and weights;
* ``vamp`` -- the VampPrior (Tomczak & Welling 2018): (1/K) sum_k q_phi(z | u_k), a uniform
  mixture of the guide's posteriors at K learnable pseudo-inputs u_k;
* ``flow`` -- a standard normal pushed through affine autoregressive flows (MAF direction:
  the density of a given z takes one parallel pass, sampling is sequential).
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, latent_dim: int, **_):
        super().__init__()
        self.latent_dim = latent_dim
        # A buffer, so that ``.to(device)`` moves it with the model.
        self.register_buffer("zero", torch.zeros(()))

    def forward(self) -> dist.Distribution:
        loc = self.zero.expand(self.latent_dim)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


class LearnedGaussianPrior(nn.Module):
    """p(z) = N(mu, diag(sigma^2)) with learnable mu and log sigma (initialized at N(0, I))."""

    def __init__(self, latent_dim: int, **_):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


class MixturePrior(nn.Module):
    """p(z) = sum_k pi_k N(z; mu_k, diag(sigma_k^2)): K learnable diagonal Gaussians and weights."""

    def __init__(self, latent_dim: int, num_components: int = 10, **_):
        super().__init__()
        # Spread the initial means so the components do not start identical (symmetry breaking).
        generator = torch.Generator().manual_seed(0)
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim, generator=generator))
        self.log_scales = nn.Parameter(torch.zeros(num_components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(num_components))

    def forward(self) -> dist.Distribution:
        components = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


class VampPrior(nn.Module):
    """p(z) = (1/K) sum_k q_phi(z | u_k): the guide's posteriors at K learnable pseudo-inputs.

    The pseudo-inputs are ``sigmoid`` of free parameters, so they stay in the data's
    range (0, 1). The guide network is held by reference, not registered as a
    submodule: its parameters belong to the guide and must not be counted twice.
    """

    def __init__(self, latent_dim: int, num_components: int = 500, guide_net: Callable | None = None,
                 data_dim: int = 784, **_):
        super().__init__()
        if guide_net is None:
            raise ValueError("the VampPrior needs the guide network (guide_net=...) to map pseudo-inputs to posteriors")
        self.__dict__["guide_net"] = guide_net  # a plain attribute: not a submodule
        generator = torch.Generator().manual_seed(0)
        self.pseudo_input_logits = nn.Parameter(0.1 * torch.randn(num_components, data_dim, generator=generator))

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.pseudo_input_logits)

    def forward(self) -> dist.Distribution:
        components = self.guide_net(self.pseudo_inputs)  # batch shape [K], event [latent_dim]
        weights = torch.zeros(self.pseudo_input_logits.shape[0], device=self.pseudo_input_logits.device)
        return dist.MixtureSameFamily(dist.Categorical(logits=weights), components)


class FlowPrior(nn.Module):
    """p(z): u ~ N(0, I) and z = g(u), where g^-1 is a stack of affine autoregressive flows.

    log p(z) = log N(g^-1(z); 0, I) + log |det d g^-1(z) / dz|, one parallel pass of
    each autoregressive network (the MAF direction); permutations between the flows
    let every dimension depend on every other.
    """

    def __init__(self, latent_dim: int, num_flows: int = 2, flow_hidden: int = 0, **_):
        super().__init__()
        hidden = flow_hidden or 4 * latent_dim
        self.register_buffer("zero", torch.zeros(()))
        self.flows = nn.ModuleList(T.affine_autoregressive(latent_dim, hidden_dims=[hidden, hidden]) for _ in range(num_flows))
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("permutations", torch.stack([torch.randperm(latent_dim, generator=generator) for _ in range(num_flows)]))
        self.latent_dim = latent_dim

    def density_transform(self) -> T.ComposeTransform:
        """g^-1: z -> u, the direction whose Jacobian is cheap."""
        parts = []
        for flow, permutation in zip(self.flows, self.permutations):
            parts += [flow, T.Permute(permutation)]
        return T.ComposeTransform(parts)

    def forward(self) -> dist.Distribution:
        loc = self.zero.expand(self.latent_dim)
        base = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
        return dist.TransformedDistribution(base, [self.density_transform().inv])


PRIORS: dict[str, type[nn.Module]] = {
    "standard": StandardNormalPrior,
    "gaussian": LearnedGaussianPrior,
    "mixture": MixturePrior,
    "vamp": VampPrior,
    "flow": FlowPrior,
}

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

import math
from typing import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn


class DiagonalNormalMixture(dist.MixtureSameFamily):
    """A ``MixtureSameFamily`` of diagonal Gaussians whose log density takes two matrix products.

    With precisions P_kd = s_kd^-2, each component's log density is::

        log N(z; m_k, diag s_k^2) = -1/2 [ z^2 . P_k - 2 z . (m_k P_k) + m_k^2 . P_k ]
                                    - sum_d log s_kd - (D/2) log 2 pi

    so the [..., K] component log densities of a batch of z are ``(z * z) @ P.T - 2 z @ (m P).T``
    plus a per-component constant. torch's ``MixtureSameFamily`` instead broadcasts z against
    every component and materializes [..., K, D]: for a VampPrior of K = 500 components scored
    on the thousands of draws x datapoints of an evidence chunk, gigabytes instead of
    megabytes. No library offers this form, hence by hand. The products run in float64
    because the expanded form subtracts large terms when scales are small; the result has
    the dtype of ``value``. Sampling, the mean and the variance are ``MixtureSameFamily``'s.

    Components must be ``Normal(loc, scale).to_event(1)`` with batch shape [K] (possibly
    expanded by a plate, as Pyro does); anything else falls back to ``MixtureSameFamily``.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        parameters = self._unbroadcast_parameters()
        if parameters is None:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        loc, scale, log_weights = (t.double() for t in parameters)
        precision = scale.pow(-2)
        z = value.double()
        quadratic = (z * z) @ precision.T - 2.0 * z @ (loc * precision).T + (loc * loc * precision).sum(-1)
        log_normalizer = scale.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        log_prob = torch.logsumexp(log_weights - log_normalizer - 0.5 * quadratic, dim=-1).to(value.dtype)
        return log_prob.expand(torch.broadcast_shapes(log_prob.shape, self.batch_shape))

    def _unbroadcast_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(loc [K, D], scale [K, D], log weights [K]) when the batch dimensions are only broadcast, else None."""
        components = self.component_distribution
        if not (isinstance(components, dist.Independent) and isinstance(components.base_dist, dist.Normal)
                and components.reinterpreted_batch_ndims == 1):
            return None
        batch_dims = len(self.batch_shape)
        tensors = [components.base_dist.loc, components.base_dist.scale, self.mixture_distribution.logits]
        event_dims = [2, 2, 1]
        unbroadcast = []
        for tensor, event_dim in zip(tensors, event_dims):
            tensor = tensor.expand(*self.batch_shape, *tensor.shape[tensor.dim() - event_dim:])
            for _ in range(batch_dims):
                if tensor.shape[0] != 1 and tensor.stride(0) != 0:
                    return None  # a real batch of different mixtures: the general path handles it
                tensor = tensor[0]
            unbroadcast.append(tensor)
        loc, scale, logits = unbroadcast
        return loc, scale, logits.log_softmax(-1)


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
        return DiagonalNormalMixture(dist.Categorical(logits=self.logits), components)


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
        return DiagonalNormalMixture(dist.Categorical(logits=weights), components)


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

r"""The two-stochastic-layer VAE of Burda, Grosse & Salakhutdinov (2015), as a pair of Pyro programs.

Generative model (``model``), for each datapoint in the data plate::

    z2 ~ N(0, I)                                  # site "z2", 50 units
    z1 ~ N(mu_theta(z2), diag sigma_theta(z2)^2)  # site "z1", 100 units; z2 -> 100 -> 100 -> z1
    x  ~ Bernoulli(logits_theta(z1))              # site "x", observed; z1 -> 200 -> 200 -> x

Guide (``guide``), bottom-up::

    z1 ~ N(mu_phi(x), diag sigma_phi(x)^2)        # x -> 200 -> 200 -> z1
    z2 ~ N(mu_phi(z1), diag sigma_phi(z1)^2)      # z1 -> 100 -> 100 -> z2

with tanh hidden units (the paper's Table 1 architecture). The guide draws z1 before z2,
the model z2 before z1, so z1's KL term cannot be taken analytically against p(z1 | z2):
:mod:`ppl_vae.evaluate` takes it by Monte Carlo (and says so), and ``--objective meanfield``
is refused for this program.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..errors import InvalidDataError
from ..networks import GaussianEncoder, mlp


class TwoLayerVAE(nn.Module):
    """p(z2) p(z1 | z2) p(x | z1) with the guide q(z1 | x) q(z2 | z1); Bernoulli pixels.

    ``latent`` = (units of z1, units of z2); ``hidden`` = the hidden widths of the
    x <-> z1 networks and of the z1 <-> z2 networks.
    """

    def __init__(
        self,
        data_dim: int = 784,
        latent: Sequence[int] = (100, 50),
        hidden: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        activation: str = "tanh",
    ):
        super().__init__()
        if len(latent) != 2 or len(hidden) != 2:
            raise InvalidDataError(f"latent and hidden give the two stochastic layers: got latent={latent}, hidden={hidden}")
        (z1_dim, z2_dim), (outer, inner) = latent, hidden
        self.data_dim, self.z1_dim, self.z2_dim = data_dim, z1_dim, z2_dim
        self.encoder1 = GaussianEncoder(data_dim, z1_dim, outer, activation)  # q(z1 | x)
        self.encoder2 = GaussianEncoder(z1_dim, z2_dim, inner, activation)  # q(z2 | z1)
        self.prior1 = GaussianEncoder(z2_dim, z1_dim, inner, activation)  # p(z1 | z2)
        self.decoder = mlp(z1_dim, outer, data_dim, activation)  # p(x | z1): Bernoulli logits

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x[0].numel() != self.data_dim:
            raise InvalidDataError(f"x must be a batch [N, {self.data_dim}] (or [N, ...] with {self.data_dim} values per "
                                   f"item), got shape {list(x.shape)}")
        return x.reshape(x.shape[0], self.data_dim)

    def model(self, x: torch.Tensor) -> torch.Tensor:
        x = self._flatten(x)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.z2_dim), 1.0).to_event(1))
            loc, scale = self.prior1(z2)
            z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z1), validate_args=False).to_event(1), obs=x)
        return z1

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        x = self._flatten(x)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(*self.encoder1(x)).to_event(1))
            pyro.sample("z2", dist.Normal(*self.encoder2(z1)).to_event(1))
        return z1

    @torch.no_grad()
    def decode_mean(self, z1: torch.Tensor) -> torch.Tensor:
        """E[x | z1]: pixel probabilities."""
        return torch.sigmoid(self.decoder(z1))

    @torch.no_grad()
    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[z1 | x], the code the decoder reads, for reconstructions."""
        return self.encoder1(self._flatten(x))[0]

    @torch.no_grad()
    def sample_prior(self, num_samples: int) -> torch.Tensor:
        """z2 ~ p(z2), z1 ~ p(z1 | z2), then E[x | z1]: [num_samples, data_dim]."""
        z2 = torch.randn(num_samples, self.z2_dim, device=self.decoder[0].weight.device)
        loc, scale = self.prior1(z2)
        return self.decode_mean(loc + scale * torch.randn_like(loc))

"""A linear-Gaussian latent model whose evidence and posterior are known in closed form.

p(z) = N(0, I_d), p(x | z) = N(W z + b, s^2 I_D), so

* log p(x) = log N(x; b, W W^T + s^2 I),
* p(z | x) = N(mu, Sigma) with Sigma = (I + W^T W / s^2)^-1, mu = Sigma W^T (x - b) / s^2.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


class LinearGaussian:
    def __init__(self, data_dim: int = 5, latent_dim: int = 2, noise: float = 0.7, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(data_dim, latent_dim, generator=g, dtype=torch.float64).float()
        self.b = torch.randn(data_dim, generator=g, dtype=torch.float64).float()
        self.noise = noise
        self.latent_dim = latent_dim
        self.data_dim = data_dim

    # The Pyro programs -------------------------------------------------------------
    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ self.W.T + self.b, self.noise).to_event(1), obs=x)

    def exact_guide(self, x):
        loc, scale_tril = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    def diagonal_guide(self, shift: float = 0.3, scale: float = 0.8):
        """An arbitrary (wrong) diagonal Gaussian guide: the posterior mean shifted, a fixed scale."""

        def guide(x):
            loc, _ = self.posterior(x)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("latent", dist.Normal(loc + shift, scale).to_event(1))

        return guide

    # Closed forms ------------------------------------------------------------------
    def posterior(self, x):
        W, s2 = self.W.double(), self.noise**2
        precision = torch.eye(self.latent_dim, dtype=torch.float64) + W.T @ W / s2
        cov = torch.linalg.inv(precision)
        loc = (x.double() - self.b.double()) @ W @ cov / s2
        return loc.float(), torch.linalg.cholesky(cov).float()

    def log_evidence(self, x):
        W = self.W.double()
        cov = W @ W.T + self.noise**2 * torch.eye(self.data_dim, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b.double(), cov).log_prob(x.double())

    def sample(self, n: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=g)
        return z @ self.W.T + self.b + self.noise * torch.randn(n, self.data_dim, generator=g)

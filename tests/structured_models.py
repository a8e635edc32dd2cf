"""Gaussian programs with two latent layers or conditioning data, whose evidence is known in closed form.

**Two layers, bottom-up guide** (:class:`TwoLayerGaussian`), in float64:

    p(z2) = N(0, I),  p(z1 | z2) = N(A z2 + a, S1),  p(x | z1) = N(W z1 + b, s^2 I),

so p(z1) = N(a, C1) with C1 = A A^T + S1 and log p(x) = log N(x; W a + b, W C1 W^T + s^2 I).
The guide runs bottom-up, q(z1 | x) q(z2 | z1), as in every two-stochastic-layer VAE; its
exact factors are the marginal posterior p(z1 | x) = N(mu1, Sigma1), with
Sigma1 = (C1^-1 + W^T W / s^2)^-1 and mu1 = Sigma1 (C1^-1 a + W^T (x - b) / s^2), and
p(z2 | z1) = N(Sigma2 A^T S1^-1 (z1 - a), Sigma2) with Sigma2 = (I + A^T S1^-1 A)^-1
(z2 is independent of x given z1). Their product is the joint posterior p(z1, z2 | x), so
every importance weight, and the ELBO of every datapoint, equals p(x). All sites are
MultivariateNormal, for which torch has an analytic KL rule that is wrong to use at z1.

**Conditional** (:class:`ConditionalGaussian`): labels y in {0..C-1}, one row per datapoint,

    p(z) = N(0, I),  p(x | z, y) = N(W z + V[y] + b, s^2 I),

so log p(x | y) = log N(x; V[y] + b, W W^T + s^2 I), and the exact posterior is that of the
one-layer linear-Gaussian model at x - V[y].
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

DOUBLE = torch.float64


def _random(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=DOUBLE)


class TwoLayerGaussian:
    def __init__(self, data_dim: int = 4, z1_dim: int = 3, z2_dim: int = 2, noise: float = 0.6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.A, self.a = _random(g, z1_dim, z2_dim), _random(g, z1_dim)
        L1 = torch.tril(0.3 * _random(g, z1_dim, z1_dim), -1) + torch.diag(0.5 + torch.rand(z1_dim, generator=g, dtype=DOUBLE))
        self.S1 = L1 @ L1.T
        self.W, self.b = _random(g, data_dim, z1_dim), _random(g, data_dim)
        self.noise, self.z1_dim, self.z2_dim, self.data_dim = noise, z1_dim, z2_dim, data_dim

    # The Pyro programs -------------------------------------------------------------
    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.MultivariateNormal(torch.zeros(self.z2_dim, dtype=DOUBLE),
                                                           torch.eye(self.z2_dim, dtype=DOUBLE)))
            z1 = pyro.sample("z1", dist.MultivariateNormal(z2 @ self.A.T + self.a, self.S1))
            pyro.sample("x", dist.Normal(z1 @ self.W.T + self.b, self.noise).to_event(1), obs=x)

    def exact_guide(self, x):
        mu1, sigma1 = self.z1_posterior(x)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(mu1, sigma1))
            mu2, sigma2 = self.z2_given_z1(z1)
            pyro.sample("z2", dist.MultivariateNormal(mu2, sigma2))

    def mismatched_guide(self, x):
        """The exact factors' means shifted and scaled, and fixed covariances: a wrong bottom-up guide."""
        mu1, _ = self.z1_posterior(x)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(0.8 * mu1 + 0.2, 0.3 * torch.eye(self.z1_dim, dtype=DOUBLE)))
            mu2, _ = self.z2_given_z1(z1)
            pyro.sample("z2", dist.MultivariateNormal(1.3 * mu2 - 0.1, 0.5 * torch.eye(self.z2_dim, dtype=DOUBLE)))

    # Closed forms ------------------------------------------------------------------
    def z1_prior_covariance(self):
        return self.A @ self.A.T + self.S1

    def z1_posterior(self, x):
        c1_inv = torch.linalg.inv(self.z1_prior_covariance())
        sigma1 = torch.linalg.inv(c1_inv + self.W.T @ self.W / self.noise**2)
        mu1 = (self.a @ c1_inv + (x - self.b) @ self.W / self.noise**2) @ sigma1  # sigma1 is symmetric
        return mu1, sigma1

    def z2_given_z1(self, z1):
        s1_inv = torch.linalg.inv(self.S1)
        sigma2 = torch.linalg.inv(torch.eye(self.z2_dim, dtype=DOUBLE) + self.A.T @ s1_inv @ self.A)
        mu2 = (z1 - self.a) @ s1_inv @ self.A @ sigma2
        return mu2, sigma2

    def log_evidence(self, x):
        cov = self.W @ self.z1_prior_covariance() @ self.W.T + self.noise**2 * torch.eye(self.data_dim, dtype=DOUBLE)
        return torch.distributions.MultivariateNormal(self.W @ self.a + self.b, cov).log_prob(x)

    def sample(self, n: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        z2 = _random(g, n, self.z2_dim)
        z1 = z2 @ self.A.T + self.a + _random(g, n, self.z1_dim) @ torch.linalg.cholesky(self.S1).T
        return z1 @ self.W.T + self.b + self.noise * _random(g, n, self.data_dim)


class ConditionalGaussian:
    def __init__(self, data_dim: int = 5, latent_dim: int = 2, num_classes: int = 4, noise: float = 0.7, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W, self.b = _random(g, data_dim, latent_dim), _random(g, data_dim)
        self.V = 2 * _random(g, num_classes, data_dim)  # one offset per class
        self.noise, self.latent_dim, self.data_dim, self.num_classes = noise, latent_dim, data_dim, num_classes

    def model(self, x, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim, dtype=DOUBLE), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.V[y] + self.b, self.noise).to_event(1), obs=x)

    def exact_guide(self, x, y):
        precision = torch.eye(self.latent_dim, dtype=DOUBLE) + self.W.T @ self.W / self.noise**2
        cov = torch.linalg.inv(precision)
        loc = (x - self.V[y] - self.b) @ self.W @ cov / self.noise**2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(cov)))

    def log_evidence(self, x, y):
        cov = self.W @ self.W.T + self.noise**2 * torch.eye(self.data_dim, dtype=DOUBLE)
        return torch.distributions.MultivariateNormal(self.V[y] + self.b, cov).log_prob(x)

    def sample(self, n: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(self.num_classes, (n,), generator=g)
        z = _random(g, n, self.latent_dim)
        return z @ self.W.T + self.V[y] + self.b + self.noise * _random(g, n, self.data_dim), y

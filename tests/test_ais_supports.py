"""AIS on constrained latent sites: fixed supports (with tensor bounds, with or without latent parents) are annealed
in unconstrained space and agree with closed forms or quadrature; a support that moves with another latent site
(z2 ~ Uniform(0, z1)) is refused in one line naming the site, not turned into a silently wrong number."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import AffineTransform, ExpTransform

from ppl_vae.errors import ModelStructureError
from ppl_vae.evaluate import ais_log_evidence, bdmc

FAST = dict(chains=8, leapfrog_steps=5)


def mean_error(estimate, exact):
    """The mean of log p̂(x) - log p(x) over the datapoints, and its standard error from the chains'."""
    difference = estimate.log_evidence - exact.double()
    return difference.mean().item(), estimate.stderr.pow(2).sum().sqrt().item() / len(difference)


def dependent_model(x):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Gamma(2.0, 1.0))
        z2 = pyro.sample("z2", dist.Uniform(0.0, z1))
        pyro.sample("x", dist.Normal(z2, 0.5), obs=x)


def dependent_guide(x):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Gamma(3.0 * torch.ones(x.shape[0]), 1.5))
        pyro.sample("z2", dist.Uniform(0.0, z1))


def test_a_support_that_depends_on_another_latent_is_refused_in_one_line():
    x = torch.rand(5) * 2
    with pytest.raises(ModelStructureError) as error:
        ais_log_evidence(dependent_model, dependent_guide, x, steps=5, chains=2, leapfrog_steps=2)
    message = str(error.value)
    assert "'z2'" in message and "['z1']" in message and "--estimator is" in message and "\n" not in message
    with pytest.raises(ModelStructureError, match="'z2'"):  # BDMC anneals the same way
        bdmc(dependent_model, dependent_guide, 3, data_like=torch.zeros(1), steps=3, chains=2, leapfrog_steps=2)


def test_uniform_latent_with_fixed_tensor_bounds_matches_the_closed_form():
    """z ~ Uniform(0, 2) (its support an interval with tensor bounds, no latent parents), x | z ~ N(z, s^2):
    p(x) = (Φ((2 - x) / s) - Φ(-x / s)) / 2. The guide, a Beta(2, 5) stretched to (0, 2), is poor."""
    s = 0.3

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Uniform(torch.tensor(0.0), torch.tensor(2.0)))
            pyro.sample("x", dist.Normal(z, s), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            beta = dist.Beta(2.0 * torch.ones(x.shape[0]), 5.0)
            pyro.sample("z", dist.TransformedDistribution(beta, AffineTransform(0.0, 2.0)))

    pyro.set_rng_seed(0)
    x = torch.rand(12) * 2.4 - 0.2
    normal = torch.distributions.Normal(0.0, 1.0)
    exact = ((normal.cdf((2 - x.double()) / s) - normal.cdf(-x.double() / s)) / 2).log()
    result = ais_log_evidence(model, guide, x, steps=100, **FAST)
    mean, stderr = mean_error(result, exact)
    assert abs(mean) < 4 * stderr + 0.02, (mean, stderr)


def test_pareto_latent_whose_shape_depends_on_another_latent_matches_quadrature():
    """z1 ~ N(0, 0.5^2), z2 ~ Pareto(scale 1, shape a = e^{z1}) (support [1, inf): tensor bound, fixed, while the
    site has a latent parent: the two-draw comparison must let it through), x | z2 ~ N(log z2, s^2). With
    v = log z2 ~ Exponential(a), p(x | a) = a exp(-a x + a^2 s^2 / 2) Φ((x - a s^2) / s); then 1-D quadrature in z1."""
    s = 0.5

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(0.0, 0.5))
            z2 = pyro.sample("z2", dist.Pareto(torch.tensor(1.0), z1.exp()))
            pyro.sample("x", dist.Normal(z2.log(), s), obs=x)

    def guide(x):
        ones = torch.ones(x.shape[0])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(0.3 * ones, 0.8))
            pyro.sample("z2", dist.TransformedDistribution(dist.Exponential(ones), ExpTransform()))

    pyro.set_rng_seed(1)
    x = torch.rand(12) * 2.5 + 0.1
    z1 = torch.linspace(-4, 4, 4001, dtype=torch.float64)
    a = z1.exp()[None]
    xd = x.double()[:, None]
    log_given = a.log() - a * xd + a.pow(2) * s**2 / 2 + torch.special.log_ndtr((xd - a * s**2) / s)
    log_joint = torch.distributions.Normal(0.0, 0.5).log_prob(z1)[None] + log_given
    exact = torch.logsumexp(log_joint, 1) + math.log(z1[1] - z1[0])
    result = ais_log_evidence(model, guide, x, steps=100, **FAST)
    mean, stderr = mean_error(result, exact)
    assert abs(mean) < 4 * stderr + 0.02, (mean, stderr)

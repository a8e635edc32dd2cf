"""The evaluation sums enumerated discrete sites exactly (issue 26, item 2), against closed forms.

Model: y ~ Categorical(pi), z | y ~ N(mu_y, I), x | z ~ N(A z + b, sigma^2 I), so p(x) = sum_y pi_y N(x; A mu_y + b,
A A^T + sigma^2 I), a Gaussian mixture, and p(z | x, y) = N(S (mu_y + A^T (x - b) / sigma^2), S) with
S = (I + A^T A / sigma^2)^-1. The guide q(y | x) (any logits, marked for enumeration) q(z | x, y) (exact, or
shifted and widened). In float64.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from torch import nn

from ppl_vae.evaluate import elbo_decomposition, evidence_estimate, inspect_program, log_evidence

D, L = 3, 2
ENUM = {"enumerate": "parallel"}


class Mixture(nn.Module):
    """The Gaussian-mixture program; ``sizes``: one discrete site per entry (two: y1, y2 with z | y1, y2 ~ N(mu1[y1] +
    mu2[y2], I) and q(y2 | y1)); ``shift``/``widen``: how far q(z | x, y) is from the exact posterior."""

    def __init__(self, sizes=(3,), shift: float = 0.0, widen: float = 1.0, seed: int = 0, mark: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sizes, self.shift, self.widen, self.mark = sizes, shift, widen, mark
        self.prior_logits = nn.ParameterList([nn.Parameter(torch.randn(c, generator=g, dtype=torch.float64)) for c in sizes])
        self.means = nn.ParameterList([nn.Parameter(2 * torch.randn(c, L, generator=g, dtype=torch.float64)) for c in sizes])
        self.A = nn.Parameter(torch.randn(D, L, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.sigma = 0.7
        # q(y1 | x): logits linear in x; q(y2 | y1): a table (it depends on the first site's value)
        self.q_weight = nn.Parameter(torch.randn(D, sizes[0], generator=g, dtype=torch.float64))
        if len(sizes) == 2:
            self.q_table = nn.Parameter(torch.randn(sizes[0], sizes[1], generator=g, dtype=torch.float64))

    def names(self):
        return ["y"] if len(self.sizes) == 1 else ["y1", "y2"]

    def mean_of(self, ys):
        return sum(mean[y] for mean, y in zip(self.means, ys))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            ys = [pyro.sample(name, dist.Categorical(logits=logits)) for name, logits in zip(self.names(), self.prior_logits)]
            z = pyro.sample("z", dist.MultivariateNormal(self.mean_of(ys), torch.eye(L, dtype=x.dtype)))
            pyro.sample("x", dist.Normal(z @ self.A.T + self.b, self.sigma).to_event(1), obs=x)

    def posterior(self, x, ys):
        precision = torch.eye(L, dtype=x.dtype) + self.A.T @ self.A / self.sigma**2
        cov = torch.linalg.inv(precision)
        loc = (self.mean_of(ys) + (x - self.b) @ self.A / self.sigma**2) @ cov.T
        return loc, cov

    def guide(self, x):
        infer = ENUM if self.mark else {}
        with pyro.plate("data", x.shape[0]):
            y1 = pyro.sample(self.names()[0], dist.Categorical(logits=x @ self.q_weight), infer=infer)
            ys = [y1]
            if len(self.sizes) == 2:
                ys.append(pyro.sample("y2", dist.Categorical(logits=self.q_table[y1]), infer=infer))
            loc, cov = self.posterior(x, ys)
            pyro.sample("z", dist.MultivariateNormal(loc + self.shift, self.widen**2 * cov))

    def log_px(self, x):
        """log p(x), closed form: log sum_y p(y) N(x; A mu_y + b, A A^T + sigma^2 I)."""
        cov = self.A @ self.A.T + self.sigma**2 * torch.eye(D, dtype=x.dtype)
        grids = torch.meshgrid(*[torch.arange(c) for c in self.sizes], indexing="ij")
        ys = [g.reshape(-1) for g in grids]
        log_prior = sum(torch.log_softmax(logits, -1)[y] for logits, y in zip(self.prior_logits, ys))  # [Y]
        means = self.mean_of(ys) @ self.A.T + self.b  # [Y, D]
        log_lik = dist.MultivariateNormal(means, cov).log_prob(x[:, None, :])  # [N, Y]
        return torch.logsumexp(log_lik + log_prior, -1)

    def log_q_y(self, x):
        """log q(y | x) over every configuration, [N, Y] (the order of log_px's grid)."""
        first = torch.log_softmax(x @ self.q_weight, -1)  # [N, C1]
        if len(self.sizes) == 1:
            return first
        return (first[:, :, None] + torch.log_softmax(self.q_table, -1)[None]).reshape(x.shape[0], -1)

    def log_pxy(self, x):
        """log p(x, y) per configuration, [N, Y]."""
        cov = self.A @ self.A.T + self.sigma**2 * torch.eye(D, dtype=x.dtype)
        grids = torch.meshgrid(*[torch.arange(c) for c in self.sizes], indexing="ij")
        ys = [g.reshape(-1) for g in grids]
        log_prior = sum(torch.log_softmax(logits, -1)[y] for logits, y in zip(self.prior_logits, ys))
        return dist.MultivariateNormal(self.mean_of(ys) @ self.A.T + self.b, cov).log_prob(x[:, None, :]) + log_prior


def data(n=7, seed=1):
    return 2 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("sizes", [(3,), (3, 2)])
@pytest.mark.parametrize("q_seed", [0, 5])
def test_with_the_exact_continuous_posterior_log_p_hat_is_log_p_x_whatever_q_y_is(sizes, q_seed):
    x = data()
    program = Mixture(sizes)
    with torch.no_grad():
        program.q_weight.copy_(5 * torch.randn(D, sizes[0], generator=torch.Generator().manual_seed(q_seed)))
    estimate = evidence_estimate(program.model, program.guide, x, num_samples=3)
    assert torch.allclose(estimate.log_evidence, program.log_px(x).detach(), atol=1e-6, rtol=0)
    assert torch.allclose(estimate.stderr, torch.zeros_like(estimate.stderr), atol=1e-6)
    # The same in chunks of 3 datapoints and 2 particles (the last chunk of each smaller).
    chunked = log_evidence(program.model, program.guide, x, num_samples=5, chunk_size=3, particles_per_chunk=2)
    assert torch.allclose(chunked, program.log_px(x).detach(), atol=1e-6, rtol=0)


def test_drawing_y_instead_is_not_exact():
    # The same program without the mark: y is drawn from q(y | x), and the estimate is off (the old behaviour).
    x = data()
    program = Mixture((3,), mark=False)
    drawn = log_evidence(program.model, program.guide, x, num_samples=3)
    assert (drawn - program.log_px(x).detach()).abs().max() > 1e-3


@pytest.mark.parametrize("sizes", [(3,), (3, 2)])
def test_with_a_mismatched_continuous_guide_the_estimate_converges_from_below(sizes):
    x = data(n=5).repeat(400, 1)  # 400 independent estimates per datapoint: the mean gap is E[log p(x) - log p̂(x)]
    program = Mixture(sizes, shift=0.4, widen=1.3)
    exact = program.log_px(x).detach()
    pyro.set_rng_seed(0)
    gaps = [float((exact - log_evidence(program.model, program.guide, x, num_samples=k)).mean()) for k in (1, 10, 100)]
    assert gaps[0] > gaps[1] > gaps[2] > 0, gaps
    assert gaps[2] < 0.1 * gaps[0], gaps


@pytest.mark.parametrize("sizes", [(3,), (3, 2)])
def test_the_decomposition_takes_q_y_exactly_and_equals_trace_enum_elbo(sizes):
    x = data()
    program = Mixture(sizes)  # exact q(z | x, y): log p(x, y, z) - log q(z | x, y) = log p(x, y), no noise
    # Monte Carlo KL: the ELBO is the mean log-weight with y summed, here free of noise.
    result = elbo_decomposition(program.model, program.guide, x, num_samples=2, kl="mc")
    log_q = program.log_q_y(x).detach()
    by_hand = (log_q.exp() * (program.log_pxy(x).detach() - log_q)).sum(-1)
    assert torch.allclose(result["elbo"], by_hand, atol=1e-6, rtol=0)
    assert torch.allclose(result["reconstruction"] - sum(result["kl"].values()), result["elbo"])
    trace_enum = TraceEnum_ELBO(max_plate_nesting=1).loss(program.model, program.guide, x)
    assert math.isclose(-trace_enum, float(result["elbo"].sum()), rel_tol=1e-9, abs_tol=1e-6)
    # Analytic KL (Categorical against Categorical, MultivariateNormal against MultivariateNormal): the discrete
    # sites' terms are exact either way; the ELBO equal in expectation (its reconstruction term is Monte Carlo).
    analytic = elbo_decomposition(program.model, program.guide, x, num_samples=3000)
    assert all(analytic["kl_method"][name] == "analytic" for name in [*program.names(), "z"])
    for name in program.names():
        assert torch.allclose(analytic["kl"][name], result["kl"][name], atol=1e-9)
    assert torch.allclose(analytic["elbo"], by_hand, atol=0.05 * by_hand.abs().max())
    if sizes == (3,):
        kl_y = (log_q.exp() * (log_q - torch.log_softmax(program.prior_logits[0], -1).detach())).sum(-1)
        assert torch.allclose(result["kl"]["y"], kl_y, atol=1e-9)


def test_the_decomposition_of_a_mismatched_guide_matches_trace_enum_elbo_in_expectation():
    x = data(n=4)
    program = Mixture((3, 2), shift=0.3, widen=1.3)
    pyro.set_rng_seed(0)
    result = elbo_decomposition(program.model, program.guide, x, num_samples=4000, kl="mc")
    reference = TraceEnum_ELBO(max_plate_nesting=1, num_particles=4000, vectorize_particles=True)
    trace_enum = -reference.loss(program.model, program.guide, x)
    assert math.isclose(trace_enum, float(result["elbo"].sum()), rel_tol=2e-3)
    analytic = elbo_decomposition(program.model, program.guide, x, num_samples=4000)
    assert math.isclose(float(analytic["elbo"].sum()), trace_enum, rel_tol=2e-3)
    assert float((analytic["elbo"] - program.log_px(x).detach()).max()) < 0  # a lower bound


def test_the_structure_records_the_enumerated_sites_and_their_sizes():
    program = Mixture((3, 2))
    structure = inspect_program(program.model, program.guide, data())
    assert structure.enumerated == {"y1": "parallel", "y2": "parallel"} and structure.enumeration_size == 6

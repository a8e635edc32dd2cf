"""Estimators against closed forms: the linear-Gaussian latent model."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from gaussian_models import LinearGaussian
from ppl_vae.evaluate import (
    KL_ANALYTIC,
    KL_MONTE_CARLO,
    elbo_decomposition,
    evidence_estimate,
    iter_chunk_terms,
    log_evidence,
    plan_evaluation,
)


@pytest.fixture
def lg():
    return LinearGaussian(data_dim=5, latent_dim=2, noise=0.7)


def test_importance_sampling_matches_exact_evidence_with_a_wrong_guide(lg):
    x = lg.sample(8)
    exact = lg.log_evidence(x)
    estimate = evidence_estimate(lg.model, lg.diagonal_guide(), x, num_samples=4000, particles_per_chunk=700)
    z = (estimate.log_evidence - exact) / estimate.stderr
    assert torch.all(z.abs() < 4), z
    # The guide is wrong, so the weights vary: the check above is not trivial.
    assert torch.all(estimate.stderr > 1e-3)
    assert torch.all(estimate.ess < 0.9 * 4000)
    elbo = elbo_decomposition(lg.model, lg.diagonal_guide(), x, num_samples=500)["elbo"]
    assert torch.all(elbo < exact)


def test_exact_posterior_guide_gives_elbo_equal_to_log_evidence(lg):
    x = lg.sample(8)
    exact = lg.log_evidence(x)
    decomposition = elbo_decomposition(lg.model, lg.exact_guide, x, num_samples=20, kl="mc")
    torch.testing.assert_close(decomposition["elbo"], exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(log_evidence(lg.model, lg.exact_guide, x, num_samples=50), exact, atol=1e-4, rtol=0)
    plan = plan_evaluation(lg.model, lg.exact_guide, x, num_samples=64)
    for _, terms in iter_chunk_terms(lg.model, lg.exact_guide, x, plan):
        spread = terms.log_weight.max(0).values - terms.log_weight.min(0).values
        assert torch.all(spread < 1e-4), "with the exact posterior every importance weight is p(x)"
    assert decomposition["kl_method"] == {"latent": KL_MONTE_CARLO}  # no rule for MVN vs Independent(Normal)


def test_decomposition_sums_to_elbo_and_analytic_kl_is_used_where_registered(lg):
    x = lg.sample(6)
    result = elbo_decomposition(lg.model, lg.diagonal_guide(), x, num_samples=7)
    assert result["kl_method"] == {"latent": KL_ANALYTIC}
    assert set(result) >= {"elbo", "reconstruction", "kl", "kl_method"}
    for value in (result["elbo"], result["reconstruction"], result["kl"]["latent"]):
        assert value.shape == (6,)
    torch.testing.assert_close(result["elbo"], result["reconstruction"] - result["kl"]["latent"], rtol=0, atol=1e-12)


def test_analytic_kl_equals_monte_carlo_kl_within_error(lg):
    x = lg.sample(5)
    analytic = elbo_decomposition(lg.model, lg.diagonal_guide(), x, num_samples=1)["kl"]["latent"]
    plan = plan_evaluation(lg.model, lg.diagonal_guide(), x, num_samples=20000, kl="mc", particles_per_chunk=5000)
    draws = torch.cat([terms.kl["latent"].double() for _, terms in iter_chunk_terms(lg.model, lg.diagonal_guide(), x, plan)])
    mc_mean, mc_se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert torch.all(((mc_mean - analytic) / mc_se).abs() < 4)


def test_mean_elbo_agrees_with_trace_elbo(lg):
    x = lg.sample(10)
    guide = lg.diagonal_guide()
    ours = elbo_decomposition(lg.model, guide, x, num_samples=2000, kl="mc")["elbo"]
    pyro_loss = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1).loss(lg.model, guide, x)
    plan = plan_evaluation(lg.model, guide, x, num_samples=2000)
    per_particle = torch.cat([t.log_weight.double().sum(1) for _, t in iter_chunk_terms(lg.model, guide, x, plan)])
    se = per_particle.std() / math.sqrt(per_particle.numel()) / x.shape[0]
    assert abs(ours.mean().item() - (-pyro_loss / x.shape[0])) < 4 * math.sqrt(2) * se


class TwoLayerGaussian:
    """z1 ~ N(0, I), z2 | z1 ~ N(A z1, I), x | z2 ~ N(W z2 + b, s^2 I): two latent sites, other names.

    log p(x) = log N(x; b, W (A A^T + I) W^T + s^2 I).
    """

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.A = torch.randn(3, 2, generator=g)
        self.W = torch.randn(4, 3, generator=g)
        self.b = torch.randn(4, generator=g)
        self.s = 0.5

    def model(self, x):
        with pyro.plate("items", x.shape[0]):
            top = pyro.sample("top", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            mid = pyro.sample("mid", dist.Normal(top @ self.A.T, 1.0).to_event(1))
            pyro.sample("pixels", dist.Normal(mid @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("items", x.shape[0]):
            top = pyro.sample("top", dist.Normal(0.1 * x[..., :2], 1.0).to_event(1))
            pyro.sample("mid", dist.Normal(top @ self.A.T + 0.2, 0.9).to_event(1))

    def log_evidence(self, x):
        A, W = self.A.double(), self.W.double()
        cov = W @ (A @ A.T + torch.eye(3, dtype=torch.float64)) @ W.T + self.s**2 * torch.eye(4, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b.double(), cov).log_prob(x.double())

    def sample(self, n):
        g = torch.Generator().manual_seed(4)
        top = torch.randn(n, 2, generator=g)
        mid = top @ self.A.T + torch.randn(n, 3, generator=g)
        return mid @ self.W.T + self.b + self.s * torch.randn(n, 4, generator=g)


def test_user_program_with_two_latent_sites_and_any_names():
    m = TwoLayerGaussian()
    x = m.sample(6)
    result = elbo_decomposition(m.model, m.guide, x, num_samples=50)
    assert set(result["kl"]) == {"top", "mid"}
    assert result["kl_method"] == {"top": KL_ANALYTIC, "mid": KL_ANALYTIC}
    torch.testing.assert_close(result["elbo"], result["reconstruction"] - result["kl"]["top"] - result["kl"]["mid"])
    estimate = evidence_estimate(m.model, m.guide, x, num_samples=20000)
    exact = m.log_evidence(x)
    assert torch.all(((estimate.log_evidence - exact) / estimate.stderr).abs() < 4)
    assert torch.all(result["elbo"] < exact)


def test_inner_plate_over_pixels_is_summed_per_datapoint(lg):
    """The same model written with a pixel plate instead of .to_event gives the same numbers."""

    def model_with_pixel_plate(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("latent", dist.Normal(torch.zeros(1, lg.latent_dim), 1.0).to_event(1))
            with pyro.plate("pixels", lg.data_dim, dim=-1):
                pyro.sample("obs", dist.Normal(z.squeeze(-2) @ lg.W.T + lg.b, lg.noise), obs=x)

    def guide_with_pixel_plate(x):
        loc, scale_tril = lg.posterior(x)
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("latent", dist.MultivariateNormal(loc.unsqueeze(-2), scale_tril=scale_tril.unsqueeze(-3)))

    x = lg.sample(4)
    values = log_evidence(model_with_pixel_plate, guide_with_pixel_plate, x, num_samples=10)
    torch.testing.assert_close(values, lg.log_evidence(x), atol=1e-4, rtol=0)


def test_chunking_does_not_change_the_estimate(lg):
    x = lg.sample(7)
    pyro.set_rng_seed(1)
    whole = elbo_decomposition(lg.model, lg.exact_guide, x, num_samples=12, kl="mc")["elbo"]
    chunked = elbo_decomposition(lg.model, lg.exact_guide, x, num_samples=12, kl="mc", chunk_size=3, particles_per_chunk=5)["elbo"]
    torch.testing.assert_close(whole, chunked, atol=1e-4, rtol=0)


def test_evaluation_chunks_grow_with_free_gpu_memory_within_bounds():
    from ppl_vae.evaluate import CPU_CHUNK_ELEMENTS, DEFAULT_CHUNK_ELEMENTS, MAX_GPU_CHUNK_ELEMENTS, chunk_element_budget

    assert chunk_element_budget(torch.device("cpu")) == CPU_CHUNK_ELEMENTS
    cuda = torch.device("cuda")  # the budget is arithmetic on the free bytes: no GPU needed to check it
    assert chunk_element_budget(cuda, free_bytes=2**30) == DEFAULT_CHUNK_ELEMENTS  # never below this floor
    assert chunk_element_budget(cuda, free_bytes=16 * 2**30) == 16 * 2**30 // 64
    assert chunk_element_budget(cuda, free_bytes=80 * 2**30) == MAX_GPU_CHUNK_ELEMENTS


def test_free_gpu_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    from ppl_vae.evaluate import chunk_element_budget

    # After training, PyTorch's allocator keeps freed blocks: the driver calls them used, this process can reuse them.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 2**30)
    assert chunk_element_budget(torch.device("cuda")) == (4 + 10 - 2) * 2**30 // 64

"""Model variants: every prior and likelihood normalized, flows' Jacobians right, beta and IWAE exact."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from gaussian_models import LinearGaussian
from ppl_vae.errors import PplVaeError
from ppl_vae.evaluate import elbo_decomposition, evidence_estimate, iter_chunk_terms, plan_evaluation
from ppl_vae.guides import FullCovarianceGaussianGuide, IAFGuide
from ppl_vae.likelihoods import LIKELIHOODS, DiscretizedLogistic
from ppl_vae.model import VAE, VAEConfig
from ppl_vae.objectives import make_objective
from ppl_vae.priors import PRIORS, DiagonalNormalMixture
from ppl_vae.programs import Weighted


def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter away from its initial value, so the checks do not pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def make_prior(name: str) -> nn.Module:
    guide = FullCovarianceGaussianGuide(data_dim=4, latent_dim=2, hidden_sizes=(8,))
    prior = PRIORS[name](2, num_components=3, guide_net=perturb(guide, 1), data_dim=4, num_flows=2)
    return perturb(prior)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_every_prior_is_normalized(name):
    prior = make_prior(name)
    grid = torch.linspace(-9, 9, 601)
    step = (grid[1] - grid[0]).item()
    z = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        mass = prior().log_prob(z).exp().sum().item() * step**2
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_vamp_prior_is_the_mixture_of_guide_posteriors_at_pseudo_inputs():
    prior = make_prior("vamp")
    z = torch.randn(7, 2)
    components = prior.guide_net(prior.pseudo_inputs)
    expected = torch.logsumexp(components.log_prob(z.unsqueeze(-2)), dim=-1) - math.log(prior.pseudo_inputs.shape[0])
    torch.testing.assert_close(prior().log_prob(z), expected)
    assert not any(p is q for p in prior.parameters() for q in prior.guide_net.parameters())


@pytest.mark.parametrize("min_scale", [1.0, 1e-2])
def test_matmul_mixture_density_equals_torchs_mixture_same_family(min_scale):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(5, 3, generator=g, requires_grad=True)
    scale = (min_scale + torch.rand(5, 3, generator=g)).requires_grad_()
    logits = torch.randn(5, generator=g)
    fast = DiagonalNormalMixture(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    slow = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    # z near the components (where small scales make the expanded form cancel), expanded by a plate of 4
    # and with a leading particle dimension of 2, as in an evidence chunk.
    z = loc.detach()[torch.randint(5, (2, 4), generator=g)] + min_scale * torch.randn(2, 4, 3, generator=g)
    expanded = fast.expand([4])
    assert isinstance(expanded, DiagonalNormalMixture) and expanded._unbroadcast_parameters() is not None  # the fast path
    fast_lp, slow_lp = expanded.log_prob(z), slow.expand([4]).log_prob(z)
    assert fast_lp.shape == slow_lp.shape == (2, 4)
    torch.testing.assert_close(fast_lp, slow_lp, atol=1e-5, rtol=1e-6)
    fast_grad = torch.autograd.grad(fast_lp.sum(), [loc, scale])
    slow_grad = torch.autograd.grad(slow_lp.sum(), [loc, scale])
    for a, b in zip(fast_grad, slow_grad):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_matmul_mixture_falls_back_for_a_real_batch_of_mixtures():
    loc, scale = torch.randn(4, 5, 3), torch.rand(4, 5, 3) + 0.5  # four different mixtures
    logits = torch.zeros(4, 5)
    fast = DiagonalNormalMixture(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    slow = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    z = torch.randn(2, 4, 3)
    assert fast._unbroadcast_parameters() is None
    torch.testing.assert_close(fast.log_prob(z), slow.log_prob(z))


def test_vamp_prior_with_the_diagonal_guide_is_the_mixture_of_its_posteriors():
    from ppl_vae.guides import DiagonalGaussianGuide

    guide = perturb(DiagonalGaussianGuide(data_dim=4, latent_dim=2, hidden_sizes=(8,)), 1)
    prior = perturb(PRIORS["vamp"](2, num_components=3, guide_net=guide, data_dim=4))
    z = torch.randn(7, 2)
    components = guide(prior.pseudo_inputs)
    expected = torch.logsumexp(components.log_prob(z.unsqueeze(-2)), dim=-1) - math.log(3)
    torch.testing.assert_close(prior().log_prob(z), expected)


def test_flow_prior_log_density_matches_the_autograd_jacobian():
    prior = make_prior("flow")
    transform = prior.density_transform()  # z -> u
    standard = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    for z in torch.randn(5, 2):
        jacobian = torch.autograd.functional.jacobian(transform, z)
        expected = standard.log_prob(transform(z)) + torch.linalg.slogdet(jacobian).logabsdet
        torch.testing.assert_close(prior().log_prob(z), expected, atol=1e-5, rtol=1e-5)


def test_iaf_guide_log_density_matches_the_autograd_jacobian():
    guide = perturb(IAFGuide(data_dim=4, latent_dim=3, hidden_sizes=(8,), num_flows=2))
    x = torch.rand(1, 4)
    q = guide(x)
    base, transforms = q.base_dist, q.transforms
    eps = base.sample()

    def forward(e):
        for t in transforms:
            e = t(e)
        return e

    z = forward(eps)
    jacobian = torch.autograd.functional.jacobian(lambda e: forward(e.unsqueeze(0)).squeeze(0), eps.squeeze(0))
    expected = base.log_prob(eps) - torch.linalg.slogdet(jacobian).logabsdet
    torch.testing.assert_close(q.log_prob(z), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_likelihood_is_normalized(name):
    likelihood = perturb(LIKELIHOODS[name]())
    # Decoder outputs that give a well-inside-the-support distribution (Beta with a, b > 1, so the
    # midpoint rule needs no care at the endpoints).
    pattern = [1.5, 2.0] if name == "beta" else [1.5, -1.0]
    out = torch.tensor([(pattern * likelihood.params_per_dim)[: likelihood.params_per_dim]])  # the mixture takes 3 K
    with torch.no_grad():
        if likelihood.data_kind == "binary":
            values = torch.tensor([[0.0], [1.0]])
            mass = likelihood(out).log_prob(values).exp().sum().item()
        elif likelihood.data_kind == "discrete":
            values = (torch.arange(256.0) / 255).unsqueeze(-1)
            mass = likelihood(out).log_prob(values).exp().sum().item()
        else:
            low, high = (-10.0, 11.0) if name in ("gaussian", "gaussian-learned", "laplace") else (0.0, 1.0)
            n = 400_001
            edges = torch.linspace(low, high, n, dtype=torch.float64)
            mid = ((edges[1:] + edges[:-1]) / 2).float().unsqueeze(-1)
            mass = likelihood(out).log_prob(mid).exp().double().sum().item() * (high - low) / (n - 1)
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_discretized_logistic_sums_to_one_in_the_tails_too():
    levels = (torch.arange(256.0) / 255).unsqueeze(-1)
    d = DiscretizedLogistic(torch.tensor([0.0, 0.5, 1.0, 0.2, 0.9]), torch.tensor([1e-3, 1e-3, 1e-3, 10.0, 0.05]))
    mass = d.log_prob(levels).exp().sum(0)
    torch.testing.assert_close(mass, torch.ones(5), atol=1e-5, rtol=0)


def test_beta_scales_exactly_the_kl_term():
    vae = VAE(VAEConfig(data_dim=12, latent_dim=3, hidden_sizes=(8,)))
    x = torch.bernoulli(torch.full((9, 12), 0.4))
    kl = elbo_decomposition(vae.model, vae.guide, x, num_samples=1)["kl"]["z"].sum().item()
    losses, weighted = {}, Weighted(vae)  # the KL weight as training applies it, to any program
    for beta in (1.0, 2.0, 3.5):
        weighted.kl_weight = beta
        pyro.set_rng_seed(5)
        losses[beta] = TraceMeanField_ELBO().loss(weighted.model, weighted.guide, x)
    # With analytic KL the reconstruction draw is the same for every beta (same seed), so the loss is
    # -reconstruction + beta * KL: its slope in beta is exactly the KL term, and nothing else moves.
    assert losses[2.0] - losses[1.0] == pytest.approx(kl, rel=1e-5)
    assert losses[3.5] - losses[2.0] == pytest.approx(1.5 * kl, rel=1e-5)
    weighted.kl_weight = 2.0
    unscaled = elbo_decomposition(vae.model, vae.guide, x, num_samples=1)["kl"]["z"].sum().item()
    assert unscaled == pytest.approx(kl, rel=1e-6), "evaluation ignores the KL weight"


def test_iwae_objective_is_the_per_datapoint_bound_and_equals_the_elbo_for_one_particle():
    vae = VAE(VAEConfig(data_dim=12, latent_dim=3, hidden_sizes=(8,)))
    x = torch.bernoulli(torch.full((9, 12), 0.4))
    pyro.set_rng_seed(3)
    iwae_1 = make_objective("iwae", 1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    elbo_1 = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert iwae_1 == pytest.approx(elbo_1, rel=1e-6)
    # RenyiELBO(alpha=0) with K particles against the per-datapoint bound from the same draws:
    # sum_n [logsumexp_k log w_kn - log K]. A bound over the whole batch would be far lower.
    pyro.set_rng_seed(4)
    renyi = -make_objective("iwae", 50).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    plan = plan_evaluation(vae.model, vae.guide, x, num_samples=50)
    (_, terms), = list(iter_chunk_terms(vae.model, vae.guide, x, plan))
    per_datapoint = (torch.logsumexp(terms.log_weight, 0) - math.log(50)).sum().item()
    whole_batch = (torch.logsumexp(terms.log_weight.sum(1), 0) - math.log(50)).item()
    assert renyi == pytest.approx(per_datapoint, rel=1e-5)
    assert renyi > whole_batch + 1.0


def test_iwae_objective_trains_and_tightens_the_bound():
    torch.manual_seed(0)
    lg = LinearGaussian(data_dim=5, latent_dim=2)
    x = lg.sample(64)
    guide_net = IAFGuide(data_dim=5, latent_dim=2, hidden_sizes=(16,), num_flows=1)

    def guide(data):
        pyro.module("guide", guide_net)
        with pyro.plate("data", data.shape[0]):
            pyro.sample("latent", guide_net(data))

    svi = SVI(lg.model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=make_objective("iwae", 5))
    before = elbo_decomposition(lg.model, guide, x, num_samples=200, kl="mc")["elbo"].mean().item()
    for _ in range(150):
        svi.step(x)
    after = elbo_decomposition(lg.model, guide, x, num_samples=200, kl="mc")["elbo"].mean().item()
    assert after > before + 1.0


def exact_fullcov_guide(lg: LinearGaussian) -> nn.Module:
    """A FullCovarianceGaussianGuide whose single linear layer outputs the exact posterior."""
    guide = FullCovarianceGaussianGuide(data_dim=lg.data_dim, latent_dim=lg.latent_dim, hidden_sizes=())
    W, s2, d = lg.W.double(), lg.noise**2, lg.latent_dim
    cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + W.T @ W / s2)
    gain = cov @ W.T / s2  # mean = gain (x - b)
    chol = torch.linalg.cholesky(cov)
    layer = guide.net[0]
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.weight[:d] = gain.float()
        layer.bias[:d] = -(gain @ lg.b.double()).float()
        layer.bias[d : 2 * d] = torch.log(torch.expm1(torch.diagonal(chol) - 1e-5)).float()  # softplus^-1
        layer.bias[2 * d :] = chol[guide.rows, guide.cols].float()
    return guide


def as_guide(guide_net: nn.Module):
    def guide(x):
        pyro.module("guide", guide_net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", guide_net(x))

    return guide


def test_full_covariance_guide_represents_the_exact_posterior():
    lg = LinearGaussian(data_dim=5, latent_dim=3, noise=0.6)
    x = lg.sample(10)
    guide = as_guide(exact_fullcov_guide(lg))
    exact = lg.log_evidence(x)
    elbo = elbo_decomposition(lg.model, guide, x, num_samples=20, kl="mc")["elbo"]
    torch.testing.assert_close(elbo, exact, atol=2e-4, rtol=0)
    plan = plan_evaluation(lg.model, guide, x, num_samples=32)
    for _, terms in iter_chunk_terms(lg.model, guide, x, plan):
        assert torch.all(terms.log_weight.max(0).values - terms.log_weight.min(0).values < 2e-4)


@pytest.mark.parametrize("guide_name", ["fullcov", "iaf"])
def test_importance_sampling_is_exact_with_the_other_guides(guide_name):
    lg = LinearGaussian(data_dim=5, latent_dim=2)
    x = lg.sample(6)
    net = {"fullcov": FullCovarianceGaussianGuide, "iaf": IAFGuide}[guide_name](5, 2, (8,))
    guide = as_guide(perturb(net, 2))
    estimate = evidence_estimate(lg.model, guide, x, num_samples=20000)
    exact = lg.log_evidence(x)
    assert torch.all(((estimate.log_evidence - exact) / estimate.stderr).abs() < 4)
    assert torch.all(elbo_decomposition(lg.model, guide, x, num_samples=500, kl="mc")["elbo"] < exact)


def test_unknown_names_list_the_choices():
    with pytest.raises(PplVaeError, match="choose one of standard, gaussian, mixture, vamp, flow"):
        VAEConfig(prior="cauchy")
    with pytest.raises(PplVaeError, match="choose one of elbo, meanfield, iwae"):
        make_objective("renyi")
    with pytest.raises(PplVaeError, match="VampPrior with the IAF guide"):
        VAEConfig(prior="vamp", guide="iaf")

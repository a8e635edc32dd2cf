"""AIS and BDMC against known answers: closed forms, a 1-D quadrature, and latent2d's 2-D quadrature.

Tolerances come from the chains' standard errors: the mean over N datapoints of log p̂(x) - log p(x) has
standard error sqrt(sum_n stderr_n^2) / N (the per-datapoint delta-method errors over chains).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from gaussian_models import LinearGaussian
from ppl_vae import latent2d
from ppl_vae.errors import InvalidDataError, ModelStructureError
from ppl_vae.evaluate import ais_log_evidence, bdmc, beta_schedule, evidence_estimate
from ppl_vae.model import VAE, VAEConfig
from structured_models import ConditionalGaussian, TwoLayerGaussian

FAST = dict(chains=8, leapfrog_steps=5)


def mean_error(estimate, exact):
    """The mean of log p̂(x) - log p(x) over the datapoints, and its standard error from the chains'."""
    difference = estimate.log_evidence - exact.double()
    return difference.mean().item(), estimate.stderr.pow(2).sum().sqrt().item() / len(difference)


@pytest.fixture(scope="module")
def hard():
    """6 latent dims, a sharp posterior, and a guide shifted off it and far too wide: IS struggles here."""
    lg = LinearGaussian(data_dim=12, latent_dim=6, noise=0.4)
    return lg, lg.diagonal_guide(shift=0.5, scale=1.0)


def test_schedules_run_from_0_to_1_and_increase():
    for schedule in ("sigmoid", "geometric"):
        betas = beta_schedule(50, schedule)
        assert betas[0] == 0 and betas[-1] == 1 and torch.all(betas[1:] > betas[:-1])
    sigmoid, geometric = beta_schedule(50, "sigmoid"), beta_schedule(50, "geometric")
    assert geometric[1] < 1e-3 < sigmoid[1]  # geometric is denser near the guide


def test_exact_posterior_guide_gives_every_chain_the_exact_weight():
    """With q = p(z | x) every f_β is p(x)^β q: log p - log q = log p(x) everywhere, so every log w is log p(x).

    In chunks of 4 of the 6 datapoints: each row's weights land on its own row."""
    lg = LinearGaussian(data_dim=5, latent_dim=2, noise=0.7)
    x = lg.sample(6)
    result = ais_log_evidence(lg.model, lg.exact_guide, x, steps=20, chains=4, leapfrog_steps=3, chunk_size=4)
    torch.testing.assert_close(result.log_weights, lg.log_evidence(x)[:, None].expand(6, 4), atol=1e-4, rtol=0)
    assert result.log_evidence.shape == result.stderr.shape == result.acceptance.shape == (6,)
    assert torch.all(result.acceptance > 0.3)  # the chains moved: the weights stayed exact while they did


def test_ais_with_a_poor_guide_is_within_error_of_exact_and_not_above():
    lg = LinearGaussian(data_dim=8, latent_dim=4, noise=0.5)
    pyro.set_rng_seed(0)
    x = lg.sample(20)
    result = ais_log_evidence(lg.model, lg.diagonal_guide(shift=0.5, scale=1.0), x, steps=100, **FAST)
    mean, stderr = mean_error(result, lg.log_evidence(x))
    assert abs(mean) < 4 * stderr, (mean, stderr)
    assert mean < 2 * stderr  # a lower bound in expectation: never significantly above
    assert stderr > 0.01  # the guide is poor: the chains' weights differ, so the check above is not trivial
    assert 0.4 < result.acceptance.mean() < 0.9  # step sizes adapted towards the 0.65 target
    assert result.settings["steps"] == 100 and result.settings["schedule"] == "sigmoid"


def test_ais_beats_importance_sampling_at_equal_model_evaluations(hard):
    lg, guide = hard
    pyro.set_rng_seed(1)
    x = lg.sample(20)
    exact = lg.log_evidence(x)
    result = ais_log_evidence(lg.model, guide, x, steps=50, **FAST)
    k = result.settings["model_gradients_per_datapoint"]
    importance = evidence_estimate(lg.model, guide, x, num_samples=k)
    ais_error = (result.log_evidence - exact).abs().mean()
    is_error = (importance.log_evidence - exact).abs().mean()
    assert ais_error < 0.6 * is_error, (ais_error, is_error)
    # Fewer steps, a worse bound: the schedule matters.
    coarse = ais_log_evidence(lg.model, guide, x, steps=10, **FAST)
    assert (coarse.log_evidence - exact).mean() < (result.log_evidence - exact).mean() - 1.0


def test_bdmc_bracket_contains_exact_and_shrinks_with_steps(hard):
    lg, guide = hard
    pyro.set_rng_seed(1)
    gaps = []
    for steps in (15, 100):
        result = bdmc(lg.model, guide, 12, data_like=torch.zeros(1, 12), steps=steps, **FAST)
        exact = lg.log_evidence(result.data[0])
        lower, lower_se = mean_error(result.lower, exact)
        upper, upper_se = mean_error(result.upper, exact)
        assert lower < 2 * lower_se and upper > -2 * upper_se, (steps, lower, upper)
        torch.testing.assert_close(result.gap, result.upper.log_evidence - result.lower.log_evidence)
        gaps.append(result.gap.mean().item())
    assert gaps[1] < 0.5 * gaps[0], gaps
    assert gaps[1] > 0  # the upper bound stays above the lower one


def test_two_site_hierarchy_with_a_bottom_up_guide():
    """q(z1 | x) q(z2 | z1): the guide is re-run at every leapfrog step (its z2 depends on z1)."""
    model = TwoLayerGaussian()
    pyro.set_rng_seed(2)
    x = model.sample(15)
    result = ais_log_evidence(model.model, model.mismatched_guide, x, steps=60, **FAST)
    mean, stderr = mean_error(result, model.log_evidence(x))
    assert abs(mean) < 4 * stderr + 0.02 and stderr > 0.005, (mean, stderr)
    importance = evidence_estimate(model.model, model.mismatched_guide, x, num_samples=8)  # AIS with T = 1
    assert (importance.log_evidence - model.log_evidence(x)).mean() < mean - 0.2


def test_conditional_program_gives_log_p_x_given_y():
    model = ConditionalGaussian()

    def shifted_guide(x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(model.latent_dim, dtype=torch.float64) + 0.5, 1.5).to_event(1))

    pyro.set_rng_seed(3)
    x, y = model.sample(20)
    result = ais_log_evidence(model.model, shifted_guide, x, y, steps=100, **FAST)
    mean, stderr = mean_error(result, model.log_evidence(x, y))
    assert abs(mean) < 4 * stderr + 0.02, (mean, stderr)


def test_positive_latent_site_is_annealed_in_unconstrained_space_with_its_jacobian():
    """A per-datapoint LogNormal scale: HMC runs on log s (biject_to), the density carries log |det J|."""
    dims = 6

    def model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.LogNormal(0.0, 0.7))
            pyro.sample("x", dist.Normal(torch.zeros(dims), s.unsqueeze(-1)).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("s", dist.Gamma(2.0 * torch.ones(x.shape[0]), 2.0))  # a different family: poor

    pyro.set_rng_seed(4)
    x = torch.randn(15, dims) * torch.linspace(0.3, 3.0, 15)[:, None]
    v = torch.linspace(-6, 6, 6001, dtype=torch.float64)  # v = log s: 1-D quadrature of p(x)
    log_joint = (dist.Normal(0.0, 0.7).log_prob(v)[None] +
                 dist.Normal(0.0, v.exp()[None, None]).log_prob(x.double()[:, :, None]).sum(1))
    exact = torch.logsumexp(log_joint, 1) + math.log(v[1] - v[0])
    result = ais_log_evidence(model, guide, x, steps=100, **FAST)
    mean, stderr = mean_error(result, exact)
    assert abs(mean) < 4 * stderr + 0.02, (mean, stderr)


def test_a_mixture_prior_is_annealed_on_its_components_support():
    """A Gaussian-mixture prior (MixtureSameFamily, as the mixture and VampPrior priors): z ~ sum_k pi_k N(mu_k, I),
    x | z ~ N(z, s^2 I), so p(x) = sum_k pi_k N(x; mu_k, (1 + s^2) I) in closed form. Its support constraint is a
    MixtureSameFamilyConstraint, which biject_to does not know: AIS must anneal it on the components' (real) support."""
    dims, noise = 2, 0.5
    pi = torch.tensor([0.3, 0.7])
    mu = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    prior = dist.MixtureSameFamily(dist.Categorical(pi), dist.Normal(mu, 1.0).to_event(1))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(z, noise).to_event(1), obs=x)

    def guide(x):  # one Gaussian for a bimodal-in-general posterior: poor
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.8 * x, 1.2).to_event(1))

    pyro.set_rng_seed(5)
    x = torch.randn(12, dims) * 2.0
    exact = torch.logsumexp(pi.log() + dist.Normal(mu, math.sqrt(1 + noise**2)).to_event(1).log_prob(x[:, None]), 1)
    result = ais_log_evidence(model, guide, x, steps=100, **FAST)
    mean, stderr = mean_error(result, exact)
    assert abs(mean) < 4 * stderr + 0.02, (mean, stderr)


def test_two_dimensional_vae_agrees_with_latent2d_quadrature():
    pyro.set_rng_seed(5)
    vae = VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,)))
    x = torch.bernoulli(torch.full((10, 784), 0.3))
    exact = latent2d.log_evidence_2d(vae, x, points=81, zoom_points=41).log_evidence
    result = ais_log_evidence(vae.model, vae.guide, x, steps=100, **FAST)
    mean, stderr = mean_error(result, exact)
    assert abs(mean) < 4 * stderr + 0.02, (mean, stderr)
    assert vae.training  # evaluation mode was restored


def test_discrete_latent_sites_and_bad_options_are_refused_in_one_line():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3))

    x = torch.randn(4)
    with pytest.raises(ModelStructureError, match="continuous latent sites.*'c' is discrete"):
        ais_log_evidence(model, guide, x, steps=5, chains=2)
    lg = LinearGaussian()
    x = lg.sample(3)
    for options, message in ((dict(schedule="linear"), "schedule"), (dict(target_accept=1.5), "target_accept"),
                             (dict(steps=0), "steps"), (dict(chains=2.5), "chains")):
        with pytest.raises(InvalidDataError, match=message):
            ais_log_evidence(lg.model, lg.exact_guide, x, **options)
    with pytest.raises(InvalidDataError, match="data_like"):
        bdmc(lg.model, lg.exact_guide, 3, data_like=torch.zeros(2, 5), steps=2)


def test_bdmc_refuses_a_model_that_observes_a_transformed_x():
    lg = LinearGaussian()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(torch.zeros(lg.latent_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ lg.W.T + lg.b, lg.noise).to_event(1), obs=2 * x)

    with pytest.raises(ModelStructureError, match="does not observe x as given"):
        bdmc(model, lg.exact_guide, 3, data_like=torch.zeros(1, 5), steps=2, chains=2)


def test_ais_bench_runs_at_tiny_sizes():
    from ppl_vae.bench import format_ais_benchmark, time_ais

    result = time_ais(torch.device("cpu"), num_examples=3, steps=3, chains=2, leapfrog_steps=1, repeats=1)
    assert result["decoder_passes"] == 1 * (3 - 1 + 3 - 1) + 2 and 0 < result["fraction_of_floor"]
    assert "of the floor" in format_ais_benchmark(result)

"""Diagnostics against closed forms: PSIS k-hat, per-dimension KL and active units, ELBO surgery, total correlation."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from gaussian_models import LinearGaussian
from ppl_vae.diagnostics import (
    active_units,
    collapse_report,
    elbo_surgery,
    importance_log_weights,
    kl_per_dimension,
    psis_diagnostics,
    total_correlation,
)
from ppl_vae.errors import InvalidDataError, ModelStructureError
from ppl_vae.evaluate import elbo_decomposition


@pytest.fixture
def lg():
    return LinearGaussian(data_dim=5, latent_dim=2, noise=0.7)


def posterior_covariance(lg) -> torch.Tensor:
    W = lg.W.double()
    return torch.linalg.inv(torch.eye(lg.latent_dim, dtype=torch.float64) + W.T @ W / lg.noise**2)


def data_covariance(lg) -> torch.Tensor:
    W = lg.W.double()
    return W @ W.T + lg.noise**2 * torch.eye(lg.data_dim, dtype=torch.float64)


def linear_diagonal_guide(lg, L: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """q(z | x) = N(L (x - b) + shift, diag(scale^2)): linear in x, so the aggregate posterior is Gaussian."""

    def guide(x):
        loc = (x.double() - lg.b.double()) @ L.T + shift
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.Normal(loc.float(), scale.float()).to_event(1))

    return guide


# --- importance weights and PSIS ------------------------------------------------------


def test_log_weights_fill_every_column_across_data_and_particle_chunks(lg):
    x = lg.sample(7)
    log_w = importance_log_weights(lg.model, lg.exact_guide, x, num_samples=30, chunk_size=3, particles_per_chunk=7)
    assert log_w.shape == (7, 30) and log_w.dtype == torch.float64
    # With the exact posterior every weight is p(x): an unwritten entry or a misplaced row would show.
    torch.testing.assert_close(log_w, lg.log_evidence(x)[:, None].expand(7, 30), atol=1e-4, rtol=0)


def pareto_log_weights(shapes, rows_per_shape: int, k: int, seed: int = 0) -> torch.Tensor:
    """log w = -shape * log U, U ~ Uniform(0, 1): w is Pareto with tail index 1/shape, so its k-hat is `shape`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(len(shapes) * rows_per_shape, k, generator=g, dtype=torch.float64)
    shape = torch.tensor(shapes, dtype=torch.float64).repeat_interleave(rows_per_shape)[:, None]
    return -shape * torch.log(u)


def test_khat_recovers_known_pareto_tails_row_by_row():
    shapes = [0.2, 0.6, 1.0]
    result = psis_diagnostics(pareto_log_weights(shapes, rows_per_shape=10, k=4000))
    khat = result["khat"].reshape(len(shapes), 10)
    # Each row is its own datapoint: the mean k-hat of each group finds its shape (the fit
    # uses ~190 tail draws, so a single k-hat has a standard error of about 0.1).
    torch.testing.assert_close(khat.mean(1), torch.tensor(shapes, dtype=torch.float64), atol=0.1, rtol=0)
    assert result["unreliable"].reshape(3, 10)[2].float().mean() > 0.8
    assert not result["unreliable"].reshape(3, 10)[0].any()
    assert result["unreliable_share"] == pytest.approx(result["unreliable"].double().mean().item())


def test_psis_estimate_keeps_the_scale_of_the_weights():
    log_w = pareto_log_weights([0.2], rows_per_shape=5, k=4000, seed=1)
    result = psis_diagnostics(log_w)
    # E[w] = 1 / (1 - 0.2); the mean of 4000 weights has a relative standard error of 0.4%.
    expected = torch.full((5,), math.log(1.25), dtype=torch.float64)
    torch.testing.assert_close(result["log_evidence"], expected, atol=0.02, rtol=0)
    torch.testing.assert_close(result["psis_log_evidence"], expected, atol=0.02, rtol=0)
    shifted = psis_diagnostics(log_w + 1234.5)
    torch.testing.assert_close(shifted["psis_log_evidence"], result["psis_log_evidence"] + 1234.5, atol=1e-9, rtol=0)
    torch.testing.assert_close(shifted["khat"], result["khat"])


def test_khat_is_small_for_good_guides_and_large_for_a_narrow_shifted_one(lg):
    x = lg.sample(20)
    exact = lg.log_evidence(x)

    def wide_guide(x):  # the exact posterior, 1.3 times wider: bounded weights
        loc, scale_tril = lg.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.MultivariateNormal(loc, scale_tril=1.3 * scale_tril))

    def narrow_guide(x):  # far too narrow and shifted: heavy-tailed weights
        loc, _ = lg.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.Normal(loc + 0.3, 0.05).to_event(1))

    perfect = psis_diagnostics(importance_log_weights(lg.model, lg.exact_guide, x, num_samples=1000))
    assert torch.all(perfect["khat"] < 0.5)  # constant weights (up to round-off): no tail at all
    torch.testing.assert_close(perfect["psis_log_evidence"], exact, atol=1e-4, rtol=0)

    good = psis_diagnostics(importance_log_weights(lg.model, wide_guide, x, num_samples=1000))
    assert torch.all(good["khat"] < 0.5) and good["unreliable_share"] == 0.0
    assert torch.all(good["ess"] > 500)
    # With a light tail, smoothing moves the estimate far less than its Monte Carlo error
    # (the delta-method standard error of log mean w, sqrt(1/ESS - 1/K)), and both find log p(x).
    stderr = torch.sqrt(1 / good["ess"] - 1 / 1000)
    assert torch.all((good["psis_log_evidence"] - good["log_evidence"]).abs() < 0.25 * stderr)
    assert torch.all((good["psis_log_evidence"] - exact).abs() < 4 * stderr)

    bad = psis_diagnostics(importance_log_weights(lg.model, narrow_guide, x, num_samples=1000))
    assert bad["khat"].median() > 0.7 and bad["unreliable_share"] >= 0.8
    assert torch.all(bad["ess"] < 250)  # against > 500 for the wide guide


def test_constant_and_tied_weights_get_no_pareto_fit():
    log_w = torch.randn(3, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_w[0] = -3.0 + 1e-5 * log_w[0]  # round-off around a constant: bounded weights
    log_w[1, :100], log_w[1, 100:] = 0.0, 1.0  # a tail of ties: no Pareto shape to fit
    result = psis_diagnostics(log_w)
    assert result["khat"][0] == -math.inf and result["khat"][1] == math.inf and math.isfinite(result["khat"][2])
    torch.testing.assert_close(result["psis_log_evidence"][:2], result["log_evidence"][:2])
    assert result["unreliable"].tolist() == [False, True, False]


def test_psis_refuses_too_few_draws_and_non_finite_weights():
    with pytest.raises(InvalidDataError, match="at least 25"):
        psis_diagnostics(torch.zeros(3, 10))
    log_w = torch.zeros(3, 100)
    log_w[1, 5] = -math.inf
    with pytest.raises(InvalidDataError, match="first at index 1"):
        psis_diagnostics(log_w)


# --- per-dimension KL, active units, collapse -------------------------------------------


def test_planted_collapsed_dimension_is_found():
    lg3 = LinearGaussian(data_dim=5, latent_dim=3, noise=0.7)
    cov = posterior_covariance(lg3)
    A = cov @ lg3.W.double().T / lg3.noise**2  # E[z | x] = A (x - b)
    A[2] = 0.0  # dimension 2 ignores x ...
    scale = torch.sqrt(torch.diagonal(cov)).clone()
    scale[2] = 1.0  # ... and equals the prior: zero KL, zero activity
    guide = linear_diagonal_guide(lg3, A, torch.zeros(3, dtype=torch.float64), scale)
    x = lg3.sample(2000)

    units = active_units(lg3.model, guide, x)
    assert units["num_active"] == 2 and units["active"].tolist() == [True, True, False]
    # Activity Var_x(E_q[z_d | x]) = (A Cov_x A^T)_dd; its sample estimate has relative error sqrt(2 / N).
    expected = torch.diagonal(A @ data_covariance(lg3) @ A.T)
    torch.testing.assert_close(units["activity"], expected, rtol=4 * math.sqrt(2 / 2000), atol=1e-12)

    kl = kl_per_dimension(lg3.model, guide, x, chunk_size=300)
    assert kl[2].abs() < 1e-6 and torch.all(kl[:2] > 0.5)
    analytic = elbo_decomposition(lg3.model, guide, x, num_samples=1)["kl"]["latent"].mean()
    assert kl.sum().item() == pytest.approx(analytic.item(), abs=1e-5)

    report = collapse_report(lg3.model, guide, x)
    assert report["dimensions_by_kl"][-1] == 2 and report["kl_sorted"] == sorted(report["kl_sorted"], reverse=True)
    assert report["collapsed_share"] == pytest.approx(1 / 3) and report["num_active"] == 2
    assert report["warning"] is None


def test_fully_collapsed_guide_gets_a_warning(lg):
    def prior_as_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    report = collapse_report(lg.model, prior_as_guide, lg.sample(50))
    assert report["num_active"] == 0 and report["collapsed_share"] == 1.0 and report["total_kl"] == 0.0
    assert "posterior collapse" in report["warning"] and "2 of 2" in report["warning"]


def test_non_diagonal_guide_and_ambiguous_site_are_refused(lg):
    with pytest.raises(ModelStructureError, match="not a diagonal Normal"):
        kl_per_dimension(lg.model, lg.exact_guide, lg.sample(4))

    def two_site_model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(a.sum(-1, keepdim=True) + b, 1.0).to_event(1), obs=x)

    def two_site_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("b", dist.Normal(0.5 * x, 1.0).to_event(1))

    x = torch.randn(6, 3)
    with pytest.raises(ModelStructureError, match=r"several latent sites \['a', 'b'\]"):
        active_units(two_site_model, two_site_guide, x)
    assert active_units(two_site_model, two_site_guide, x, site="b")["active"].shape == (3,)


# --- ELBO surgery and total correlation against the linear-Gaussian closed forms -----

# Allowance for the finite-N bias E[KL(q_N || q)] of the empirical aggregate posterior q_N at N = 2000.
# Its second-order value (E_x E_q(z|x)[q(z|x) / q(z)] - 1) / 2N, by Monte Carlo, is about 0.01 nats for
# the mixing guide below and 0.02 for the exact posterior; both are below the standard errors (0.02-0.04).
FINITE_N_BIAS = 0.03


def gaussian_aggregate_closed_forms(L, shift, scale, cov_x):
    """x ~ N(b, Cov_x) and q(z|x) = N(L (x - b) + shift, S), S = diag(scale^2): q(z) = N(shift, L Cov_x L^T + S)."""
    d = L.shape[0]
    S = torch.diag(scale**2)
    C = L @ cov_x @ L.T + S

    def kl_to_standard(mean, cov):
        return 0.5 * (torch.trace(cov) + mean @ mean - d - torch.logdet(cov))

    average_kl = 0.5 * (torch.trace(S) + torch.trace(L @ cov_x @ L.T) + shift @ shift - d - torch.logdet(S))
    marginal_kl = kl_to_standard(shift, C)
    c = torch.diagonal(C)
    return {
        "average_kl": average_kl.item(),
        "marginal_kl": marginal_kl.item(),
        "mutual_information": (average_kl - marginal_kl).item(),
        "total_correlation": 0.5 * (torch.log(c).sum() - torch.logdet(C)).item(),
        "dimensionwise_kl": (0.5 * (c + shift**2 - 1 - torch.log(c))).sum().item(),
    }


def test_elbo_surgery_and_total_correlation_match_the_gaussian_aggregate(lg):
    # A linear guide that mixes the posterior mean's coordinates (so the aggregate is correlated,
    # giving a total correlation well above 0), with a shift and a fixed diagonal scale.
    A = posterior_covariance(lg) @ lg.W.double().T / lg.noise**2
    L = torch.tensor([[1.5, 0.9], [0.0, 0.8]], dtype=torch.float64) @ A
    shift, scale = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    guide = linear_diagonal_guide(lg, L, shift, scale)
    exact = gaussian_aggregate_closed_forms(L, shift, scale, data_covariance(lg))
    x = lg.sample(2000, seed=5)

    surgery = elbo_surgery(lg.model, guide, x)
    factors = total_correlation(lg.model, guide, x, num_samples=2)
    estimates = {**surgery, **factors, "marginal_kl": surgery["marginal_kl"]}
    # The closed forms are population values, the estimates use the N = 2000 datapoints. The
    # standard errors cover the Monte Carlo noise and the sampling of x; on top of that, the
    # empirical aggregate posterior biases the marginal KL up and the MI down by E[KL(q_N || q)].
    for name, value in exact.items():
        estimate = estimates[name]
        assert abs(estimate["mean"] - value) < 4 * estimate["stderr"] + FINITE_N_BIAS, (name, estimate, value)
    assert exact["total_correlation"] > 0.1 and exact["marginal_kl"] > 0.5  # the checks are not about zeros
    assert surgery["kl_method"] == "analytic"
    # The decompositions hold exactly for the estimates, draw by draw.
    assert surgery["average_kl"]["mean"] == pytest.approx(
        surgery["mutual_information"]["mean"] + surgery["marginal_kl"]["mean"], abs=1e-9
    )
    assert factors["marginal_kl"]["mean"] == pytest.approx(
        factors["total_correlation"]["mean"] + factors["dimensionwise_kl"]["mean"], abs=1e-9
    )
    assert sum(factors["dimensionwise_kl"]["per_dimension"]) == pytest.approx(factors["dimensionwise_kl"]["mean"])


def test_exact_posterior_as_guide_has_the_prior_as_aggregate(lg):
    """Any guide distribution works for ELBO surgery: with the exact posterior (a MultivariateNormal),
    q(z) = p(z), so the marginal KL is 0 and MI = average KL = -1/2 log det Sigma."""
    x = lg.sample(2000, seed=6)
    result = elbo_surgery(lg.model, lg.exact_guide, x, num_samples=2)
    assert result["kl_method"] == "monte carlo"
    mi = -0.5 * torch.logdet(posterior_covariance(lg)).item()
    assert abs(result["marginal_kl"]["mean"]) < 4 * result["marginal_kl"]["stderr"] + FINITE_N_BIAS
    assert abs(result["mutual_information"]["mean"] - mi) < 4 * result["mutual_information"]["stderr"] + FINITE_N_BIAS


def test_mutual_information_saturates_at_log_n_for_few_separated_datapoints(lg):
    """With N = 16 datapoints whose posteriors do not overlap, q(z) ~ q(z | x_n) / N near each draw: MI = log N."""
    A = posterior_covariance(lg) @ lg.W.double().T / lg.noise**2
    guide = linear_diagonal_guide(lg, 10 * A, torch.zeros(2, dtype=torch.float64), torch.full((2,), 0.01))
    result = elbo_surgery(lg.model, guide, lg.sample(16, seed=7), num_samples=100)
    assert result["mutual_information_bound"] == pytest.approx(math.log(16))
    # The estimate is unbiased for the saturated value, not bounded by it draw by draw.
    mi = result["mutual_information"]
    assert abs(mi["mean"] - math.log(16)) < 4 * mi["stderr"] and mi["stderr"] < 0.1


def test_every_diagnostic_runs_on_the_package_vae():
    from ppl_vae.model import VAE, VAEConfig

    vae = VAE(VAEConfig(data_dim=6, latent_dim=3, hidden_sizes=(8,)))
    x = torch.bernoulli(torch.full((40, 6), 0.5, dtype=torch.float32), generator=torch.Generator().manual_seed(0))
    report = collapse_report(vae.model, vae.guide, x, chunk_size=16)
    assert report["site"] == "z" and len(report["kl_per_dimension"]) == 3
    kl_term = elbo_decomposition(vae.model, vae.guide, x, num_samples=1)["kl"]["z"].mean().item()
    assert report["total_kl"] == pytest.approx(kl_term, abs=1e-5)
    surgery = elbo_surgery(vae.model, vae.guide, x, chunk_size=16)
    assert surgery["average_kl"]["mean"] == pytest.approx(kl_term, abs=1e-5)
    assert set(total_correlation(vae.model, vae.guide, x)) >= {"total_correlation", "dimensionwise_kl"}
    result = psis_diagnostics(importance_log_weights(vae.model, vae.guide, x, num_samples=100))
    assert result["khat"].shape == (40,) and torch.all(torch.isfinite(result["khat"]))


def test_active_units_are_counted_with_a_mixture_prior():
    """The collapse report needs a diagonal prior; active units need only a diagonal guide."""
    from ppl_vae.diagnostics import diagnostics_summary, evidence_with_psis
    from ppl_vae.model import VAE, VAEConfig

    vae = VAE(VAEConfig(data_dim=20, latent_dim=3, hidden_sizes=(8,), prior="mixture", prior_components=3))
    x = torch.bernoulli(torch.full((50, 20), 0.3))
    _, psis = evidence_with_psis(vae.model, vae.guide, x, num_samples=30)
    summary = diagnostics_summary(vae.model, vae.guide, x, psis=psis)
    assert "unavailable" in summary["sites"]["z"]["collapse"]
    assert summary["sites"]["z"]["active_units"] == active_units(vae.model, vae.guide, x)["num_active"]

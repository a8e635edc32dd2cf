"""Evidence numbers for every program structure: bottom-up hierarchies, conditioning data, several latent sites.

Known answers from the closed-form Gaussian programs of ``structured_models.py``.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from gaussian_models import LinearGaussian
from structured_models import ConditionalGaussian, TwoLayerGaussian
from torch.distributions import kl_divergence

import ppl_vae.chunking as chunking
import ppl_vae.inspection as inspection
from ppl_vae.diagnostics import (
    active_units,
    collapse_report,
    diagnostics_summary,
    elbo_surgery,
    evidence_with_psis,
    importance_log_weights,
    kl_per_dimension,
    total_correlation,
)
from ppl_vae.distributed import evaluate_per_datapoint
from ppl_vae.errors import EvaluationMemoryWarning, InvalidDataError, ModelStructureError
from ppl_vae.evaluate import (
    elbo_decomposition,
    evaluation_summary,
    evidence_estimate,
    iter_chunk_terms,
    log_evidence,
    plan_evaluation,
    trace_pair,
)
from ppl_vae.objectives import check_meanfield
from ppl_vae.report import format_diagnostics, format_evaluation

# --- 1. Bottom-up hierarchies ------------------------------------------------------------


@pytest.fixture
def two_layer():
    return TwoLayerGaussian()


def test_bottom_up_exact_guide_gives_elbo_equal_to_log_evidence_per_datapoint(two_layer):
    x = two_layer.sample(40)
    exact = two_layer.log_evidence(x)
    # Monte Carlo KL at every site: each draw's log-weight is log p(x), so the ELBO is exact draw by draw.
    parts = elbo_decomposition(two_layer.model, two_layer.exact_guide, x, num_samples=20, kl="mc")
    torch.testing.assert_close(parts["elbo"], exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_evidence(two_layer.model, two_layer.exact_guide, x, num_samples=7),
                               exact, atol=1e-6, rtol=0)
    # The default: z1's model parent z2 is drawn after it in the guide, so its analytic KL would be
    # wrong and it falls back to Monte Carlo; z2's analytic KL (given the guide's z1) is right.
    k = 4000
    parts = elbo_decomposition(two_layer.model, two_layer.exact_guide, x, num_samples=k)
    assert parts["kl_method"] == {"z2": "analytic", "z1": "monte carlo"}
    assert "['z2']" in parts["kl_reason"]["z1"] and "drawn after it in the guide" in parts["kl_reason"]["z1"]
    torch.testing.assert_close(parts["elbo"], parts["reconstruction"] - parts["kl"]["z1"] - parts["kl"]["z2"],
                               atol=1e-12, rtol=0)
    # The analytic term replaces one draw-dependent term by its expectation, so single draws no longer
    # cancel to log p(x) exactly: unbiased, checked per datapoint within 4 Monte Carlo standard errors.
    plan = plan_evaluation(two_layer.model, two_layer.exact_guide, x, num_samples=200)
    draws = torch.cat([(t.reconstruction - t.kl["z1"] - t.kl["z2"]).double()
                       for _, t in iter_chunk_terms(two_layer.model, two_layer.exact_guide, x, plan)])
    stderr = draws.std(0) / math.sqrt(k)
    assert torch.all((parts["elbo"] - exact).abs() < 4 * stderr + 1e-9), ((parts["elbo"] - exact) / stderr).abs().max()
    assert stderr.max() < 0.03  # tight enough to see the analytic rule's bias at z1 (next test)


def test_the_analytic_kl_rule_at_z1_would_be_wrong(two_layer):
    """The case discriminates: KL(q(z1|x) || p(z1|z2)) at the guide's z2 misses log p(x) by far more than 1e-6."""
    x = two_layer.sample(40)
    model_trace, guide_trace = trace_pair(two_layer.model, two_layer.exact_guide, x, 2000, 1)
    q1, p1 = guide_trace.nodes["z1"]["fn"], model_trace.nodes["z1"]["fn"]
    q2, p2 = guide_trace.nodes["z2"]["fn"], model_trace.nodes["z2"]["fn"]
    reconstruction = model_trace.nodes["x"]["fn"].log_prob(x).mean(0)
    naive = reconstruction - kl_divergence(q1, p1).mean(0) - kl_divergence(q2, p2).mean(0)
    assert (naive - two_layer.log_evidence(x)).abs().max() > 0.1


def test_bottom_up_mismatched_guide_agrees_with_trace_elbo(two_layer):
    x = two_layer.sample(30)
    k = 4000
    pyro.set_rng_seed(1)
    ours = elbo_decomposition(two_layer.model, two_layer.mismatched_guide, x, num_samples=k)["elbo"].sum().item()
    # Monte Carlo error of a k-draw average of the ELBO summed over the datapoints, from per-draw values.
    plan = plan_evaluation(two_layer.model, two_layer.mismatched_guide, x, num_samples=k, kl="mc")
    per_draw = torch.cat([t.log_weight.double().sum(1) for _, t in iter_chunk_terms(
        two_layer.model, two_layer.mismatched_guide, x, plan)])
    stderr = per_draw.std().item() / math.sqrt(k)
    pyro.set_rng_seed(2)
    trace_elbo = -Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1).loss(
        two_layer.model, two_layer.mismatched_guide, x)
    assert abs(ours - trace_elbo) < 4 * math.sqrt(2) * stderr, (ours, trace_elbo, stderr)
    assert ours < two_layer.log_evidence(x).sum().item()


def test_dependencies_are_tracked_not_guessed_from_the_order():
    """Independent sites drawn in another order than the model's keep their analytic KL (provenance, not order)."""
    def model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(a.sum(-1, keepdim=True) + b, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Normal(0.5 * x, 1.0).to_event(1))
            pyro.sample("a", dist.Normal(torch.zeros(2), 0.7).to_event(1))

    parts = elbo_decomposition(model, guide, torch.randn(6, 3), num_samples=3)
    assert parts["kl_method"] == {"a": "analytic", "b": "analytic"} and parts["kl_reason"] == {}
    plan = plan_evaluation(model, guide, torch.randn(6, 3), num_samples=1)
    assert plan.structure.dependencies == "provenance"
    assert plan.structure.model_parents == {"a": set(), "b": set()}


def test_where_provenance_fails_the_site_order_decides(monkeypatch, two_layer):
    def fail(*args, **kwargs):
        raise NotImplementedError("no provenance here")

    monkeypatch.setattr(inspection, "get_dependencies", fail)
    x = two_layer.sample(10)
    plan = plan_evaluation(two_layer.model, two_layer.exact_guide, x, num_samples=1)
    assert plan.structure.dependencies == "site order"
    assert plan.structure.kl_methods == {"z2": "analytic", "z1": "monte carlo"}
    assert "site order" in plan.structure.kl_reasons["z1"]


def test_one_latent_site_has_no_parents_without_running_provenance_tracking(monkeypatch):
    """With one latent site there is no other site to depend on: the same parents as provenance tracking finds,
    and the programs are not run again to find them (an evaluation inspects the program once per chunk)."""
    linear = LinearGaussian(data_dim=3, latent_dim=2)
    model, guide, x = linear.model, linear.diagonal_guide(), linear.sample(6)
    track = inspection.get_dependencies
    assert set(track(model, (x,))["prior_dependencies"]["latent"]) - {"latent"} == set()  # no other latent parent
    calls = []
    monkeypatch.setattr(inspection, "get_dependencies", lambda *args, **kwargs: calls.append(args) or track(*args, **kwargs))
    structure = plan_evaluation(model, guide, x, num_samples=1).structure
    assert calls == []  # the programs were not run again to find them
    assert structure.model_parents == structure.guide_parents == {"latent": set()}
    assert structure.dependencies == inspection.ONE_LATENT_SITE and structure.kl_methods == {"latent": "analytic"}


def test_meanfield_training_refuses_a_program_that_breaks_its_condition(two_layer):
    x = two_layer.sample(5)
    with pytest.raises(ModelStructureError, match=r"TraceMeanField_ELBO.*'z1'.*\['z2'\].*--objective elbo"):
        check_meanfield(two_layer.model, two_layer.exact_guide, x)
    from ppl_vae.model import VAE, VAEConfig

    vae = VAE(VAEConfig(data_dim=6, latent_dim=2, hidden_sizes=(4,)))
    check_meanfield(vae.model, vae.guide, torch.bernoulli(torch.full((3, 6), 0.5)))  # one site: nothing to refuse


def test_evaluation_table_says_why_a_site_fell_back(two_layer):
    x = two_layer.sample(20)
    result = evaluation_summary(two_layer.model, two_layer.exact_guide, x, num_samples=5, elbo_samples=2)
    assert result["kl"]["sites"]["z1"]["method"] == "monte carlo" and "reason" not in result["kl"]["sites"]["z2"]
    table = format_evaluation(result)
    assert "KL at site 'z1' (monte carlo)" in table
    assert "KL at site 'z1' is Monte Carlo: its model parent(s) ['z2'] are drawn after it in the guide" in table


# --- 2. Conditioning data ------------------------------------------------------------------


@pytest.fixture
def conditional():
    return ConditionalGaussian()


def test_conditional_program_in_small_chunks_gives_the_exact_log_evidence(conditional):
    x, y = conditional.sample(257)
    exact = conditional.log_evidence(x, y)
    estimate = evidence_estimate(conditional.model, conditional.exact_guide, x, y, num_samples=8, chunk_size=50,
                                 particles_per_chunk=3)
    torch.testing.assert_close(estimate.log_evidence, exact, atol=1e-6, rtol=0)
    parts = elbo_decomposition(conditional.model, conditional.exact_guide, x, y, num_samples=4, chunk_size=50, kl="mc")
    torch.testing.assert_close(parts["elbo"], exact, atol=1e-6, rtol=0)
    log_w = importance_log_weights(conditional.model, conditional.exact_guide, x, y, num_samples=5, chunk_size=50)
    torch.testing.assert_close(log_w, exact[:, None].expand(257, 5), atol=1e-6, rtol=0)
    evidence, _ = evidence_with_psis(conditional.model, conditional.exact_guide, x, y, num_samples=30, chunk_size=50)
    torch.testing.assert_close(evidence.log_evidence, exact, atol=1e-6, rtol=0)


def test_conditioning_data_are_sliced_into_blocks_and_out_of_memory_retries(monkeypatch, conditional):
    x, y = conditional.sample(257)
    exact = conditional.log_evidence(x, y)
    per_datapoint = evaluate_per_datapoint(conditional.model, conditional.exact_guide, x, y, num_samples=4,
                                           elbo_samples=2, block_size=64, chunk_size=20)
    torch.testing.assert_close(per_datapoint.evidence.log_evidence, exact, atol=1e-6, rtol=0)
    chunk_terms = chunking.chunk_terms

    def flaky(model, guide, data, k, structure):  # rows x particles above 40 do not fit
        assert all(value.shape[0] == data[0].shape[0] for value in data)
        if data[0].shape[0] * k > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return chunk_terms(model, guide, data, k, structure)

    monkeypatch.setattr(chunking, "chunk_terms", flaky)
    with pytest.warns(EvaluationMemoryWarning):
        retried = log_evidence(conditional.model, conditional.exact_guide, x, y, num_samples=8, chunk_size=50,
                               particles_per_chunk=8)
    torch.testing.assert_close(retried, exact, atol=1e-6, rtol=0)


def test_conditioning_data_of_another_length_is_a_clear_error(conditional):
    x, y = conditional.sample(10)
    with pytest.raises(InvalidDataError, match=r"data argument 2 .* shape \[9\], but x has 10 datapoints"):
        log_evidence(conditional.model, conditional.exact_guide, x, y[:9], num_samples=5)
    with pytest.raises(InvalidDataError, match="options are keyword-only .*num_samples=5"):
        log_evidence(conditional.model, conditional.exact_guide, x, 5)


def test_diagnostics_take_conditioning_data(conditional):
    x, y = conditional.sample(60)
    summary = diagnostics_summary(conditional.model, conditional.exact_guide, x, y)
    assert set(summary["sites"]) == {"z"}
    # A MultivariateNormal guide: no per-dimension KL, but ELBO surgery works for any guide of x alone.
    assert "not a diagonal Normal" in summary["sites"]["z"]["collapse"]["unavailable"]
    assert "average_kl" in summary["sites"]["z"]["elbo_surgery"]


# --- Options and messages ----------------------------------------------------------------


def test_integral_options_are_accepted_and_bools_refused(conditional):
    x, y = conditional.sample(6)
    values = log_evidence(conditional.model, conditional.exact_guide, x, y, num_samples=np.int64(3))
    torch.testing.assert_close(values, conditional.log_evidence(x, y), atol=1e-6, rtol=0)
    with pytest.raises(InvalidDataError, match="num_samples must be a positive integer, got True"):
        log_evidence(conditional.model, conditional.exact_guide, x, y, num_samples=True)


def test_nan_in_the_data_is_named_as_nan(conditional):
    x, y = conditional.sample(6)
    x[4, 1] = math.nan
    with pytest.raises(InvalidDataError, match=r"x holds NaN values: 1 entries in 1 datapoint\(s\), the first at index 4"):
        elbo_decomposition(conditional.model, conditional.exact_guide, x, y)


def test_one_sample_has_an_undefined_monte_carlo_error(conditional):
    x, y = conditional.sample(6)
    estimate = evidence_estimate(conditional.model, conditional.exact_guide, x, y, num_samples=1)
    assert torch.isnan(estimate.stderr).all()
    result = evaluation_summary(conditional.model, conditional.exact_guide, x, y, num_samples=1, elbo_samples=1)
    assert result["log_evidence"]["mean_mc_stderr"] is None
    assert "undefined with K=1" in format_evaluation(result)


# --- 3. Diagnostics for every latent site --------------------------------------------------


class DiagonalTwoLayer:
    """p(z2) p(z1 | z2) p(x | z1) with diagonal Normals, and a bottom-up guide q(z1 | x) q(z2 | z1)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.A, self.W = torch.randn(3, 2, generator=g), torch.randn(5, 3, generator=g)
        self.E1, self.E2 = torch.randn(3, 5, generator=g), torch.randn(2, 3, generator=g)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T, 0.5).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.W.T, 0.3).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x @ self.E1.T, 0.4).to_event(1))
            pyro.sample("z2", dist.Normal(z1 @ self.E2.T, 0.6).to_event(1))


def test_diagnostics_are_computed_for_every_site_that_allows_them():
    program = DiagonalTwoLayer()
    x = torch.randn(200, 5)
    summary = diagnostics_summary(program.model, program.guide, x)
    z1, z2 = summary["sites"]["z1"], summary["sites"]["z2"]
    # z1: its guide depends on x alone (active units), but its prior depends on z2, drawn after it.
    assert isinstance(z1["active_units"], int)
    assert "['z2'] are drawn after it in the guide" in z1["collapse"]["unavailable"]
    assert "its guide depends" in z1["elbo_surgery"]["unavailable"] or "prior depends" in z1["elbo_surgery"]["unavailable"]
    # z2: its prior has no parents and its parent in the guide comes first: KL per dimension holds,
    # but q(z2 | x) is a mixture over z1, so no posterior mean and no aggregate posterior.
    assert len(z2["collapse"]["kl_per_dimension"]) == 2
    assert "guide depends on latent site(s) ['z1']" in z2["active_units"]["unavailable"]
    assert "guide depends on latent site(s) ['z1']" in z2["elbo_surgery"]["unavailable"]
    table = format_diagnostics(summary)
    assert "site 'z1': active units" in table and "site 'z2': ELBO surgery: not available" in table
    # The per-dimension KL of z2 sums to its KL term in expectation over z1 (one draw per datapoint here).
    analytic = elbo_decomposition(program.model, program.guide, x, num_samples=200)["kl"]["z2"].mean().item()
    assert sum(z2["collapse"]["kl_per_dimension"]) == pytest.approx(analytic, rel=0.05)


def test_independent_sites_each_get_every_diagnostic_with_the_right_kl():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.cat([a, b], -1), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(0.5 * x[:, :2], 0.6).to_event(1))
            pyro.sample("b", dist.Normal(0.7 * x[:, 2:], 0.5).to_event(1))

    x = torch.randn(300, 5)
    summary = diagnostics_summary(model, guide, x)
    parts = elbo_decomposition(model, guide, x, num_samples=1)
    for name, dims in (("a", 2), ("b", 3)):
        site = summary["sites"][name]
        assert site["active_units"] == dims
        # No draws enter the per-dimension KL of a guide of x alone: it equals the analytic KL term exactly.
        assert sum(site["collapse"]["kl_per_dimension"]) == pytest.approx(parts["kl"][name].mean().item(), abs=1e-5)
        assert site["elbo_surgery"]["average_kl"]["mean"] == pytest.approx(parts["kl"][name].mean().item(), abs=1e-5)
        assert "total_correlation" in site["total_correlation"]
        torch.testing.assert_close(kl_per_dimension(model, guide, x, site=name).sum(),
                                   parts["kl"][name].mean(), atol=1e-5, rtol=0)
    assert active_units(model, guide, x, site="b")["num_active"] == 3
    assert collapse_report(model, guide, x, site="a")["site"] == "a"
    assert elbo_surgery(model, guide, x, site="b")["site"] == "b"
    assert total_correlation(model, guide, x, site="a")["site"] == "a"

"""Diagnostics of discrete latent sites (Categorical, OneHotCategorical, Bernoulli) against closed forms.

The guide's q(y | x_n) is a known function of x (a softmax of x @ W), so the test computes, from the same
probabilities, KL_n = sum_y q(y|x_n) log(q(y|x_n) / p(y)), the aggregate posterior q(y) = mean_n q(y|x_n),
the mutual information I = H(q(y)) - mean_n H(q(y|x_n)) and the marginal KL(q(y) || p(y)).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.diagnostics import diagnostics_summary
from ppl_vae.report import format_diagnostics

CLASSES, DIM, N = 4, 3, 40


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    weights = 1.5 * torch.randn(DIM, CLASSES, generator=g, dtype=torch.float64)
    prior = torch.softmax(torch.randn(CLASSES, generator=g, dtype=torch.float64), -1)
    means = 2.0 * torch.randn(CLASSES, DIM, generator=g, dtype=torch.float64)
    return x, weights, prior, means


class CategoricalMixture:
    """p(y) p(x | y) with y one of C classes, and a classifier q(y | x) = softmax(x W): written in three ways."""

    def __init__(self, kind: str):
        self.kind = kind
        _, self.weights, self.prior, self.means = _setup()
        if kind == "Bernoulli":  # two classes: y = 1 with probability q_1
            self.prior, self.means = self.prior[:2] / self.prior[:2].sum(), self.means[:2]

    def guide_probs(self, x):
        logits = x @ self.weights
        return torch.softmax(logits[:, : len(self.prior)], -1)

    def _distribution(self, probs):
        if self.kind == "Categorical":
            return dist.Categorical(probs=probs)
        if self.kind == "OneHotCategorical":
            return dist.OneHotCategorical(probs=probs)
        return dist.Bernoulli(probs=probs[..., 1])

    def _class_means(self, y):
        if self.kind == "OneHotCategorical":
            return y @ self.means
        return self.means[y.long()]

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", self._distribution(self.prior.expand(x.shape[0], -1)))
            pyro.sample("x", dist.Normal(self._class_means(y), 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", self._distribution(self.guide_probs(x)))


def _entropy(p):
    return -torch.xlogy(p, p).sum(-1)


@pytest.mark.parametrize("kind", ["Categorical", "OneHotCategorical", "Bernoulli"])
def test_kl_and_elbo_surgery_of_a_discrete_site_equal_their_closed_forms(kind):
    program = CategoricalMixture(kind)
    x = _setup()[0]
    q, p = program.guide_probs(x), program.prior
    kl = (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)
    aggregate = q.mean(0)
    mutual_information = _entropy(aggregate) - _entropy(q).mean()
    marginal_kl = (torch.xlogy(aggregate, aggregate) - torch.xlogy(aggregate, p)).sum()

    site = diagnostics_summary(program.model, program.guide, x)["sites"]["y"]
    assert site["kind"] == "discrete"
    assert site["kl"]["mean"] == pytest.approx(kl.mean().item(), rel=1e-6)
    assert site["kl"]["stderr"] == pytest.approx(kl.std().item() / math.sqrt(N), rel=1e-6)
    surgery = site["elbo_surgery"]
    assert surgery["mutual_information"]["mean"] == pytest.approx(mutual_information.item(), rel=1e-6)
    assert surgery["marginal_kl"]["mean"] == pytest.approx(marginal_kl.item(), rel=1e-6)
    assert surgery["average_kl"]["mean"] == pytest.approx(kl.mean().item(), rel=1e-6)
    assert surgery["class_probabilities"]["aggregate_posterior"] == pytest.approx(aggregate.tolist(), rel=1e-6)
    assert surgery["class_probabilities"]["prior"] == pytest.approx(p.tolist(), rel=1e-6)
    # What is not defined for a discrete site says why, in terms of the site, never in those of a Normal.
    for name in ("active_units", "collapse", "total_correlation"):
        reason = site[name]["unavailable"]
        assert "site 'y' is discrete" in reason and "Normal(loc" not in reason, (name, reason)
    table = format_diagnostics(diagnostics_summary(program.model, program.guide, x))
    assert "KL(q || p) of the discrete site" in table and "class probabilities" in table
    assert "dist.Normal" not in table


def test_a_classifier_that_ignores_x_is_reported_as_collapsed():
    program = CategoricalMixture("Categorical")
    program.weights = torch.zeros_like(program.weights)  # q(y | x) = uniform for every x: I(x; y) = 0
    x = _setup()[0]
    site = diagnostics_summary(program.model, program.guide, x)["sites"]["y"]
    assert site["elbo_surgery"]["mutual_information"]["mean"] == pytest.approx(0.0, abs=1e-12)
    uniform = torch.full((CLASSES,), 1.0 / CLASSES, dtype=torch.float64)
    expected = (uniform * (uniform.log() - program.prior.log())).sum().item()
    assert site["kl"]["mean"] == pytest.approx(expected, rel=1e-6)  # KL(uniform || p(y)), the same for every x
    assert "I(x; y)" in site["kl"]["warning"] and "barely depends on x" in site["kl"]["warning"]


class BinaryCode:
    """A vector of D independent bits: a discrete site that is not one categorical variable."""

    def __init__(self):
        _, self.weights, _, _ = _setup()

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            bits = pyro.sample("bits", dist.Bernoulli(probs=x.new_full((x.shape[0], CLASSES), 0.3)).to_event(1))
            pyro.sample("x", dist.Normal(bits[..., :DIM], 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("bits", dist.Bernoulli(logits=x @ self.weights).to_event(1))


def test_a_vector_of_bits_gets_its_kl_surgery_and_active_units_and_reasons_that_fit():
    program = BinaryCode()
    program.weights[:, -1] = 0.0  # the last bit ignores x: an inactive unit
    x = _setup()[0]
    q = torch.sigmoid(x @ program.weights)  # [N, D]: q(bit_d = 1 | x_n)
    expected_kl = (torch.xlogy(q, q / 0.3) + torch.xlogy(1 - q, (1 - q) / 0.7)).sum(-1)
    # The aggregate posterior over the 2^D joint values, summed exactly here; the diagnostics estimate it.
    codes = torch.tensor([[(c >> d) & 1 for d in range(CLASSES)] for c in range(2**CLASSES)], dtype=torch.float64)
    joint = torch.exp((torch.xlogy(codes, q[:, None]) + torch.xlogy(1 - codes, 1 - q[:, None])).sum(-1))  # [N, 2^D]
    mutual_information = _entropy(joint.mean(0)) - _entropy(joint).mean()
    site = diagnostics_summary(program.model, program.guide, x)["sites"]["bits"]
    assert site["kl"]["method"] == "analytic"
    assert site["kl"]["mean"] == pytest.approx(expected_kl.mean().item(), rel=1e-6)
    surgery = site["elbo_surgery"]
    assert surgery["average_kl"]["mean"] == pytest.approx(expected_kl.mean().item(), rel=1e-6)
    assert abs(surgery["mutual_information"]["mean"] - mutual_information.item()) < 4 * surgery["mutual_information"]["stderr"]
    assert site["active_units"] == int((q.var(0) > 0.01).sum()) == CLASSES - 1
    for name in ("collapse", "total_correlation"):
        reason = site[name]["unavailable"]
        assert "site 'bits' is discrete (Independent(Bernoulli))" in reason and "Normal(loc" not in reason

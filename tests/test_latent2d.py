"""Grid integration over a 2-D latent space: closed forms, both code paths, and a trained MNIST VAE against importance sampling."""

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from conftest import write_small_mnist
from gaussian_models import LinearGaussian
from ppl_vae import latent2d
from ppl_vae.errors import InvalidDataError, ModelStructureError
from ppl_vae.evaluate import elbo_decomposition, evidence_estimate, iter_chunk_terms, plan_evaluation
from ppl_vae.model import VAE, VAEConfig
from ppl_vae.programs import Weighted
from ppl_vae.train import TrainConfig, load_run, train


@pytest.fixture
def lg():
    return LinearGaussian(data_dim=5, latent_dim=2, noise=0.7)


def test_grid_evidence_matches_the_closed_form_of_a_linear_gaussian_model(lg):
    x = lg.sample(8)
    exact = lg.log_evidence(x)
    for zoom in (False, True):
        result = latent2d.log_evidence_2d(lg.model, x, bounds=(-6.0, 6.0), points=201, zoom=zoom)
        torch.testing.assert_close(result.log_evidence, exact, atol=2e-5, rtol=0)
        assert torch.all(result.error < 1e-5) and torch.all(result.edge_mass < 1e-9)
        # The error estimate covers the actual error (up to float32 rounding of the log-densities).
        assert torch.all((result.log_evidence - exact).abs() <= result.error + 2e-5)
    zoomed = latent2d.log_evidence_2d(lg.model, x, bounds=(-6.0, 6.0), points=201)
    assert torch.all(zoomed.high - zoomed.low < 12.0)  # the local boxes are smaller than the global one


def test_grid_posterior_has_the_closed_form_mean_and_covariance(lg):
    x = lg.sample(4)
    z1, z2, log_posterior = latent2d.grid_log_posterior(lg.model, x, -6.0, 6.0, 201)
    h = (12.0 / 200) ** 2
    density = log_posterior.exp()
    assert torch.allclose(density.sum((1, 2)) * h, torch.ones(4, dtype=torch.float64), atol=1e-3)  # trapezoid vs plain sum
    z = torch.stack([z1[:, :, None].expand_as(density), z2[:, None, :].expand_as(density)], -1)  # [N, P, P, 2]
    weights = density[..., None] / density.sum((1, 2))[:, None, None, None]
    mean = (weights * z).sum((1, 2))
    loc, scale_tril = lg.posterior(x)
    torch.testing.assert_close(mean, loc.double(), atol=1e-5, rtol=0)
    centred = z - mean[:, None, None, :]
    covariance = (weights[..., None] * centred[..., :, None] * centred[..., None, :]).sum((1, 2))
    exact_covariance = (scale_tril @ scale_tril.T).double()
    torch.testing.assert_close(covariance, exact_covariance.expand_as(covariance), atol=1e-5, rtol=0)


def test_error_estimates_cover_the_error_of_resolved_grids_and_flag_the_rest(lg):
    x = lg.sample(6)
    exact = lg.log_evidence(x)  # posterior sd about 0.3
    for points in (41, 61, 81):  # spacing 0.3, 0.2, 0.15: resolved, and the refinement estimate is conservative
        grid = latent2d.log_evidence_2d(lg.model, x, bounds=(-6.0, 6.0), points=points, zoom=False)
        assert torch.all(grid.effective_points >= latent2d.MIN_EFFECTIVE_POINTS)
        assert torch.all((grid.log_evidence - exact).abs() <= grid.error + 2e-5)
    coarse = latent2d.log_evidence_2d(lg.model, x, bounds=(-6.0, 6.0), points=9, zoom=False)  # spacing 1.5
    assert (coarse.log_evidence - exact).abs().max() > 0.05  # really too coarse ...
    assert torch.all(torch.isinf(coarse.error))  # ... and flagged as such
    rescued = latent2d.log_evidence_2d(lg.model, x, bounds=(-6.0, 6.0), points=9, zoom_points=61)  # the zoom fixes it
    torch.testing.assert_close(rescued.log_evidence, exact, atol=2e-5, rtol=0)
    loc, _ = lg.posterior(x)
    centre = loc.double().mean(0)
    truncated = latent2d.grid_log_evidence(latent2d.as_log_joint(lg.model), x, centre - 0.1, centre + 0.1, 21)
    assert torch.all(truncated.edge_mass > 1e-2)  # most of the posterior lies outside: the edge shows it
    assert torch.all(truncated.log_evidence < exact)


def test_the_generic_trace_path_equals_the_vae_fast_path():
    pyro.set_rng_seed(1)
    x_binary = torch.bernoulli(torch.full((4, 784), 0.3))
    x_grey = torch.rand(3, 784) * 0.98 + 0.01
    for likelihood, x in (("bernoulli", x_binary), ("gaussian", x_grey)):
        vae = VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,), likelihood=likelihood, obs_scale=0.5))
        weighted = Weighted(vae, kl_weight=0.3)  # a KL weight (as training applies it) must not change the evidence
        fast = latent2d.log_evidence_2d(vae, x, points=41, zoom_points=31)
        generic = latent2d.log_evidence_2d(weighted.model, x, points=41, zoom_points=31)
        torch.testing.assert_close(fast.log_evidence, generic.log_evidence, atol=1e-3, rtol=0)
        torch.testing.assert_close(fast.low, generic.low)


@pytest.fixture
def mnist_3600(data_root, tmp_path) -> Path:
    """A data folder with MNIST's first 3,600 training images (3,000 training, the last sixth validation) and its
    first 40 test images: the training and test images the test below uses, read in milliseconds, not seconds."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_small_mnist(data_root / "MNIST" / "raw", raw, 3600, 40)
    return tmp_path / "data"


def test_trained_mnist_vae_quadrature_agrees_with_importance_sampling(tmp_path, mnist_3600):
    """A real non-linear model: a 2-D VAE trained for a few epochs on 3000 MNIST images.

    Importance sampling with the guide as proposal agrees with the quadrature within its
    reported standard error for most images. Not for all: where the guide misses part of
    the posterior (a skewed tail), the rare heavy weights are seldom drawn, and the estimate
    and its delta-method standard error are both too small; it then errs low, never high
    (log p̂(x) is a lower bound in expectation). The grid sees the whole posterior.
    """
    config = TrainConfig(epochs=4, train_examples=3000, eval_examples=40, test_samples=10, device="cpu",
                         data_dir=str(mnist_3600))
    train(tmp_path / "run", config, VAEConfig(latent_dim=2, hidden_sizes=(64,)), progress=False)
    vae, _ = load_run(tmp_path / "run")
    from ppl_vae.data import load_mnist

    x = load_mnist(mnist_3600, "dynamic", eval_examples=40).test
    grid = latent2d.log_evidence_2d(vae, x)
    assert torch.all(grid.error < 1e-2), grid.error.max()
    finer = latent2d.log_evidence_2d(vae, x, bounds=(-7.0, 7.0), points=281, zoom_points=81)
    # Another global box and finer grids: the values move by no more than their error estimates say.
    assert torch.all((grid.log_evidence - finer.log_evidence).abs() <= grid.error + finer.error + 1e-5)
    estimate = evidence_estimate(vae.model, vae.guide, x, num_samples=4000)
    z = (estimate.log_evidence - grid.log_evidence) / estimate.stderr
    assert (z.abs() < 4).double().mean() >= 0.85, z
    assert torch.all(z < 4), z  # never significantly above the integral
    assert (estimate.log_evidence - grid.log_evidence).abs().median() < 0.05
    # The ELBO is below log p(x) for every image (its gap is KL(q(z|x) || p(z|x)) >= 0), up to the Monte Carlo
    # error of its 200-draw estimate (4 standard errors, from the same estimator's per-draw values).
    elbo = elbo_decomposition(vae.model, vae.guide, x, num_samples=200)["elbo"]
    plan = plan_evaluation(vae.model, vae.guide, x, num_samples=200)
    draws = torch.cat([(t.reconstruction - sum(t.kl.values())).double() for _, t in iter_chunk_terms(vae.model, vae.guide, x, plan)])
    stderr = draws.std(0) / math.sqrt(200)
    assert torch.all(elbo < grid.log_evidence + 4 * stderr + 1e-3), ((elbo - grid.log_evidence) / stderr).max()


def test_densities_on_a_grid_integrate_to_one(lg):
    vae = VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,)))
    x = torch.bernoulli(torch.full((30, 784), 0.2))
    z = latent2d.grid_points(torch.tensor([-6.0, -6.0]), torch.tensor([6.0, 6.0]), 241)
    cell = (12.0 / 240) ** 2
    prior = latent2d.site_log_density(vae.model, x, z)
    assert prior.shape == (30, 241 * 241) and torch.allclose(prior[0], prior[-1])
    assert prior[0].exp().sum() * cell == pytest.approx(1.0, abs=1e-4)
    aggregate = latent2d.aggregate_log_density(vae.guide, x, z, chunk_size=7)
    assert aggregate.exp().sum() * cell == pytest.approx(1.0, abs=1e-3)
    guide = latent2d.site_log_density(vae.guide, x[:3], z)
    one_by_one = torch.logsumexp(latent2d.site_log_density(vae.guide, x, z), 0) - math.log(30)
    # The guide's network runs in float32 on chunks of 7 and of 30 rows: BLAS may round them differently
    # (seen: 1.2e-5 nats on values of ~40), so float32's tolerance, not float64's.
    torch.testing.assert_close(aggregate, one_by_one, rtol=1e-5, atol=1e-5)
    assert guide.shape == (3, 241 * 241)


def test_decode_grid_occupancy_and_neighbour_change():
    vae = VAE(VAEConfig(latent_dim=2, hidden_sizes=(8,)))
    images = latent2d.decode_grid(vae, [-1.0, -2.0], [1.0, 2.0], 5)
    assert images.shape == (25, 784)
    # Top-left image is z = (low_1, high_2): the grid reads like the plane with z_2 up.
    torch.testing.assert_close(images[0], vae.decode_mean(torch.tensor([[-1.0, 2.0]]))[0])
    torch.testing.assert_close(images[4], vae.decode_mean(torch.tensor([[1.0, 2.0]]))[0])
    torch.testing.assert_close(images[20], vae.decode_mean(torch.tensor([[-1.0, -2.0]]))[0])
    assert latent2d.neighbour_change(images, 5).shape == (40,)
    codes = torch.tensor([[0.1, 0.1], [0.6, 0.6], [0.61, 0.62], [5.0, 5.0]])
    assert latent2d.occupancy(codes, 0.0, 1.0, cells=2) == pytest.approx(0.5)
    low, high = latent2d.code_range(torch.randn(10000, 2), quantile=0.025)
    assert low[0] == pytest.approx(-1.96, abs=0.1) and high[1] == pytest.approx(1.96, abs=0.1)


def test_digit_classifier_learns_mnist(mnist):
    classifier = latent2d.train_digit_classifier(mnist.train[:4000], mnist.train_labels[:4000], epochs=3)
    prediction, confidence = latent2d.classify(classifier, mnist.val[:1000])  # trained on grey levels, read binarized
    assert (prediction == mnist.val_labels[:1000]).double().mean() > 0.8
    assert torch.all((confidence > 0) & (confidence <= 1))


def test_bad_grids_and_models_are_clear_errors(lg):
    x = lg.sample(2)
    with pytest.raises(InvalidDataError, match="odd"):
        latent2d.log_evidence_2d(lg.model, x, points=100)
    with pytest.raises(InvalidDataError, match="upper bound"):
        latent2d.log_evidence_2d(lg.model, x, bounds=(1.0, -1.0))

    def three_d(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(-1, 5), 1.0).to_event(1), obs=data)

    with pytest.raises(ModelStructureError, match="event shape"):
        latent2d.log_evidence_2d(three_d, x)

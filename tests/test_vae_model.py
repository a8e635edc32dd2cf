"""The VAE's Pyro programs, and the evaluation API on them."""

import math

import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vae.errors import InvalidDataError
from ppl_vae.evaluate import elbo_decomposition, evidence_estimate, iter_chunk_terms, plan_evaluation
from ppl_vae.model import VAE, VAEConfig


@pytest.fixture
def small_vae():
    return VAE(VAEConfig(data_dim=12, latent_dim=3, hidden_sizes=(8,)))


def binary(n, d, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(seed))


def test_default_architecture_is_the_iwae_mlp():
    vae = VAE()
    sizes = [m.out_features for m in vae.guide_net.encoder.net if isinstance(m, torch.nn.Linear)]
    assert sizes == [200, 200, 100]  # 50 locations and 50 scales
    sizes = [m.out_features for m in vae.decoder if isinstance(m, torch.nn.Linear)]
    assert sizes == [200, 200, 784]
    assert isinstance(vae.decoder[1], torch.nn.Tanh)


def test_vae_elbo_agrees_with_trace_elbo(small_vae):
    x = binary(20, 12)
    ours = elbo_decomposition(small_vae.model, small_vae.guide, x, num_samples=3000, kl="mc")["elbo"].mean().item()
    analytic = elbo_decomposition(small_vae.model, small_vae.guide, x, num_samples=3000)
    pyro_elbo = -Trace_ELBO(num_particles=3000, vectorize_particles=True, max_plate_nesting=1).loss(
        small_vae.model, small_vae.guide, x) / 20
    plan = plan_evaluation(small_vae.model, small_vae.guide, x, num_samples=3000)
    per_particle = torch.cat([t.log_weight.double().mean(1) for _, t in iter_chunk_terms(small_vae.model, small_vae.guide, x, plan)])
    se = per_particle.std().item() / math.sqrt(per_particle.numel())
    assert abs(ours - pyro_elbo) < 4 * math.sqrt(2) * se
    assert abs(analytic["elbo"].mean().item() - pyro_elbo) < 4 * math.sqrt(2) * se
    assert analytic["kl_method"] == {"z": "analytic"}


def test_evidence_lies_above_the_elbo_and_grows_with_k(small_vae):
    x = binary(30, 12, seed=1)
    elbo = elbo_decomposition(small_vae.model, small_vae.guide, x, num_samples=2000)["elbo"]
    k1 = evidence_estimate(small_vae.model, small_vae.guide, x, num_samples=1)
    k500 = evidence_estimate(small_vae.model, small_vae.guide, x, num_samples=500)
    assert k500.log_evidence.mean() > elbo.mean()
    assert k500.log_evidence.mean() > k1.log_evidence.mean()
    assert torch.all(k1.ess == 1)


def test_images_are_flattened_and_bad_shapes_are_refused(small_vae):
    vae = VAE()
    images = torch.bernoulli(torch.full((3, 1, 28, 28), 0.5))
    assert vae.flatten(images).shape == (3, 784)
    with pytest.raises(InvalidDataError, match=r"shape \[N, 12\]"):
        elbo_decomposition(small_vae.model, small_vae.guide, binary(4, 10))
    with pytest.raises(InvalidDataError, match="floating-point"):
        small_vae.flatten(torch.ones(2, 12, dtype=torch.long))
    with pytest.raises(InvalidDataError, match="non-empty"):
        small_vae.flatten(torch.ones(0, 12))


def test_bernoulli_likelihood_refuses_grey_levels(small_vae):
    with pytest.raises(InvalidDataError, match="binary data"):
        elbo_decomposition(small_vae.model, small_vae.guide, torch.rand(4, 12))


def test_prior_samples_and_decoded_means_have_image_shape(small_vae):
    images = small_vae.sample_prior(5)
    assert images.shape == (5, 12)
    assert torch.all((images >= 0) & (images <= 1))

"""Convolutional VAEs (``--network conv``) and the mixture of discretized logistics (``--likelihood logistic-mixture``)."""

from __future__ import annotations

import math

import pytest
import torch

from ppl_vae.data import dequantize
from ppl_vae.guides import GUIDES
from ppl_vae.likelihoods import (
    LIKELIHOODS,
    NUM_LEVELS,
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixtureLikelihood,
)
from ppl_vae.model import VAE, VAEConfig
from ppl_vae.networks import ConvDecoder, ConvEncoder
from ppl_vae.priors import PRIORS
from ppl_vae.train import CompiledEngine, SviEngine, TrainConfig

GREY, COLOUR = (1, 28, 28), (3, 32, 32)
TINY_CONV = dict(network="conv", conv_channels=(4, 8), hidden_sizes=(16,), latent_dim=3, activation="relu")


def images_for(likelihood: str, shape: tuple, n: int = 6, seed: int = 0) -> torch.Tensor:
    """A batch as the data pipeline gives it to ``likelihood``: binary, grey levels k/255 or dequantized levels."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, NUM_LEVELS, (n, *shape), generator=g).float() / (NUM_LEVELS - 1)
    kind = LIKELIHOODS[likelihood].data_kind
    if kind == "binary":
        return torch.bernoulli(levels, generator=g)
    return levels if kind == "discrete" else dequantize(levels, g)


def one_step(vae: VAE, x: torch.Tensor, objective: str = "elbo", particles: int = 1) -> float:
    """One SVI step; returns the loss and checks that every parameter the step saw moved."""
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    engine = SviEngine(vae, TrainConfig(objective=objective, particles=particles, learning_rate=1e-2))
    loss = engine.step(x)
    moved = [name for name, p in vae.named_parameters() if not torch.equal(before[name], p.detach())]
    assert math.isfinite(loss)
    assert any(name.startswith("decoder.deconvs") for name in moved) and any("convs" in name for name in moved
                                                                             if name.startswith("guide_net"))
    return loss


# --- The mixture of discretized logistics ----------------------------------------------------------


@pytest.mark.parametrize("components", [1, 3, 10])
def test_mixture_probabilities_over_the_256_levels_sum_to_one_per_value(components):
    likelihood = DiscretizedLogisticMixtureLikelihood(likelihood_components=components)
    g = torch.Generator().manual_seed(components)
    out = torch.randn(4, 3 * components * 7, generator=g) * 4  # wide spread: locations near 0 and 1, tiny and huge scales
    out[0] = -30.0  # a scale at its floor: all mass in one or two bins
    distribution = likelihood(out).base_dist
    levels = torch.arange(NUM_LEVELS, dtype=torch.float32) / (NUM_LEVELS - 1)
    log_p = torch.stack([distribution.log_prob(level.expand(4, 7)) for level in levels])  # [256, 4, 7]
    assert torch.allclose(torch.logsumexp(log_p.double(), 0), torch.zeros(4, 7, dtype=torch.float64), atol=1e-5)


def test_one_component_mixture_is_the_discretized_logistic():
    g = torch.Generator().manual_seed(0)
    loc, scale, logit = (torch.randn(5, 2, 12, generator=g) * 3 for _ in range(3))
    x = torch.randint(0, NUM_LEVELS, (5, 2, 12), generator=g).float() / (NUM_LEVELS - 1)
    mixture = DiscretizedLogisticMixtureLikelihood(likelihood_components=1)(torch.cat([logit, loc, scale], -1))
    single = DiscretizedLogisticLikelihood()(torch.cat([loc, scale], -1))
    assert torch.allclose(mixture.log_prob(x), single.log_prob(x), atol=1e-6)
    assert mixture.event_shape == single.event_shape == (12,) and mixture.batch_shape == (5, 2)


def test_mixture_samples_levels_and_refuses_other_data():
    likelihood = DiscretizedLogisticMixtureLikelihood(likelihood_components=4)
    distribution = likelihood(torch.randn(3, 12 * 5))
    sample = distribution.sample((2,))
    assert sample.shape == (2, 3, 5) and torch.equal(sample * 255, (sample * 255).round())
    assert distribution.mean.shape == (3, 5) and likelihood.params_per_dim == 12
    with pytest.raises(Exception, match="logistic mixture likelihood needs 8-bit grey levels"):
        likelihood.check_data(torch.full((2, 5), 0.5))


# --- Convolutional networks ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [GREY, COLOUR, (2, 28, 28)])
@pytest.mark.parametrize("channels", [(4,), (4, 8), (4, 8, 8)])
def test_conv_networks_map_flat_images_with_leading_dimensions(shape, channels):
    d = math.prod(shape)
    encoder = ConvEncoder(shape, channels, (16,), 6, "relu")
    decoder = ConvDecoder(3, shape, channels, (16,), params_per_dim=2, activation="relu")
    x = torch.rand(2, 5, d)
    assert encoder(x).shape == (2, 5, 6)
    assert encoder(x[0].reshape(5, *shape)).shape == (5, 6)  # images in their own shape too
    assert decoder(torch.randn(4, 5, 3)).shape == (4, 5, 2 * d)  # back to exactly H x W (28 -> 14 -> 7 -> 3 -> 28)


# Every likelihood on both image shapes, except the Bernoulli on colour images: those are never binarized
# (the Bernoulli likelihood is for binarized grey images), so that pair is not a case at all.
SHAPE_LIKELIHOOD_CASES = [
    pytest.param(shape, likelihood, id=f"{name}-{likelihood}")
    for shape, name in ((GREY, "28x28-grey"), (COLOUR, "32x32-colour"))
    for likelihood in sorted(LIKELIHOODS)
    if not (likelihood == "bernoulli" and shape == COLOUR)
]


@pytest.mark.parametrize("shape, likelihood", SHAPE_LIKELIHOOD_CASES)
def test_conv_vae_trains_a_step_with_every_likelihood(shape, likelihood):
    vae = VAE(VAEConfig(image_shape=shape, likelihood=likelihood, likelihood_components=3, **TINY_CONV))
    x = images_for(likelihood, shape)
    vae.likelihood.check_data(vae.flatten(x))
    one_step(vae, x)
    assert vae.decode_mean(torch.randn(2, 3)).shape == (2, math.prod(shape))


# Every prior with every guide, but the VampPrior with the IAF guide, which VAEConfig refuses for MLPs too.
PRIOR_GUIDE_CASES = [(prior, guide) for prior in sorted(PRIORS) for guide in sorted(GUIDES)
                     if not (prior == "vamp" and guide == "iaf")]


@pytest.mark.parametrize("prior, guide", PRIOR_GUIDE_CASES)
def test_conv_vae_trains_a_step_with_every_prior_and_guide(prior, guide):
    vae = VAE(VAEConfig(image_shape=COLOUR, prior=prior, guide=guide, likelihood="logistic256", prior_components=3,
                        **TINY_CONV))
    one_step(vae, images_for("logistic256", COLOUR))


@pytest.mark.parametrize("objective, particles", [("elbo", 1), ("meanfield", 1), ("iwae", 3), ("elbo", 2)])
def test_conv_vae_trains_a_step_with_every_objective(objective, particles):
    vae = VAE(VAEConfig(image_shape=GREY, **TINY_CONV))
    one_step(vae, images_for("bernoulli", GREY), objective, particles)


def test_conv_vae_trains_with_the_compiled_loss():
    """--engine jit traces the conv networks too (JitTrace_ELBO); two steps with the same batch shape reuse one graph."""
    vae = VAE(VAEConfig(image_shape=COLOUR, likelihood="logistic-mixture", likelihood_components=2, **TINY_CONV))
    x = images_for("logistic-mixture", COLOUR, n=4)
    before = vae.decoder.deconvs[0].weight.detach().clone()
    engine = CompiledEngine(vae, TrainConfig(engine="jit", learning_rate=1e-2))
    losses = [engine.step(x), engine.step(x)]
    assert all(math.isfinite(loss) for loss in losses) and len(engine.loss._compiled_keys) == 1
    assert not torch.equal(before, vae.decoder.deconvs[0].weight.detach())


def test_image_shape_is_checked():
    vae = VAE(VAEConfig(image_shape=COLOUR, likelihood="logistic256", **TINY_CONV))
    with pytest.raises(Exception, match=r"x must be images \[N, 3, 32, 32\] \(channels first\)"):
        vae.model(torch.rand(2, 32, 32, 3))
    with pytest.raises(Exception, match="need the image shape"):
        VAE(VAEConfig(network="conv"))
    with pytest.raises(Exception, match="contradicts image_shape"):
        VAEConfig(image_shape=COLOUR, data_dim=12)
    assert VAEConfig(image_shape=COLOUR).data_dim == 3072
    assert "3x32x32 conv(4-8)-16-3 relu" in VAEConfig(image_shape=COLOUR, **TINY_CONV).describe()

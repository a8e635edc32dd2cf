"""The fused log-densities of the evaluation engine (ppl_vae.fused) equal the unfused path, and fall back with a note."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from ppl_vae import fused
from ppl_vae.evaluate import elbo_decomposition, evidence_estimate, plan_evaluation
from ppl_vae.model import VAE, VAEConfig


def _logits(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 8 * torch.randn(*shape, generator=g, dtype=dtype)
    flat = logits.view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, 40.0, -40.0, 120.0, -120.0], dtype=dtype)  # saturated both ways
    return logits


@pytest.mark.parametrize("block", [fused.BLOCK_ELEMENTS, 100])  # one block, or 2 leading rows per block
@pytest.mark.parametrize("event_dims", [0, 1, 2])
def test_fused_bernoulli_equals_torch_in_float64(event_dims, block, monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", block)
    logits = _logits(7, 5, 3, 16)
    x = torch.bernoulli(torch.full((5, 3, 16), 0.4, dtype=torch.float64))  # broadcast over the particle dim
    fn = dist.Bernoulli(logits=logits)
    if event_dims:
        fn = fn.to_event(event_dims)
    expected = fn.log_prob(x)
    got = fused.fused_log_prob(fn, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_fused_bernoulli_in_float32_is_as_close_to_the_truth_as_torch():
    logits = _logits(50, 20, 784, dtype=torch.float32)
    x = torch.bernoulli(torch.full((20, 784), 0.3))
    truth = dist.Bernoulli(logits=logits.double()).to_event(1).log_prob(x.double())
    plain = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    got = fused.fused_log_prob(dist.Bernoulli(logits=logits).to_event(1), x)
    assert got.dtype == torch.float32
    # Both sum 784 float32 terms (rounding of a few units in the last place of the sum); the fused path's
    # log of the rounded sigmoid adds at most 784 * 2**-25 nats, a bias of at most 2.3e-5 nats.
    for result in (plain, got):
        assert ((result.double() - truth).abs() / truth.abs()).max() < 1e-6
    assert (got.double() - truth).mean().abs() <= (plain.double() - truth).abs().mean() + 784 * 2**-25


def test_probs_are_scored_through_the_logits_torch_uses():
    probs = torch.rand(4, 6, dtype=torch.float64).clamp(0.01, 0.99)
    x = torch.bernoulli(torch.full((4, 6), 0.5, dtype=torch.float64))
    fn = dist.Bernoulli(probs=probs).to_event(1)
    torch.testing.assert_close(fused.fused_log_prob(fn, x), fn.log_prob(x), rtol=0, atol=1e-12)


class _OwnBernoulli(dist.Bernoulli):
    def log_prob(self, value):
        return super().log_prob(value) + 1.0


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda l: dist.Normal(l, 1.0).to_event(1), "no fused log-density for Normal"),
        (lambda l: dist.ContinuousBernoulli(logits=l).to_event(1), "no fused log-density for ContinuousBernoulli"),
        (lambda l: dist.Bernoulli(logits=l).mask(torch.tensor(True)).to_event(1), "no fused log-density for Masked"),
        (lambda l: _OwnBernoulli(logits=l).to_event(1), "_OwnBernoulli overrides log_prob"),
        (lambda l: dist.Bernoulli(logits=l.half()).to_event(1), "dtype"),
        (lambda l: dist.Bernoulli(logits=l.to("meta"), validate_args=False).to_event(1), "on meta"),
    ],
)
def test_anything_else_falls_back_to_its_own_log_prob_with_a_reason(make, reason):
    logits = _logits(3, 8, dtype=torch.float32)
    x = torch.bernoulli(torch.full((3, 8), 0.5))
    fn = make(logits)
    assert fused.fused_log_prob(fn, x) is None
    assert reason in fused.describe(fn, x)
    assert fused.describe(fn, x).startswith("log_prob (")


def test_gradients_fall_back_and_the_switch_turns_fusion_off():
    logits = _logits(3, 8).requires_grad_()
    x = torch.bernoulli(torch.full((3, 8), 0.5, dtype=torch.float64))
    fn = dist.Bernoulli(logits=logits).to_event(1)
    assert fused.unfused_reason(fn, x) == "gradients needed"
    with torch.no_grad():
        assert fused.fused_log_prob(fn, x) is not None
        with fused.fusion(False):
            assert fused.fused_log_prob(fn, x) is None
            assert "turned off" in fused.describe(fn, x)
        assert fused.fused_log_prob(fn, x) is not None
    assert fused.describe(fn, x) == fused.FUSED_BERNOULLI


@pytest.fixture
def sharp_vae():
    """The built-in VAE with its decoder's output scaled up, so the logits saturate (|l| up to about 60)."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_dim=8, hidden_sizes=(32,)))
    with torch.no_grad():
        last = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(30)
    return vae


def _both_paths(fn):
    results = []
    for enabled in (True, False):
        pyro.set_rng_seed(5)
        with fused.fusion(enabled):
            results.append(fn())
    return results


def test_the_vae_evidence_and_elbo_are_the_same_fused_and_unfused(sharp_vae):
    vae = sharp_vae
    x = torch.bernoulli(torch.full((9, 784), 0.3))
    plan = plan_evaluation(vae.model, vae.guide, x, num_samples=4)
    assert plan.structure.log_density == {"x": fused.FUSED_BERNOULLI}
    with fused.fusion(False):
        assert plan_evaluation(vae.model, vae.guide, x, num_samples=4).structure.log_density["x"].startswith("log_prob")
    fast, plain = _both_paths(lambda: evidence_estimate(vae.model, vae.guide, x, num_samples=64, particles_per_chunk=24))
    assert plain.log_evidence.abs().min() > 100  # saturated logits: large log-densities, all finite
    torch.testing.assert_close(fast.log_evidence, plain.log_evidence, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(fast.ess, plain.ess, rtol=1e-3, atol=1e-3)
    fast, plain = _both_paths(lambda: elbo_decomposition(vae.model, vae.guide, x, num_samples=6))
    torch.testing.assert_close(fast["reconstruction"], plain["reconstruction"], rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(fast["elbo"], plain["elbo"], rtol=2e-6, atol=1e-4)


def test_a_pixel_plate_and_a_mask_give_the_same_evidence_fused_and_unfused():
    # Bernoulli without to_event, its pixels in a plate; some datapoints masked out, holding non-binary values.
    torch.manual_seed(1)
    weight = torch.randn(3, 10, dtype=torch.float64) * 4
    keep = torch.tensor([True, False, True, True, False])

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))
            with pyro.plate("pixels", 10, dim=-1), poutine.mask(mask=keep[:, None]):
                pyro.sample("x", dist.Bernoulli(logits=(z @ weight).squeeze(-2)), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(0.1 * x[:, None, :3], 0.8).to_event(1))

    x = torch.bernoulli(torch.full((5, 10), 0.5, dtype=torch.float64))
    x[~keep] = 0.5  # outside the support, but masked out
    with pyro.validation_enabled(False):
        assert plan_evaluation(model, guide, x, num_samples=3).structure.log_density["x"] == fused.FUSED_BERNOULLI
        fast, plain = _both_paths(lambda: evidence_estimate(model, guide, x, num_samples=50, particles_per_chunk=20))
    torch.testing.assert_close(fast.log_evidence, plain.log_evidence, rtol=0, atol=1e-10)

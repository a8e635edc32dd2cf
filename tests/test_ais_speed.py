"""AIS's fast observed-Bernoulli path (log-density and gradient from one sigmoid pass) changes no numbers."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae import fused
from ppl_vae.evaluate import ais_log_evidence
from ppl_vae.model import VAE, VAEConfig


def _logits(*shape, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (8 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    logits.view(-1)[:6] = torch.tensor([0.0, -0.0, 40.0, -40.0, 120.0, -120.0], dtype=dtype)  # saturated both ways
    return logits


@pytest.mark.parametrize("block", [fused.BLOCK_ELEMENTS, 100])  # one block, or 2 leading rows per block
@pytest.mark.parametrize("event_dims", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_prob_and_gradient_equal_torch(event_dims, block, dtype, monkeypatch):
    """The value and the gradient in the logits equal torch's Bernoulli.log_prob and its autograd gradient
    (float64: to rounding; float32: the gradient exactly, the value within the fused path's documented bound)."""
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", block)
    logits = _logits(7, 5, 3, 16, dtype=dtype).requires_grad_()
    x = torch.bernoulli(torch.full((5, 3, 16), 0.4, dtype=dtype))  # broadcast over the leading dim
    fn = dist.Bernoulli(logits=logits)
    expected = (fn.to_event(event_dims) if event_dims else fn).log_prob(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    value, grad = fused.bernoulli_log_prob_and_grad(logits.detach(), x, event_dims)
    assert value.shape == expected.shape and grad.shape == logits.shape
    atol = 1e-12 if dtype == torch.float64 else 2 * 48 * 2**-24  # at most 48 terms a sum, half an ulp of 1 each
    torch.testing.assert_close(value, expected.detach(), rtol=1e-6 if dtype == torch.float32 else 0, atol=atol)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-7)


def test_ais_numbers_are_those_of_the_plain_log_prob_path():
    """Same seed, the fused path on and off (torch's Bernoulli.log_prob and autograd): the same log-weights, to
    float32 rounding, on a small Bernoulli VAE (so the leapfrog trajectories and Metropolis decisions agree too)."""
    vae = VAE(VAEConfig(latent_dim=3, hidden_sizes=(16,)))
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    results = []
    for enabled in (True, False):
        pyro.set_rng_seed(7)
        with fused.fusion(enabled):
            results.append(ais_log_evidence(vae.model, vae.guide, x, steps=8, chains=3, leapfrog_steps=3))
    fast, plain = results
    assert fast.acceptance.min() > 0.05  # the chains moved
    torch.testing.assert_close(fast.log_weights, plain.log_weights, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fast.acceptance, plain.acceptance, rtol=1e-4, atol=1e-4)


def test_a_stale_gradient_of_the_reused_workspace_raises_instead_of_being_wrong():
    """The gradient is written into a workspace reused at every evaluation: a backward through an older
    evaluation, after a newer one rewrote it, must raise (torch's version check), never use the newer values."""
    from ppl_vae.ais import _BernoulliLogProb

    workspace = {}
    logits = torch.randn(4, 3, 5, requires_grad=True)
    x = torch.bernoulli(torch.full((3, 5), 0.5))
    first = _BernoulliLogProb.apply(logits, x, 1, workspace)
    (grad,) = torch.autograd.grad(first.sum(), logits, retain_graph=True)
    torch.testing.assert_close(grad, x - torch.sigmoid(logits.detach()))
    _BernoulliLogProb.apply(2 * logits, x, 1, workspace)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(first.sum(), logits)


def test_the_ais_bench_reports_the_floor_share_in_cpu_time_on_the_cpu():
    """On a shared machine wall time counts waiting for a core; the CPU-time share is the one to compare."""
    from ppl_vae.bench import format_ais_benchmark, time_ais
    from ppl_vae.evaluate import AisSettings

    result = time_ais(torch.device("cpu"), num_examples=2, repeats=1, settings=AisSettings(steps=2, chains=2,
                                                                                          leapfrog_steps=1))
    assert set(result["cpu_seconds"]) == {"ais", "floor"} and all(v > 0 for v in result["cpu_seconds"].values())
    assert result["cpu_fraction_of_floor"] == pytest.approx(result["cpu_seconds"]["floor"] / result["cpu_seconds"]["ais"])
    assert "in CPU time" in format_ais_benchmark(result)

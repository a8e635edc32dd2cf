"""The benchmark runs at tiny sizes, and its fast paths compute the same loss as plain SVI."""

import copy
import json

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vae.bench import EVIDENCE_VARIANTS, STEP_VARIANTS, decoder_matmul_floor, time_reference_evidence
from ppl_vae.evaluate import elbo_decomposition, evidence_estimate
from ppl_vae.fused import FUSED_BERNOULLI
from ppl_vae.model import VAE, VAEConfig


def test_every_step_variant_computes_the_same_first_loss():
    torch.manual_seed(0)
    base = VAE(VAEConfig())
    x = torch.bernoulli(torch.full((16, 784), 0.3))
    losses = {}
    for name, make in STEP_VARIANTS.items():
        pyro.clear_param_store()
        step = make(copy.deepcopy(base))
        pyro.set_rng_seed(11)
        losses[name] = step(x)
    for name, loss in losses.items():
        if name not in ("svi-meanfield", "svi-jit", "module-jit"):  # the JIT paths are checked below, with fixed draws
            assert loss == pytest.approx(losses["svi"], rel=1e-5), name
    # TraceMeanField_ELBO takes the KL analytically: the same draw, minus the analytic KL, as ours.
    pyro.clear_param_store()
    pyro.set_rng_seed(11)
    ours = elbo_decomposition(base.model, base.guide, x, num_samples=1)
    assert ours["kl_method"] == {"z": "analytic"}
    assert losses["svi-meanfield"] == pytest.approx(-ours["elbo"].sum().item(), rel=1e-5)


@pytest.fixture
def fixed_draws(monkeypatch):
    """The guide's standard-normal noise held fixed: one value per latent dimension (50), for every image."""
    eps = torch.linspace(-1.5, 1.5, 50)
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal",
                        lambda shape, dtype, device: eps.to(dtype=dtype, device=device).expand(shape).clone())


def test_jit_compiled_loss_and_gradients_equal_trace_elbo_with_the_draws_fixed(fixed_draws):
    # JitTrace_ELBO draws its noise with torch.normal inside the traced graph, so the same seed gives
    # other draws than Trace_ELBO. Holding eps fixed checks everything else: the traced log-densities,
    # the surrogate and the gradients.
    torch.manual_seed(0)
    vae = VAE(VAEConfig())
    x = torch.bernoulli(torch.full((16, 784), 0.3))
    pyro.clear_param_store()
    jit = STEP_VARIANTS["svi-jit"](vae).svi.loss_and_grads
    results = []
    for loss_and_grads in (jit, jit, Trace_ELBO().loss_and_grads):  # the first call compiles
        for p in vae.parameters():
            p.grad = None
        with pyro.validation_enabled(False):
            loss = loss_and_grads(vae.model, vae.guide, x)
        results.append((loss, [p.grad.clone() for p in vae.parameters()]))
    (_, _), (jit_loss, jit_grads), (loss, grads) = results
    assert jit_loss == pytest.approx(loss, rel=1e-6)
    for a, b in zip(jit_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_compiled_module_step_equals_the_svi_step_with_the_draws_fixed(fixed_draws):
    # module-jit (ppl-vae train --engine jit): the same loss, and one torch Adam making the same update
    # as Pyro's per-parameter Adam, so two steps leave the same parameters.
    torch.manual_seed(0)
    base = VAE(VAEConfig())
    x = torch.bernoulli(torch.full((16, 784), 0.3))
    results = {}
    for name in ("module-jit", "svi-novalid"):
        pyro.clear_param_store()
        vae = copy.deepcopy(base)
        step = STEP_VARIANTS[name](vae)
        with step.own_params():
            losses = [step(x) for _ in range(2)]
        results[name] = losses, vae.state_dict()
    (jit_losses, jit_state), (svi_losses, svi_state) = results["module-jit"], results["svi-novalid"]
    assert jit_losses == pytest.approx(svi_losses, rel=1e-6)
    for name, value in svi_state.items():
        torch.testing.assert_close(jit_state[name], value, rtol=0, atol=1e-6, msg=name)


def test_reference_evidence_equals_the_package_estimate_with_the_same_draws():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(data_dim=784, latent_dim=5, hidden_sizes=(16,)))
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    pyro.set_rng_seed(3)
    ours = evidence_estimate(vae.model, vae.guide, x, num_samples=40, particles_per_chunk=40).log_evidence
    pyro.set_rng_seed(3)
    reference = time_reference_evidence(vae, x, 40, 40)
    torch.testing.assert_close(ours, reference.cpu(), atol=1e-4, rtol=0)


def test_bench_command_at_tiny_sizes(tmp_path, small_data_root, cli_main):
    out = tmp_path / "bench.json"
    result = cli_main("bench", "--device", "cpu", "--batch-sizes", "8", "--repeats", "1", "--steps", "2",
                      "--evidence-examples", "10", "--evidence-samples", "10", "--epoch-examples", "200",
                      "--data-dir", small_data_root, "--out", out, "--ais-examples", "3", "--ais-steps", "3")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {row["variant"] for row in data["svi_step"]} == set(STEP_VARIANTS)
    assert all(row["steps_per_second"] > 0 for row in data["svi_step"])
    evidence = data["evidence"]
    assert set(evidence["log_weights_per_second"]) == set(EVIDENCE_VARIANTS)
    assert all(value > 0 for value in evidence["log_weights_per_second"].values())
    assert evidence["ratio_to_matmul_floor"] > 0 and evidence["throughput_ratio_unfused"] > 0
    assert evidence["log_density"] == {"x": FUSED_BERNOULLI}
    assert "x pytorch" in result.stdout and "matmul floor" in result.stdout
    # ppl-vae train with its defaults, through the training loop: the engine --engine auto chose, and why.
    default = data["default_training"]
    assert default["images"] == 200 and len(default["run_epoch_seconds"]) == 2 and default["ratio"] > 0
    assert len(default["epoch_seconds"]["default"]) == len(default["epoch_seconds"]["pytorch"]) == 1
    assert default["engine"]["requested"] == "auto" and default["engine"]["engine"] == "jit"
    assert "ppl-vae train with its defaults: --engine auto ran jit" in result.stdout
    assert data["epoch"]["images"] == 200
    assert data["ais"]["num_examples"] == 3 and data["ais"]["settings"]["steps"] == 3 and data["ais"]["fraction_of_floor"] > 0
    assert "AIS, T=3 L=5 C=8" in result.stdout and "of the floor" in result.stdout


def test_decoder_matmul_floor_has_the_decoders_shapes_and_flops():
    vae = VAE(VAEConfig(data_dim=784, latent_dim=5, hidden_sizes=(16,)))
    x = torch.zeros(7, 784)
    calls = []
    original = torch.mm

    def mm(a, b, out=None):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, out=out)

    floor = decoder_matmul_floor(vae, x, num_samples=10, chunk=4, particles=3)
    torch.mm = mm
    try:
        floor()
    finally:
        torch.mm = original
    # Data chunks of 4 and 3 images, particle chunks 3, 3, 3, 1: two layers (5-16, 16-784) each time.
    rows = [n * k for n in (4, 3) for k in (3, 3, 3, 1)]
    assert calls == [shape for r in rows for shape in (((r, 5), (5, 16)), ((r, 16), (16, 784)))]


def test_peak_flops_tells_the_pcie_h100_from_the_sxm_one():
    from ppl_vae.bench import peak_flops, peak_flops_of

    assert peak_flops_of("NVIDIA H100 PCIe") == 51e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 67e12
    assert peak_flops_of("NVIDIA GeForce RTX 3060") is None  # unknown: no fraction of peak rather than a wrong one
    assert peak_flops(torch.device("cpu")) is None

"""The compiled loss (``--engine jit``) computes the same loss and gradients as ``Trace_ELBO`` on the same programs."""

import copy

import pyro
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO

from ppl_vae import runs
from ppl_vae.errors import PplVaeError, RunDirectoryError
from ppl_vae.model import VAE, VAEConfig
from ppl_vae.objectives import CompiledProgramLoss, ProgramLoss, make_objective
from ppl_vae.programs import Weighted
from ppl_vae.train import TrainConfig, train

SMALL = dict(latent_dim=6, hidden_sizes=(32,))


@pytest.fixture
def fixed_draws(monkeypatch):
    """Hold the standard-normal noise fixed (a function of its shape only).

    The traced graph draws with ``torch.normal``, Trace_ELBO with ``Tensor.normal_``: the same
    seed gives other draws, so equality is checked with the draws held fixed.
    """
    def standard_normal(shape, dtype, device):
        count = torch.Size(shape).numel()
        values = torch.linspace(-1.7, 1.7, 97).repeat(count // 97 + 1)[:count]
        return values.reshape(shape).to(dtype=dtype, device=device)

    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", standard_normal)
    monkeypatch.setattr(torch.distributions.multivariate_normal, "_standard_normal", standard_normal)


def loss_and_gradients(loss_module: torch.nn.Module, vae: VAE, x: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    vae.zero_grad(set_to_none=True)
    loss = loss_module(x)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in vae.parameters()]


@pytest.mark.parametrize("variant", [
    {}, {"prior": "mixture"}, {"prior": "vamp"}, {"prior": "flow"}, {"guide": "fullcov"}, {"guide": "iaf"},
    {"likelihood": "gaussian"},
])
def test_compiled_loss_and_gradients_equal_trace_elbo_for_every_variant(fixed_draws, variant):
    torch.manual_seed(0)
    pyro.clear_param_store()
    vae = VAE(VAEConfig(**SMALL, **variant))
    reference_vae = copy.deepcopy(vae)
    weighted, reference_weighted = Weighted(vae), Weighted(reference_vae)  # the KL weight, as training applies it
    compiled = CompiledProgramLoss(weighted)
    reference = ProgramLoss(reference_weighted, make_objective("elbo"))
    # New batch sizes and KL weights compile new graphs; a key seen before replays its graph on new data.
    for batch_size, beta in [(16, 1.0), (16, 0.5), (7, 0.5), (16, 1.0)]:
        x = torch.rand(batch_size, 784) if variant.get("likelihood") == "gaussian" else torch.bernoulli(
            torch.full((batch_size, 784), 0.3))
        weighted.kl_weight = reference_weighted.kl_weight = beta
        loss, grads = loss_and_gradients(compiled, vae, x)
        expected_loss, expected_grads = loss_and_gradients(reference, reference_vae, x)
        assert loss == pytest.approx(expected_loss, rel=1e-5), (batch_size, beta)
        for got, expected in zip(grads, expected_grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pyro_jit_differentiable_loss_doubles_reparameterized_gradients(fixed_draws):
    # Why CompiledProgramLoss does not use JitTrace_ELBO.differentiable_loss (Pyro 1.9): its loss term is not
    # detached, so the gradient is that of loss + surrogate, twice the right one here. If this starts failing,
    # Pyro has fixed it and CompiledProgramLoss could call differentiable_loss directly.
    torch.manual_seed(0)
    pyro.clear_param_store()
    vae = VAE(VAEConfig(**SMALL))
    x = torch.bernoulli(torch.full((8, 784), 0.3))
    jit = JitTrace_ELBO(ignore_jit_warnings=True)
    for _ in range(2):  # the first call compiles
        vae.zero_grad(set_to_none=True)
        jit.differentiable_loss(vae.model, vae.guide, x).backward()
    doubled = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad(set_to_none=True)
    Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    for got, right in zip(doubled, [p.grad for p in vae.parameters()]):
        torch.testing.assert_close(got, 2 * right, rtol=1e-4, atol=1e-4)


def test_compiling_does_not_consume_random_draws():
    torch.manual_seed(0)
    pyro.clear_param_store()
    vae = VAE(VAEConfig(**SMALL))
    x = torch.bernoulli(torch.full((8, 784), 0.3))
    cold = CompiledProgramLoss(vae)
    pyro.set_rng_seed(5)
    first = float(cold(x))  # compiles, then steps
    warm = CompiledProgramLoss(vae)
    warm(x)  # compiled before the seed is set
    pyro.set_rng_seed(5)
    assert float(warm(x)) == first
    assert float(warm(x)) != first  # and the draws do move on from step to step


@pytest.mark.parametrize("objective", ["meanfield", "iwae"])
def test_the_jit_engine_refuses_objectives_it_cannot_compile(objective):
    with pytest.raises(PplVaeError, match=f"--engine jit compiles --objective elbo only, not {objective}"):
        TrainConfig(engine="jit", objective=objective)
    with pytest.raises(PplVaeError, match="unknown engine 'fast'"):
        TrainConfig(engine="fast")


def test_the_jit_engine_trains_and_single_process_refuses_a_torchrun_checkpoint(tmp_path, small_data_root):
    config = TrainConfig(epochs=2, batch_size=50, learning_rate=3e-3, data_dir=str(small_data_root), train_examples=500,
                         eval_examples=100, test_samples=10, device="cpu", engine="jit")
    train(tmp_path / "run", config, VAEConfig(**SMALL), progress=False)
    metrics = runs.read_metrics(tmp_path / "run")
    assert metrics[-1]["val_elbo"] > metrics[0]["val_elbo"]
    checkpoint = runs.load_checkpoint(tmp_path / "run")
    assert checkpoint["optimizer_format"] == "torch" and "scheduler" in checkpoint and "rng" in checkpoint
    # A checkpoint written under torchrun (it names its world size, and holds no RNG state) is refused.
    checkpoint["world_size"] = 2
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(RunDirectoryError, match="resume it with --devices 2"):
        train(tmp_path / "run", TrainConfig(epochs=3), resume=True, progress=False)


def test_a_param_store_holding_another_models_tensors_is_refused():
    torch.manual_seed(0)
    pyro.clear_param_store()
    x = torch.bernoulli(torch.full((8, 784), 0.3))
    CompiledProgramLoss(VAE(VAEConfig(**SMALL)))(x)
    # A second VAE with the same parameter names: pyro.module would keep the first one's tensors.
    with pytest.raises(PplVaeError, match=r"Call pyro.clear_param_store\(\) before building"):
        CompiledProgramLoss(VAE(VAEConfig(**SMALL)))(x)
    pyro.clear_param_store()
    assert torch.isfinite(CompiledProgramLoss(VAE(VAEConfig(**SMALL)))(x))


def test_train_engine_jit_from_the_command_line(tmp_path, small_data_root):
    from ppl_vae import cli

    run_dir = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run_dir), "--engine", "jit", "--epochs", "1", "--data-dir", str(small_data_root),
                     "--train-examples", "300", "--eval-examples", "100", "--test-samples", "10", "--latent-dim", "4",
                     "--hidden-sizes", "32", "--device", "cpu", "--no-progress"]) == 0
    assert runs.read_json(run_dir / "config.json")["train"]["engine"] == "jit"
    assert cli.main(["train", "--run-dir", str(tmp_path / "iwae"), "--engine", "jit", "--objective", "iwae",
                     "--data-dir", str(small_data_root), "--no-progress"]) == 2
    assert not (tmp_path / "iwae").exists()


def test_compiled_loss_with_vectorized_particles_equals_trace_elbo(fixed_draws):
    torch.manual_seed(0)
    pyro.clear_param_store()
    vae = VAE(VAEConfig(**SMALL))
    compiled = CompiledProgramLoss(vae, particles=3)
    reference = ProgramLoss(copy.deepcopy(vae), make_objective("elbo", particles=3))
    x = torch.bernoulli(torch.full((10, 784), 0.3))
    loss, grads = loss_and_gradients(compiled, vae, x)
    expected_loss, expected_grads = loss_and_gradients(reference, reference.vae, x)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

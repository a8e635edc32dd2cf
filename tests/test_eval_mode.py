"""Every evaluation runs the program in eval mode without gradients; every training step in train mode.

Programs with ``nn.Dropout`` and ``nn.BatchNorm1d``, written as a user would: an evaluation must see the
network the run delivers (Dropout off, BatchNorm on its running statistics), whatever mode the module was
in when it was called, must leave that mode as it was, and must move no running statistic.
"""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae import cli, runs
from ppl_vae.diagnostics import diagnostics_summary
from ppl_vae.errors import ModelStructureError
from ppl_vae.distributed import evaluate_per_datapoint
from ppl_vae.evaluate import elbo_decomposition, evaluation_summary, evidence_estimate
from ppl_vae.latent2d import program_log_joint
from ppl_vae.modes import evaluation_mode
from ppl_vae.objectives import CompiledProgramLoss
from ppl_vae.programs import Weighted, check_parameters_belong
from ppl_vae.train import TrainConfig, check_first_batch, choose_engine, load_run, train

PROGRAMS = '''
"""A VAE with Dropout in its decoder, and one with BatchNorm in both networks, as a user would write them."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn


def normal(net, x):
    loc, raw = net(x).chunk(2, -1)
    return dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1)


class DropoutVAE(nn.Module):
    def __init__(self, latent=4, hidden=64, p=0.5):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, 784))
        self.latent = latent

    def model(self, x):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(self.encoder, x))


class BatchNormVAE(nn.Module):
    def __init__(self, latent=4, hidden=32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                     nn.Linear(hidden, 784))
        self.latent = latent

    def model(self, x):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            # BatchNorm1d takes [batch, features]: evaluation draws z with a particle dimension in front
            logits = self.decoder(z.reshape(-1, self.latent)).reshape(*z.shape[:-1], 784)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(self.encoder, x))
'''


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """The user's file and its module, imported once."""
    import importlib.util

    path = tmp_path_factory.mktemp("user") / "noisy_models.py"
    path.write_text(PROGRAMS)
    spec = importlib.util.spec_from_file_location("noisy_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def _images(n=30, seed=0):
    return torch.bernoulli(torch.rand(n, 784, generator=torch.Generator().manual_seed(seed)) * 0.6)


def _buffers(module):
    return {name: value.clone() for name, value in module.named_buffers()}


def _every_evaluation(program, x):
    """The per-datapoint numbers of each evaluation entry point, all drawn from the same seed."""
    results = {}
    with torch.random.fork_rng(devices=[]):
        pyro.set_rng_seed(1)
        per_datapoint = evaluate_per_datapoint(program.model, program.guide, x, num_samples=30, elbo_samples=3,
                                               psis=True, seed=5)
        results["evaluate_per_datapoint"] = torch.cat([per_datapoint.evidence.log_evidence,
                                                       per_datapoint.decomposition["elbo"]])
        pyro.set_rng_seed(2)
        results["elbo_decomposition"] = elbo_decomposition(program.model, program.guide, x, num_samples=2)["elbo"]
        pyro.set_rng_seed(3)
        results["evidence_estimate"] = evidence_estimate(program.model, program.guide, x, num_samples=4).log_evidence
        pyro.set_rng_seed(4)
        summary = evaluation_summary(program.model, program.guide, x, num_samples=4, elbo_samples=2)
        results["evaluation_summary"] = torch.tensor([summary["elbo"]["mean"], summary["log_evidence"]["mean"]])
        pyro.set_rng_seed(5)
        diagnostics = diagnostics_summary(program.model, program.guide, x, psis=per_datapoint.psis)["sites"]["z"]
        surgery = diagnostics["elbo_surgery"]
        results["diagnostics_summary"] = torch.tensor([diagnostics["collapse"]["total_kl"],
                                                       surgery["marginal_kl"]["mean"]])
    return results


@pytest.mark.parametrize("name", ["DropoutVAE", "BatchNormVAE"])
def test_every_evaluation_sees_the_eval_mode_network_whatever_mode_it_was_called_in(programs, name):
    _, module = programs
    torch.manual_seed(0)
    program = getattr(module, name)()
    x = _images()
    if name == "BatchNormVAE":  # running statistics of their own, so that eval mode differs from train mode
        with torch.no_grad():
            for _ in range(3):
                program.guide(_images(50, seed=7))
                program.model(_images(50, seed=7))
    before = _buffers(program)
    program.eval()
    reference = _every_evaluation(program, x)
    program.train()
    program.decoder[1].eval()  # a submodule the user keeps in eval mode: it must stay so
    called_in_train_mode = _every_evaluation(program, x)
    for entry, values in reference.items():
        torch.testing.assert_close(called_in_train_mode[entry], values, msg=f"{entry} ran in train mode")
    assert program.training and program.encoder.training and not program.decoder[1].training  # modes restored
    for buffer, value in _buffers(program).items():
        assert torch.equal(value, before[buffer]), f"an evaluation moved the running statistic {buffer}"


def test_checks_and_figures_move_no_running_statistic(programs):
    _, module = programs
    program = module.BatchNormVAE()
    x = _images(20)
    before = _buffers(program)
    check_first_batch(program, (x,))
    check_parameters_belong(program, x)
    plane = module.BatchNormVAE(latent=2)  # the latent2d path: log p(x, z) on a grid of a 2-D latent site
    plane_before = _buffers(plane)
    program_log_joint(plane.model)(x[:3], torch.zeros(5, 2))
    assert all(torch.equal(value, plane_before[buffer]) for buffer, value in _buffers(plane).items())
    for buffer, value in _buffers(program).items():
        assert torch.equal(value, before[buffer]), f"a check moved the running statistic {buffer}"
    assert program.training
    with evaluation_mode(program.model, program.guide):
        assert not program.training and not torch.is_grad_enabled()
    assert program.training and torch.is_grad_enabled()


def test_running_statistics_count_training_steps_only(programs, small_data_root, tmp_path):
    """num_batches_tracked of each BatchNorm counts one forward pass per training step (Trace_ELBO runs each
    program once a step), not the validation, learning-curve and test evaluations, nor the up-front checks."""
    _, module = programs
    program = module.BatchNormVAE()
    config = TrainConfig(epochs=2, batch_size=50, train_examples=200, eval_examples=40, test_samples=5, device="cpu",
                         engine="svi", evidence_every=1, evidence_examples=20, evidence_samples=5,
                         data_dir=str(small_data_root))
    train(tmp_path / "run", config, program=program, progress=False)
    steps = config.epochs * math.ceil(config.train_examples / config.batch_size)
    assert [len(runs.read_metrics(tmp_path / "run"))] == [config.epochs]
    assert int(program.encoder[1].num_batches_tracked) == steps
    assert int(program.decoder[1].num_batches_tracked) == steps


def test_the_test_evaluation_of_train_equals_evaluate_up_to_monte_carlo_noise(programs, small_data_root, tmp_path):
    """A Dropout(0.5) program: test.json's ELBO and that of `ppl-vae evaluate` on the same images differ by
    Monte Carlo noise alone (in train mode, Dropout made test.json's tens of nats worse)."""
    path, _ = programs
    run_dir = tmp_path / "dropout"
    images, test_elbo_samples, evaluate_elbo_samples = 100, 10, 10
    assert cli.main(["train", "--program", f"{path}:DropoutVAE", "--run-dir", str(run_dir), "--epochs", "2",
                     "--train-examples", "500", "--eval-examples", str(images), "--batch-size", "50",
                     "--test-samples", "10", "--device", "cpu", "--no-progress", "--data-dir", str(small_data_root)]) == 0
    assert cli.main(["evaluate", str(run_dir), "--num-samples", "10", "--elbo-samples", str(evaluate_elbo_samples),
                     "--examples", str(images), "--no-progress", "--data-dir", str(small_data_root)]) == 0
    trained = json.loads((run_dir / "test.json").read_text())
    evaluated = json.loads((run_dir / "evaluation.json").read_text())
    assert trained["num_datapoints"] == evaluated["num_datapoints"] == images
    assert trained["elbo_samples"] == test_elbo_samples
    # The standard error of the difference of the two means over the same images is the Monte Carlo noise alone:
    # sigma^2 (1/10 + 1/10) / N, with sigma^2 the mean per-image variance of a one-draw ELBO, estimated here from
    # pairs of one-draw ELBOs of the trained program (the KL term is analytic: the noise is the reconstruction's).
    from ppl_vae.data import load_run_data

    program, config = load_run(run_dir, program=None)
    x = load_run_data(config["train"], str(small_data_root)).test[:images]
    pairs = torch.stack([elbo_decomposition(program.model, program.guide, x, num_samples=1)["elbo"]
                         for _ in range(8)])
    variance = pairs.var(0).mean().item()
    stderr = math.sqrt(variance * (1 / test_elbo_samples + 1 / evaluate_elbo_samples) / images)
    difference = trained["elbo"]["mean"] - evaluated["elbo"]["mean"]
    assert abs(difference) < 4 * stderr, (difference, stderr)


class CumulativeBatchNormVAE(nn.Module):
    """BatchNorm with momentum=None: running statistics that average over every batch seen."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, 8, bias=False), nn.BatchNorm1d(8, momentum=None), nn.Linear(8, 4))
        self.decoder = nn.Linear(2, 784)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def test_the_compiled_loss_is_not_chosen_where_it_would_keep_running_statistics_wrong():
    """The compiled loss does not count num_batches_tracked, so BatchNorm's cumulative average (momentum=None)
    comes out wrong from it; evaluations normalize with those statistics, so such a program trains with SVI."""
    batches = [_images(50, seed=seed) * (0.3 + 0.2 * seed) for seed in range(4)]
    compiled_program = CumulativeBatchNormVAE()
    weighted = Weighted(compiled_program)
    weighted.register_params = False
    loss = CompiledProgramLoss(weighted, "elbo", 1, 1)
    for x in batches:
        loss(x)
    with torch.no_grad():
        expected = torch.stack([compiled_program.encoder[0](x).mean(0) for x in batches]).mean(0)
    assert not torch.allclose(compiled_program.encoder[1].running_mean, expected, atol=1e-3)  # why it is refused
    program = CumulativeBatchNormVAE()
    choice = choose_engine(TrainConfig(engine="auto", device="cpu"), Weighted(program), (batches[0],), 1,
                           torch.device("cpu"))
    assert choice.engine == "svi" and "momentum=None" in choice.reason and "num_batches_tracked" in choice.reason
    with pytest.raises(ModelStructureError, match="momentum=None"):  # asked for by name: refused, with the reason
        choose_engine(TrainConfig(engine="jit", device="cpu"), Weighted(program), (batches[0],), 1, torch.device("cpu"))

"""The training package's seams: one KL-weight mechanism for every program, the schedules as pure functions that
the optimizers follow, the loop for a program held in memory (``fit``), and functions that fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

import ppl_vae
from ppl_vae.data import ImageData, MNISTData
from ppl_vae.errors import ModelStructureError, PplVaeError
from ppl_vae.model import VAE, VAEConfig
from ppl_vae.objectives import CompiledProgramLoss, CompiledVAELoss, ProgramLoss, VAELoss
from ppl_vae.programs import Weighted
from ppl_vae.training import TrainConfig, fit, make_optimizer
from ppl_vae.training.config import set_learning_rate

PACKAGE = Path(ppl_vae.__file__).resolve().parent


class TwoLatents(nn.Module):
    """A user's program with two latent sites and no ``kl_weight`` of its own."""

    def __init__(self, data_dim: int = 6):
        super().__init__()
        self.decoder = nn.Linear(2, data_dim)
        self.encoder = nn.Linear(data_dim, 4)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(a, 1.0).to_event(1))
            logits = self.decoder(torch.cat([a, b], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc_a, loc_b, scale_a, scale_b = self.encoder(x).split(1, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(loc_a, nn.functional.softplus(scale_a) + 0.1).to_event(1))
            pyro.sample("b", dist.Normal(loc_b, nn.functional.softplus(scale_b) + 0.1).to_event(1))


def loss_by_hand(program: nn.Module, x: torch.Tensor, beta: float, seed: int) -> float:
    """-(log p(x | z) - beta (log q(z | x) - log p(z))) with the draws of ``seed``: what a KL weight beta means."""
    with torch.no_grad():
        return _loss_by_hand(program, x, beta, seed)


def _loss_by_hand(program: nn.Module, x: torch.Tensor, beta: float, seed: int) -> float:
    pyro.set_rng_seed(seed)
    guide_trace = pyro.poutine.trace(program.guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(program.model, trace=guide_trace)).get_trace(x)
    total = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        log_p = float(site["fn"].log_prob(site["value"]).sum())
        if site["is_observed"]:
            total += log_p
        else:
            log_q = float(guide_trace.nodes[name]["fn"].log_prob(guide_trace.nodes[name]["value"]).sum())
            total -= beta * (log_q - log_p)
    return -total


@pytest.mark.parametrize("make_program", [lambda: VAE(VAEConfig(data_dim=6, latent_dim=2, hidden_sizes=(4,))),
                                          TwoLatents], ids=["built-in VAE", "user program"])
def test_one_kl_weight_mechanism_gives_reconstruction_minus_beta_kl_for_any_program(make_program):
    torch.manual_seed(0)
    pyro.clear_param_store()
    program = make_program()
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    weighted = Weighted(program)
    for beta in (1.0, 0.3, 2.5):
        weighted.kl_weight = beta
        pyro.set_rng_seed(7)
        loss = Trace_ELBO().loss(weighted.model, weighted.guide, x)
        assert loss == pytest.approx(loss_by_hand(program, x, beta, seed=7), rel=1e-5), beta


def test_the_built_in_vae_has_no_second_kl_weight():
    vae = VAE(VAEConfig(data_dim=6, latent_dim=2, hidden_sizes=(4,)))
    assert vae.kl_weight == 1.0
    with pytest.raises(PplVaeError, match=r"Weighted\(vae, kl_weight=beta\)"):
        vae.kl_weight = 0.5  # would silently do nothing: refused in one line


def test_program_neutral_names_and_their_old_aliases():
    assert VAELoss is ProgramLoss and CompiledVAELoss is CompiledProgramLoss and MNISTData is ImageData


def test_both_optimizer_kinds_take_the_rate_set_for_the_epoch_even_from_restored_state():
    config = TrainConfig(epochs=6, learning_rate=1e-2)
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer, _ = make_optimizer(config, [parameter])
    set_learning_rate(optimizer, 3e-3)
    assert optimizer.param_groups[0]["lr"] == 3e-3
    pyro_optimizer = make_optimizer(config)
    set_learning_rate(pyro_optimizer, 4e-3)  # before Pyro made its per-parameter Adam: the one it makes takes it
    pyro_optimizer([parameter])
    (made,) = pyro_optimizer.optim_objs.values()
    assert made.optimizer.param_groups[0]["lr"] == 4e-3
    set_learning_rate(pyro_optimizer, 5e-3)  # and one it made already
    assert made.optimizer.param_groups[0]["lr"] == 5e-3


def test_fit_trains_a_program_in_memory_through_the_one_loop(small_data_root):
    from ppl_vae.data import load_mnist

    data = load_mnist(small_data_root, "dynamic", train_examples=60, eval_examples=20)
    torch.manual_seed(0)
    program = VAE(VAEConfig(latent_dim=2, hidden_sizes=(8,)))
    records = fit(program, data, TrainConfig(epochs=2, batch_size=30, learning_rate=1e-2, objective="meanfield",
                                             beta=0.5, evidence_every=0), progress=False)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["train_elbo"], r["val_elbo"]])).all() for r in records)
    assert all(r["kl_weight"] == 0.5 for r in records) and not program.training


def test_fit_refuses_what_train_refuses(small_data_root):
    from ppl_vae.data import load_mnist

    data = load_mnist(small_data_root, "dynamic", train_examples=20, eval_examples=10)
    with pytest.raises(ModelStructureError, match="has no model or guide method"):
        fit(nn.Linear(2, 2), data, TrainConfig(epochs=1), progress=False)


def long_functions(path: Path, limit: int = 80) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_of_the_training_side_is_longer_than_a_screen():
    files = [*sorted((PACKAGE / "training").glob("*.py")), PACKAGE / "objectives.py", PACKAGE / "distributed.py",
             PACKAGE / "train.py", PACKAGE / "process_group.py"]
    assert [f for path in files for f in long_functions(path)] == []


def test_the_loop_reads_on_one_screen():
    from ppl_vae.training import loop

    source = Path(loop.__file__).read_text()
    tree = ast.parse(source)
    loop_functions = {node.name: node.end_lineno - node.lineno + 1 for node in tree.body
                      if isinstance(node, ast.FunctionDef) and node.name in ("train", "train_epochs", "train_one_epoch")}
    assert len(loop_functions) == 3 and max(loop_functions.values()) <= 45, loop_functions

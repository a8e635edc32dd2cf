"""Parameters without a gradient on some kind of step, found before training on several processes (issue 26).

DistributedDataParallel fails on the step after one that left a parameter unused unless it was built with
``find_unused_parameters``; the first-batch check finds such parameters on an unlabelled and a labelled batch
(:func:`ppl_vae.training.checks.unused_parameters_choice`) and the DDP engine is told of them. The spawned group
of tests/test_distributed.py trains with them on 2 processes (its "shift" case); here, the check itself, in process.
"""

from __future__ import annotations

import pyro
import pytest
import torch
import torch.distributed as dist

import distributed_workers as workers
from ppl_vae.errors import ModelStructureError
from ppl_vae.models.m2 import M2
from ppl_vae.programs import Weighted
from ppl_vae.training.checks import check_batches, unused_parameters_choice
from ppl_vae.training.engines import DdpEngine, EngineChoice, parameters_without_gradient
from ppl_vae.training.semi import labelled_check_batch, trained_program

CHOICE = EngineChoice("auto", "jit", "checked")


def found(program: torch.nn.Module, alpha: float | None) -> EngineChoice:
    """The check of a tiny --labelled run of ``program`` at ``alpha`` (None: Kingma's 0.1 N)."""
    config = workers.labelled_config(alpha)
    data = workers.labelled_data()
    trained = Weighted(trained_program(program, data, config))
    first = check_batches(data, config, torch.Generator().manual_seed(config.seed))[0]
    return unused_parameters_choice(CHOICE, config, trained, program, data, first, 1, True)


def tiny_m2() -> M2:
    pyro.set_rng_seed(0)
    return M2(**workers.LABELLED_M2)


def test_a_parameter_unused_on_labelled_steps_is_found_whatever_alpha():
    choice = found(workers.shifted_m2(), None)  # alpha = 0.1 N > 0: the old rule told DDP nothing
    assert choice.unused_parameters == ("unlabelled_shift",)
    assert choice.reason.startswith("checked; DDP looks for unused parameters every step")
    assert choice.reason.endswith("no gradient on labelled steps unlabelled_shift")


def test_the_classifier_is_unused_on_labelled_steps_at_alpha_0_only():
    classifier = {name for name, _ in tiny_m2().named_parameters() if name.startswith("classifier.")}
    assert set(found(tiny_m2(), 0.0).unused_parameters) == classifier
    assert found(tiny_m2(), None) == CHOICE  # every parameter has a gradient on both kinds of step: nothing to do


def test_the_check_leaves_gradients_random_streams_and_running_statistics_alone():
    program = workers.shifted_m2()
    program.decoder.append(torch.nn.BatchNorm1d(workers.LABELLED_M2["data_dim"]))  # running statistics to move
    config, data = workers.labelled_config(None), workers.labelled_data()
    trained = Weighted(trained_program(program, data, config))
    state = {name: value.clone() for name, value in program.state_dict().items()}
    random_state = torch.get_rng_state()
    unused = parameters_without_gradient(trained, config, labelled_check_batch(data, config), 1, True, program)
    assert unused == ("unlabelled_shift",)
    assert torch.equal(torch.get_rng_state(), random_state)
    assert all(p.grad is None for p in program.parameters())
    assert all(torch.equal(value, state[name]) for name, value in program.state_dict().items())


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo group of this process alone (DDP's reducer checks unused parameters with one process too)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(workers.free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield type("Context", (), {"rank": 0, "world_size": 1, "device": torch.device("cpu")})()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_a_step_leaving_parameters_unused_that_the_check_did_not_see_is_one_line(one_process_group):
    config, data = workers.labelled_config(None), workers.labelled_data()
    program = workers.shifted_m2()
    trained = Weighted(trained_program(program, data, config))
    engine = DdpEngine(trained, config, 1, one_process_group, enumerated=True)  # not told of the unused shift
    engine.set_learning_rate(config.learning_rate)
    engine.begin_epoch(type("NoStop", (), {"requested": False})())
    engine.step(labelled_check_batch(data, config))  # the labelled step leaves the shift unused
    with pytest.raises(ModelStructureError, match="^on several processes, a training step left some .* --devices 1$"):
        engine.step(labelled_check_batch(data, config))

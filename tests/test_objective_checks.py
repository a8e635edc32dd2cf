"""Objectives and engines checked against what the program is (issue 23, items 1 and 3).

Programs as a user would write them (tests/discrete_models.py): an M2 with a Categorical guide site,
a VAE with a data-dependent branch, a VAE with a Python call counter. An objective whose gradient
estimator the program breaks is refused before anything is written, naming the site and the objective
that works; ``--engine auto`` compiles only a faithful trace, and ``--engine jit`` refuses the others.
"""

import copy
import json
import re
from pathlib import Path

import pyro
import pytest
import torch
from discrete_models import M2, BatchNormVAE, BranchingVAE, CountingVAE, SmallVAE, SummedM2

from ppl_vae import cli, objectives, runs
from ppl_vae.errors import ModelStructureError, NumericalFaultError
from ppl_vae.programs import Weighted
from ppl_vae.train import CompiledEngine, SviEngine, TrainConfig, choose_engine, train

PROGRAMS = Path(__file__).parent / "discrete_models.py"
CPU = torch.device("cpu")


def tiny(small_data_root, **overrides) -> TrainConfig:
    settings = dict(epochs=1, batch_size=50, data_dir=str(small_data_root), train_examples=100, eval_examples=20,
                    test_samples=2, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def small_cli(small_data_root) -> list[str]:
    return ["--epochs", "1", "--batch-size", "50", "--train-examples", "100", "--eval-examples", "20",
            "--test-samples", "2", "--device", "cpu", "--no-progress", "--data-dir", str(small_data_root)]


@pytest.mark.parametrize("objective, particles, why", [
    ("iwae", 2, "multiplies its score-function term by alpha/(1-alpha) = 0"),
    ("meanfield", 1, "has no score-function term for it"),
])
def test_an_objective_whose_gradient_a_categorical_site_breaks_is_refused_before_anything_is_written(
        tmp_path, small_data_root, objective, particles, why):
    with pytest.raises(ModelStructureError) as refused:
        train(tmp_path / "run", tiny(small_data_root, objective=objective, particles=particles), program=M2(), progress=False)
    message = str(refused.value)
    assert "guide site 'y' (Categorical) is not reparameterized" in message and why in message
    assert "Train it with --objective elbo" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_elbo_trains_the_categorical_program_with_svi_saying_why_and_jit_is_refused(tmp_path, small_data_root, capsys):
    program = M2()
    classifier = copy.deepcopy(program.classifier.state_dict())
    train(tmp_path / "auto", tiny(small_data_root), program=program, progress=True)
    out = capsys.readouterr().out
    reason = "non-reparameterized site 'y' (Categorical): the compiled loss is checked only for reparameterized sites"
    assert f"training engine: svi (--engine auto: {reason})" in out and "gradients differ" not in out
    assert runs.read_json(tmp_path / "auto" / "config.json")["engine"]["reason"] == reason
    # Trace_ELBO's score-function term reaches q(y | x): its weights moved.
    assert any(not torch.equal(value, program.classifier.state_dict()[name]) for name, value in classifier.items())
    with pytest.raises(ModelStructureError, match=re.escape(f"--engine jit cannot train this program faithfully: {reason}")):
        train(tmp_path / "jit", tiny(small_data_root, engine="jit"), program=M2(), progress=False)
    assert not (tmp_path / "jit").exists()


def test_a_guide_site_marked_for_enumeration_trains_summed_out_with_elbo_and_meanfield_is_refused(tmp_path, small_data_root):
    result = train(tmp_path / "elbo", tiny(small_data_root), program=M2(enumerate=True), progress=False)
    assert result["objective"].startswith("TraceEnum_ELBO") and result["kl"]["sites"]["y"].get("enumerated")
    with pytest.raises(ModelStructureError) as refused:
        train(tmp_path / "run", tiny(small_data_root, objective="meanfield"), program=M2(enumerate=True), progress=False)
    message = str(refused.value)
    assert "guide site 'y' is marked for enumeration, and --objective meanfield cannot sum it out" in message
    assert "train it with --objective elbo" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_a_model_site_summed_out_by_enumeration_is_refused_saying_so(tmp_path, small_data_root):
    with pytest.raises(ModelStructureError, match="the model's site 'y' is marked for enumeration .*does not yet train"):
        train(tmp_path / "run", tiny(small_data_root), program=SummedM2(), progress=False)
    assert not (tmp_path / "run").exists()


def test_validate_is_recorded_kept_on_resume_and_turns_pyros_checks_on(tmp_path, small_data_root, capsys, monkeypatch):
    invalid = ["train", "--program", f"{PROGRAMS}:SmallVAE", "--program-kwargs", '{"probs_scale": 2.0}',
               *small_cli(small_data_root)]
    # torch's Bernoulli clamps probabilities above 1 without validation; with it, Pyro refuses them.
    assert cli.main([*invalid, "--run-dir", str(tmp_path / "off")]) == 0
    assert runs.read_json(tmp_path / "off" / "config.json")["train"]["pyro_validation"] is False
    capsys.readouterr()
    assert cli.main([*invalid, "--run-dir", str(tmp_path / "on"), "--validate"]) == 2
    error = capsys.readouterr().err
    assert "the program failed on the first training batch" in error and "probs" in error
    assert not (tmp_path / "on").exists()
    valid = ["train", "--program", f"{PROGRAMS}:M2", *small_cli(small_data_root), "--run-dir", str(tmp_path / "valid")]
    assert cli.main([*valid, "--validate"]) == 0
    assert runs.read_json(tmp_path / "valid" / "config.json")["train"]["pyro_validation"] is True
    calls = []
    monkeypatch.setattr(pyro, "enable_validation", lambda on=True: calls.append(on))
    assert cli.main(["train", "--resume", "--run-dir", str(tmp_path / "valid"), "--epochs", "2", "--no-progress",
                     "--data-dir", str(small_data_root)]) == 0
    assert calls == [True] and runs.read_json(tmp_path / "valid" / "config.json")["train"]["pyro_validation"] is True


def test_a_data_dependent_branch_keeps_auto_on_svi_with_the_tracer_warning_and_jit_is_refused(tmp_path, small_data_root,
                                                                                              capsys):
    train(tmp_path / "auto", tiny(small_data_root), program=BranchingVAE(), progress=True)
    out = capsys.readouterr().out
    assert "training engine: svi (--engine auto: the trace is not faithful to the program's Python: TracerWarning " \
           "at discrete_models.py:" in out
    record = runs.read_json(tmp_path / "auto" / "config.json")["engine"]
    assert record["engine"] == "svi" and "Converting a tensor to a Python boolean" in record["reason"]
    with pytest.raises(ModelStructureError, match="--engine jit cannot train this program faithfully: .*TracerWarning"):
        train(tmp_path / "jit", tiny(small_data_root, engine="jit"), program=BranchingVAE(), progress=False)
    assert not (tmp_path / "jit").exists()


def test_python_state_keeps_auto_on_svi_which_stops_at_the_nan_and_jit_is_refused(tmp_path, small_data_root):
    # The model's 8th call (step 2 of epoch 2, after the first-batch checks and epoch 1's steps and validation)
    # turns NaN: SVI runs the Python every step and stops there; a compiled trace would never see it.
    with pytest.raises(NumericalFaultError, match="the loss became nan at epoch 2, step 2 of 2"):
        train(tmp_path / "auto", tiny(small_data_root, epochs=3), program=CountingVAE(nan_after=7), progress=False)
    record = json.loads((tmp_path / "auto" / "config.json").read_text())["engine"]
    assert record["engine"] == "svi" and "changes its Python state (attribute 'calls')" in record["reason"]
    with pytest.raises(ModelStructureError, match=r"--engine jit cannot train this program faithfully: .*'calls'"):
        train(tmp_path / "jit", tiny(small_data_root, engine="jit"), program=CountingVAE(), progress=False)
    assert not (tmp_path / "jit").exists()


def test_batchnorm_running_statistics_keep_auto_on_svi_and_jit_is_refused():
    # A compiled graph replays the batch statistics but never updates the running ones that eval mode uses.
    x = torch.bernoulli(torch.full((64, 10), 0.3))
    choice = choose_engine(TrainConfig(), Weighted(BatchNormVAE(data_dim=10)), (x,), 1, CPU)
    assert choice.engine == "svi" and "changes its buffers (buffer 'encoder.1.running_mean')" in choice.reason
    with pytest.raises(ModelStructureError, match="--engine jit cannot train this program faithfully: .*running_mean"):
        choose_engine(TrainConfig(engine="jit"), Weighted(BatchNormVAE(data_dim=10)), (x,), 1, CPU)


def test_a_trace_that_does_not_hold_on_a_second_batch_of_other_content_is_unfaithful(monkeypatch):
    # As if the branch raised no TracerWarning (a library that silences them): the second batch still tells.
    monkeypatch.setattr(objectives, "_user_tracer_warning", lambda caught: None)
    generator = torch.Generator().manual_seed(0)
    dense = torch.bernoulli(torch.full((64, 10), 0.5), generator=generator)
    sparse = torch.bernoulli(torch.full((64, 10), 0.05), generator=generator)
    program = Weighted(BranchingVAE(data_dim=10, threshold=0.3))
    assert objectives.compiled_loss_problem(program, (dense,)) is None  # the first batch alone cannot tell
    problem = objectives.compiled_loss_problem(program, (dense,), second_batch=(sparse,))
    assert isinstance(problem, objectives.UnfaithfulTrace) and problem.startswith("on a second batch of other content, the compiled")
    with pytest.raises(ModelStructureError, match="on a second batch of other content"):
        choose_engine(TrainConfig(engine="jit"), program, (dense,), 1, CPU, second_batch=(sparse,))


def test_the_categorical_programs_reason_names_the_site_for_a_direct_caller_too():
    x = torch.bernoulli(torch.full((64, 10), 0.3))
    choice = choose_engine(TrainConfig(), Weighted(M2(data_dim=10)), (x,), 1, CPU)
    assert choice.engine == "svi" and choice.reason.startswith("non-reparameterized site 'y' (Categorical)")


def test_both_engines_stop_a_nan_loss_with_the_same_message():
    """A NaN the compiled graph computes (here from a parameter) is caught by its step's check, as SVI's is."""
    x = torch.bernoulli(torch.full((16, 10), 0.3))
    messages = []
    for name, make in (("svi", SviEngine), ("jit", CompiledEngine)):
        pyro.clear_param_store()
        program = Weighted(SmallVAE(data_dim=10))
        engine = make(program, TrainConfig(engine=name))
        with pyro.validation_enabled(False):
            engine.step(x)
            with torch.no_grad():
                program.program.decoder[2].bias.fill_(float("nan"))
            with pytest.raises(NumericalFaultError) as fault:
                engine.step(x)
        messages.append(str(fault.value))
    assert messages == ["the loss became nan"] * 2

"""Enumeration in training (issue 26, item 1): a program whose guide marks discrete sites for enumeration trains
with TraceEnum_ELBO through the one loop, engines and checkpoints; ``--enumerate`` marks them, is recorded and is
re-applied wherever the run's program is rebuilt; objectives that cannot enumerate are refused naming elbo."""

from pathlib import Path

import pytest
import torch
from discrete_models import M2, SmallVAE
from pyro.infer import TraceEnum_ELBO

from ppl_vae import cli, runs
from ppl_vae.errors import ModelStructureError
from ppl_vae.inspection import inspect_program
from ppl_vae.objectives import CompiledProgramLoss, fixed_standard_normal
from ppl_vae.programs import ProgramSpec, Weighted, build_program
from ppl_vae.train import TrainConfig, choose_engine, load_run, make_engine, train

PROGRAMS = Path(__file__).parent / "discrete_models.py"
CPU = torch.device("cpu")


def tiny(small_data_root, **overrides) -> TrainConfig:
    settings = dict(epochs=1, batch_size=50, data_dir=str(small_data_root), train_examples=100, eval_examples=20,
                    test_samples=2, device="cpu", engine="svi")
    return TrainConfig(**{**settings, **overrides})


def small_cli(small_data_root) -> list[str]:
    return ["--batch-size", "50", "--train-examples", "100", "--eval-examples", "20", "--test-samples", "2",
            "--device", "cpu", "--no-progress", "--data-dir", str(small_data_root), "--engine", "svi"]


def test_the_svi_engine_of_an_enumerated_program_is_trace_enum_elbo_and_its_steps_are_its_loss():
    program = M2(data_dim=12, enumerate=True)
    x = torch.bernoulli(torch.full((6, 12), 0.3))
    engine = make_engine("svi", Weighted(program), TrainConfig(engine="svi"), 1, enumerated=True)
    assert isinstance(engine.svi.loss.__self__, TraceEnum_ELBO)
    with fixed_standard_normal():  # z's draws held fixed: what is left to differ would be y's draw
        expected = float(TraceEnum_ELBO(max_plate_nesting=1).loss(program.model, program.guide, x))
        assert engine.step((x,)) == pytest.approx(expected, rel=1e-5)
    compiled = make_engine("jit", Weighted(M2(data_dim=12, enumerate=True)), TrainConfig(engine="jit"), 1, enumerated=True)
    assert isinstance(compiled.loss, CompiledProgramLoss) and compiled.loss.enumerated


def test_auto_compiles_an_enumerated_program_where_jit_trace_enum_elbo_is_checked_equal():
    program = Weighted(build_program(ProgramSpec("m2", kwargs={"hidden_sizes": [16], "latent_dim": 2}),
                                     data_info={"data_dim": 12}))
    x = torch.bernoulli(torch.full((8, 12), 0.3))
    structure = inspect_program(program.model, program.guide, (x,))
    choice = choose_engine(TrainConfig(), program, (x,), structure.max_plate_nesting, CPU, structure=structure)
    assert choice.engine == "jit" and "TraceEnum_ELBO's" in choice.reason


def test_enumerate_is_recorded_trains_summed_out_resumes_exactly_and_is_reapplied_when_the_run_is_rebuilt(
        tmp_path, small_data_root, capsys):
    args = ["train", "--program", f"{PROGRAMS}:M2", "--enumerate", *small_cli(small_data_root)]
    assert cli.main([*args, "--epochs", "2", "--run-dir", str(tmp_path / "straight")]) == 0
    assert cli.main([*args, "--epochs", "1", "--run-dir", str(tmp_path / "resumed")]) == 0
    assert cli.main(["train", "--resume", "--run-dir", str(tmp_path / "resumed"), "--epochs", "2", "--no-progress",
                     "--data-dir", str(small_data_root)]) == 0
    config = runs.read_json(tmp_path / "straight" / "config.json")
    assert config["train"]["enumerate"] is True
    test = runs.read_json(tmp_path / "straight" / "test.json")
    assert test["objective"].startswith("TraceEnum_ELBO") and test["kl"]["sites"]["y"]["enumerated"]
    straight = runs.load_checkpoint(tmp_path / "straight")["model"]
    resumed = runs.load_checkpoint(tmp_path / "resumed")["model"]
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)  # exact resume
    program, _ = load_run(tmp_path / "straight")
    x = torch.bernoulli(torch.full((4, 784), 0.2))
    assert inspect_program(program.model, program.guide, (x,)).enumerated == {"y": "parallel"}
    capsys.readouterr()
    evaluate = ["evaluate", str(tmp_path / "straight"), "-k", "2", "--examples", "10", "--no-progress"]
    assert cli.main([*evaluate, "--label-site", "y"]) == 0  # any program with a discrete label site
    evaluated = runs.read_json(tmp_path / "straight" / "evaluation.json")
    assert evaluated["kl"]["sites"]["y"]["enumerated"] and 0 <= evaluated["classification_error"] <= 1
    assert "Classifier error from q(y | x)" in capsys.readouterr().out
    assert cli.main([*evaluate, "--label-site", "digit"]) == 2
    assert "the guide has no sample site 'digit' when run on x alone" in capsys.readouterr().err


def test_enumerate_without_a_discrete_guide_site_is_one_line(tmp_path, small_data_root):
    with pytest.raises(ModelStructureError, match="--enumerate: the program's guide has no discrete sample site"):
        train(tmp_path / "run", tiny(small_data_root, enumerate=True), program=SmallVAE(), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective, particles", [("iwae", 2), ("meanfield", 1)])
def test_objectives_that_cannot_enumerate_are_refused_naming_elbo(tmp_path, small_data_root, objective, particles):
    config = tiny(small_data_root, objective=objective, particles=particles, enumerate=True)
    with pytest.raises(ModelStructureError, match=f"--objective {objective} cannot sum it out.*--objective elbo"):
        train(tmp_path / "run", config, program=M2(), progress=False)
    assert not (tmp_path / "run").exists()


def test_the_compiled_enumerated_loss_is_chosen_on_mnist_where_it_equals_trace_enum_to_the_gradients_scale(mnist):
    # The classifier's gradient under enumeration, sum_y q(y | x) (...), cancels to entries near 0 whose float32
    # rounding is that of the terms: compared elementwise it "differed" (to 4e-6 of its scale) and auto fell back.
    program = Weighted(build_program(ProgramSpec("m2", kwargs={"hidden_sizes": [16]}), data_info={"data_dim": 784}))
    x = mnist.train[:100].round()
    structure = inspect_program(program.model, program.guide, (x,))
    choice = choose_engine(TrainConfig(), program, (x,), structure.max_plate_nesting, CPU, structure=structure)
    assert choice.engine == "jit", choice.reason

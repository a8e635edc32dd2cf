"""``--engine auto`` (the default): the compiled loss where it is checked equal to Trace_ELBO's, SVI otherwise, recorded."""

import copy
import json

import pyro
import pytest
import torch
from test_train_programs import LaplaceCode

from ppl_vae import objectives, runs
from ppl_vae.model import VAE, VAEConfig
from ppl_vae.programs import Weighted
from ppl_vae.train import COMPILED_LOSS_RTOL, TrainConfig, choose_engine, train

SMALL_VAE = dict(latent_dim=4, hidden_sizes=(32,))
CPU = torch.device("cpu")


def tiny(small_data_root, **overrides) -> TrainConfig:
    settings = dict(epochs=1, batch_size=50, data_dir=str(small_data_root), train_examples=100, eval_examples=20,
                    test_samples=2, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def batch() -> tuple[torch.Tensor]:
    return (torch.bernoulli(torch.full((8, 784), 0.3)),)


def test_auto_is_the_default_and_picks_the_compiled_loss_for_the_builtin_vae():
    assert TrainConfig().engine == "auto"
    choice = choose_engine(TrainConfig(), Weighted(VAE(VAEConfig(**SMALL_VAE))), batch(), 1, CPU)
    assert (choice.requested, choice.engine) == ("auto", "jit")
    assert f"equal Trace_ELBO's on the first batch with the same draws, to rtol {COMPILED_LOSS_RTOL:g}" in choice.reason
    assert choice.check_seconds > 0


def test_auto_picks_the_compiled_loss_for_the_other_built_in_programs_too():
    from ppl_vae.models import ConditionalVAE, TwoLayerVAE

    x = batch()[0]
    two_layer = choose_engine(TrainConfig(), Weighted(TwoLayerVAE(latent=(4, 2), hidden=((16,), (8,)))), (x,), 1, CPU)
    y = torch.arange(8) % 10
    conditional = choose_engine(TrainConfig(labels=True), Weighted(ConditionalVAE(latent_dim=3, hidden_sizes=(16,))),
                                (x, y), 1, CPU)
    assert two_layer.engine == conditional.engine == "jit"


@pytest.mark.parametrize("settings, engine, reason", [
    (dict(objective="iwae", particles=2), "svi", "--objective iwae has no working compiled loss"),
    (dict(objective="meanfield"), "svi", "--objective meanfield has no working compiled loss"),
    (dict(pyro_validation=True), "svi", "Pyro's validation is on"),
    (dict(engine="svi"), "svi", "as asked"),
])
def test_auto_keeps_svi_where_the_compiled_loss_does_not_apply(settings, engine, reason):
    choice = choose_engine(TrainConfig(**settings), Weighted(VAE(VAEConfig(**SMALL_VAE))), batch(), 1, CPU)
    assert choice.engine == engine and reason in choice.reason and choice.check_seconds == 0


def test_auto_keeps_svi_on_cuda_until_the_compiled_loss_is_measured_there():
    # Only the device's type is read: no GPU is needed to ask.
    choice = choose_engine(TrainConfig(), Weighted(VAE(VAEConfig(**SMALL_VAE))), batch(), 1, torch.device("cuda"))
    assert choice.engine == "svi" and "not yet measured on cuda" in choice.reason


def test_a_default_run_trains_with_the_compiled_loss_and_records_why(tmp_path, small_data_root, capsys):
    train(tmp_path / "run", tiny(small_data_root), VAEConfig(**SMALL_VAE), progress=True)
    assert "training engine: jit (--engine auto: the compiled loss and its gradients equal Trace_ELBO's" in capsys.readouterr().out
    saved = runs.read_json(tmp_path / "run" / "config.json")
    assert saved["train"]["engine"] == "jit"
    assert saved["engine"]["requested"] == "auto" and saved["engine"]["engine"] == "jit"
    assert runs.load_checkpoint(tmp_path / "run")["optimizer_format"] == "torch"
    # Resumed, it keeps its engine and its record of why (the check is run again).
    train(tmp_path / "run", TrainConfig(epochs=2), resume=True, progress=False)
    resumed = runs.read_json(tmp_path / "run" / "config.json")
    assert resumed["engine"]["requested"] == "auto" and resumed["engine"]["reason"] == saved["engine"]["reason"]
    assert [m["epoch"] for m in runs.read_metrics(tmp_path / "run")] == [1, 2]


def test_auto_falls_back_to_svi_with_its_note_for_a_program_whose_compiled_loss_differs(tmp_path, small_data_root, capsys,
                                                                                        recwarn):
    # Laplace draws are not reached by the check's fixed standard-normal noise: the losses differ.
    train(tmp_path / "laplace", tiny(small_data_root), program=LaplaceCode(), progress=True)
    out = capsys.readouterr().out
    assert "training engine: svi (--engine auto: the compiled loss" in out and "differs from Trace_ELBO's" in out
    assert not [w for w in recwarn if "--engine" in str(w.message)]  # a note, not a warning: auto chose
    saved = json.loads((tmp_path / "laplace" / "config.json").read_text())
    assert saved["train"]["engine"] == "svi" and saved["engine"]["engine"] == "svi"
    assert "differs from Trace_ELBO's" in saved["engine"]["reason"]
    assert runs.load_checkpoint(tmp_path / "laplace")["optimizer_format"] == "pyro"


def test_auto_falls_back_to_svi_where_the_compiled_loss_fails(tmp_path, small_data_root, monkeypatch):
    def fail(self, *data):
        raise RuntimeError("tracer cannot follow this program")

    monkeypatch.setattr(objectives.CompiledProgramLoss, "forward", fail)
    train(tmp_path / "run", tiny(small_data_root), VAEConfig(**SMALL_VAE), progress=False)
    record = runs.read_json(tmp_path / "run" / "config.json")["engine"]
    assert record["engine"] == "svi"
    assert record["reason"] == "the compiled loss failed on this program (RuntimeError: tracer cannot follow this program)"


def test_a_compiled_run_whose_check_fails_on_resume_is_refused_not_switched(tmp_path, small_data_root, monkeypatch):
    train(tmp_path / "run", tiny(small_data_root), VAEConfig(**SMALL_VAE), progress=False)
    monkeypatch.setattr("ppl_vae.training.engines.compiled_loss_problem", lambda *args, **kwargs: "a changed torch")
    from ppl_vae.errors import RunDirectoryError

    with pytest.raises(RunDirectoryError, match="was trained with --engine jit, which cannot continue it now"):
        train(tmp_path / "run", TrainConfig(epochs=2), resume=True, progress=False)
    assert [m["epoch"] for m in runs.read_metrics(tmp_path / "run")] == [1]


def test_the_compiled_engine_makes_the_updates_of_svi_with_pyros_adam(small_data_root):
    """Two steps of the engine --engine auto picks (compiled loss, one fused torch Adam on the CPU) leave the
    parameters two SVI steps with Pyro's per-parameter Adam leave, with the draws held fixed."""
    from ppl_vae.objectives import fixed_standard_normal
    from ppl_vae.train import CompiledEngine, SviEngine

    torch.manual_seed(0)
    base = VAE(VAEConfig(**SMALL_VAE))
    x = torch.bernoulli(torch.full((16, 784), 0.3))
    states = {}
    for name, make in (("jit", CompiledEngine), ("svi", SviEngine)):
        pyro.clear_param_store()
        program = Weighted(copy.deepcopy(base))
        engine = make(program, TrainConfig(engine=name, learning_rate=1e-2))
        with fixed_standard_normal(), pyro.validation_enabled(False):
            losses = [engine.step(x) for _ in range(2)]
        states[name] = losses, program.state_dict()
    assert states["jit"][1] and states["jit"][0] == pytest.approx(states["svi"][0], rel=1e-6)
    assert all(group.get("fused") for group in CompiledEngine(Weighted(VAE(VAEConfig(**SMALL_VAE))),
                                                              TrainConfig(engine="jit")).optimizer.param_groups)
    for name, value in states["svi"][1].items():
        torch.testing.assert_close(states["jit"][1][name], value, rtol=0, atol=1e-6, msg=name)

"""Issue 28 wired into the trainer: learning-rate schedules from the one pure function, the plateau schedule and
early stopping with their states in the checkpoint (exact resume), the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppl_vae import runs, schedules
from ppl_vae.errors import PplVaeError
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig, train
from ppl_vae.training import loop

TINY_MODEL = VAEConfig(latent_dim=4, hidden_sizes=(32,))
TIMINGS = ("epoch_seconds", "steps_per_second", "train_seconds")


def tiny_config(small_data_root, **overrides) -> TrainConfig:
    settings = dict(epochs=4, batch_size=50, learning_rate=3e-3, data_dir=str(small_data_root), train_examples=300,
                    eval_examples=100, test_samples=10, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Killed(Exception):
    """Stands for a kill right after an epoch's checkpoint (and best checkpoint) was written."""


def killed_after(monkeypatch, epoch: int) -> None:
    real = loop.end_epoch

    def end_epoch(run, record):
        real(run, record)
        if record["epoch"] == epoch:
            raise Killed

    monkeypatch.setattr(loop, "end_epoch", end_epoch)


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def interrupted_and_resumed(tmp_path, monkeypatch, config: TrainConfig, kill_epoch: int) -> dict:
    with monkeypatch.context() as patch:
        killed_after(patch, kill_epoch)
        with pytest.raises(Killed):
            train(tmp_path, config, TINY_MODEL, progress=False)
    assert runs.load_checkpoint(tmp_path)["epoch"] == kill_epoch
    return train(tmp_path, None, resume=True, progress=False)


def test_every_schedule_sets_each_epochs_rate_from_the_one_function_and_records_it(tmp_path, small_data_root):
    config = tiny_config(small_data_root, epochs=5, lr_schedule="burda", engine="svi")
    train(tmp_path / "run", config, TINY_MODEL, progress=False)
    rates = [record["learning_rate"] for record in runs.read_metrics(tmp_path / "run")]
    assert rates == pytest.approx([3e-3 * 10 ** (-i / 7) for i in (0, 1, 1, 1, 2)], rel=1e-12)


@pytest.mark.parametrize("engine", ["svi", "jit"])
def test_the_plateau_schedule_resumes_exactly(tmp_path, small_data_root, monkeypatch, engine):
    # min_delta far above any change and patience 0: every epoch after the first lowers the rate for the next.
    config = tiny_config(small_data_root, lr_schedule="plateau", plateau_patience=0, plateau_factor=0.5, min_delta=1e6,
                         engine=engine)
    train(tmp_path / "straight", config, TINY_MODEL, progress=False)
    straight = runs.read_metrics(tmp_path / "straight")
    assert [r["learning_rate"] for r in straight] == pytest.approx([3e-3, 3e-3, 1.5e-3, 7.5e-4])
    interrupted_and_resumed(tmp_path / "split", monkeypatch, config, kill_epoch=2)
    split = runs.read_metrics(tmp_path / "split")
    assert [r["learning_rate"] for r in split] == [r["learning_rate"] for r in straight]
    for a, b in zip(without_timings(straight), without_timings(split)):
        assert a["val_elbo"] == pytest.approx(b["val_elbo"], abs=1e-6)
    state = runs.load_checkpoint(tmp_path / "split")["schedules"]["plateau"]
    assert state["reductions"] == 3 and state["lr"] == pytest.approx(3.75e-4)


@pytest.mark.parametrize("kill_epoch", [2, 4])
def test_a_run_killed_during_patience_stops_at_the_same_epoch_with_the_same_best_checkpoint(
    tmp_path, small_data_root, monkeypatch, kill_epoch,
):
    # Warm-up 2 epochs, patience 2, min_delta far above any change: epoch 1 is the best; patience counts from the
    # end of the warm-up (epoch 2), so the run stops after epoch 4 of 6. Killed in patience (2) or at the stop (4).
    config = tiny_config(small_data_root, epochs=6, early_stopping=2, min_delta=1e6, warmup_epochs=2, engine="svi")
    straight = train(tmp_path / "straight", config, TINY_MODEL, progress=False)
    resumed = interrupted_and_resumed(tmp_path / "split", monkeypatch, config, kill_epoch)
    a, b = runs.read_metrics(tmp_path / "straight"), runs.read_metrics(tmp_path / "split")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2, 3, 4]
    assert [r["best_epoch"] for r in b] == [1, 1, 1, 1]
    assert [r["epochs_without_improvement"] for r in b] == [0, 0, 1, 2]
    for run_dir in ("straight", "split"):
        best = runs.load_checkpoint(tmp_path / run_dir, which="best")
        assert best["epoch"] == 1 and runs.load_checkpoint(tmp_path / run_dir)["epoch"] == 4
    best_a = runs.load_checkpoint(tmp_path / "straight", which="best")["model"]
    best_b = runs.load_checkpoint(tmp_path / "split", which="best")["model"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    for result in (straight, resumed):  # the test evaluation is of the best epoch's weights, and says so
        assert (result["checkpoint"], result["epoch"], result["epochs"]) == ("best", 1, 4)
    assert straight["log_evidence"]["mean"] == pytest.approx(resumed["log_evidence"]["mean"], abs=1e-6)
    assert runs.BEST_CHECKPOINT_FILE in runs.read_json(tmp_path / "split" / runs.MANIFEST_FILE)["entries"]


def test_early_stopping_keeps_the_best_checkpoint_of_a_real_improvement(tmp_path, small_data_root):
    config = tiny_config(small_data_root, epochs=3, early_stopping=5, engine="svi")
    train(tmp_path / "run", config, TINY_MODEL, progress=False)
    metrics = runs.read_metrics(tmp_path / "run")
    best_epoch = max(metrics, key=lambda r: r["val_elbo"])["epoch"]
    assert metrics[-1]["best_epoch"] == best_epoch
    assert runs.load_checkpoint(tmp_path / "run", which="best")["epoch"] == best_epoch


@pytest.mark.parametrize("settings, message", [
    (dict(early_stopping=3, monitor="evidence"), "--evidence-every"),
    (dict(lr_schedule="plateau", monitor="evidence"), "--evidence-every"),
    (dict(min_delta=0.5), "apply to --early-stopping"),
    (dict(monitor="evidence", evidence_every=1), "apply to --early-stopping"),
    (dict(early_stopping=0), "at least 1"),
    (dict(lr_schedule="plateau", plateau_factor=2.0), "between 0 and 1"),
    (dict(monitor="loss", early_stopping=2), "unknown --monitor"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(settings, message):
    with pytest.raises(PplVaeError, match=message) as caught:
        TrainConfig(**settings)
    assert "\n" not in str(caught.value)


def test_schedules_monitored_value_reads_the_records_keys():
    assert schedules.monitored_value({"val_elbo": -90.0}, "elbo") == -90.0
    assert schedules.monitored_value({"val_elbo": -90.0}, "evidence") is None


# --- --checkpoint last|best: evaluate, plot, compare, diagnose ---------------------------------------------------


@pytest.fixture(scope="module")
def early_stopped_run(tmp_path_factory, small_data_root) -> str:
    """A run stopped early at epoch 3 whose best checkpoint is epoch 1 (the argument of the kill test above)."""
    run_dir = tmp_path_factory.mktemp("early") / "run"
    config = tiny_config(small_data_root, epochs=5, early_stopping=2, min_delta=1e6, engine="svi")
    train(run_dir, config, TINY_MODEL, progress=False)
    return str(run_dir)


EVALUATE = ("--num-samples", "5", "--elbo-samples", "2", "--examples", "20", "--device", "cpu", "--no-progress")


def test_evaluate_defaults_to_the_best_checkpoint_and_says_which_epoch(early_stopped_run, cli_main, small_data_root):
    import json

    ran = cli_main("evaluate", early_stopped_run, *EVALUATE, data_root=small_data_root)
    assert ran.returncode == 0, ran.stderr
    assert "epoch 1 (best checkpoint)" in ran.stdout
    saved = json.loads((Path(early_stopped_run) / runs.EVALUATION_FILE).read_text())
    assert (saved["checkpoint"], saved["epoch"]) == ("best", 1)
    ran = cli_main("evaluate", early_stopped_run, *EVALUATE, "--checkpoint", "last", data_root=small_data_root)
    assert ran.returncode == 0 and "epoch 3 (last checkpoint)" in ran.stdout
    saved = json.loads((Path(early_stopped_run) / runs.EVALUATION_FILE).read_text())
    assert (saved["checkpoint"], saved["epoch"]) == ("last", 3)
    # diagnose checks which checkpoint the evaluation is of: the default (best) is refused in one line now
    ran = cli_main("diagnose", early_stopped_run)
    assert ran.returncode == 2 and "--checkpoint best" in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    ran = cli_main("diagnose", early_stopped_run, "--checkpoint", "last")
    assert ran.returncode == 0 and "at epoch 3 (last checkpoint)" in ran.stdout
    # compare: the last checkpoint's evaluation, or the best's test.json (train evaluated the best epoch)
    out = Path(early_stopped_run).parent / "cmp"
    ran = cli_main("compare", early_stopped_run, "--out", out, "--checkpoint", "last")
    assert ran.returncode == 0 and "| 3 |" in ran.stdout
    ran = cli_main("compare", early_stopped_run, "--out", out)
    assert ran.returncode == 0 and "| 1 (best) |" in ran.stdout, ran.stdout
    ran = cli_main("plot", early_stopped_run, "--checkpoint", "best", data_root=small_data_root)
    assert ran.returncode == 0 and "at epoch 1 (best checkpoint)" in ran.stdout


def test_a_run_without_a_best_checkpoint_refuses_checkpoint_best_in_one_line(tmp_path, small_data_root, cli_main):
    train(tmp_path / "run", tiny_config(small_data_root, epochs=1), TINY_MODEL, progress=False)
    ran = cli_main("evaluate", tmp_path / "run", *EVALUATE, "--checkpoint", "best", data_root=small_data_root)
    assert ran.returncode == 2 and "--early-stopping" in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    ran = cli_main("evaluate", tmp_path / "run", *EVALUATE, data_root=small_data_root)
    assert ran.returncode == 0 and "epoch 1 (last checkpoint)" in ran.stdout


# --- --gradient standard|stl|dreg -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(small_data_root):
    from ppl_vae.data import load_mnist

    return load_mnist(small_data_root, "dynamic", train_examples=60, eval_examples=20)


def in_memory_run(program, data, **settings):
    from ppl_vae.training.setup import setup_in_memory

    return setup_in_memory(program, data, TrainConfig(epochs=1, batch_size=30, **settings), progress=True)


@pytest.mark.parametrize("gradient, objective, particles, estimator", [
    ("stl", "elbo", 1, "STLTrace_ELBO"), ("dreg", "iwae", 3, "DReGRenyi_ELBO")])
def test_engine_auto_trains_stl_and_dreg_with_svi_and_the_same_loss_values(
    small_data, capsys, gradient, objective, particles, estimator,
):
    import copy

    import pyro

    from tests.discrete_models import SmallVAE

    torch.manual_seed(0)
    program = SmallVAE()
    standard = in_memory_run(copy.deepcopy(program), small_data, objective=objective, particles=particles, engine="svi")
    run = in_memory_run(program, small_data, objective=objective, particles=particles, gradient=gradient)
    assert f"training engine: svi (--engine auto: --gradient {gradient}: the compiled loss" in capsys.readouterr().out
    assert type(run.engine.svi.loss_and_grads.__self__).__name__ == estimator
    batch = small_data.train[:30]
    losses = []
    for engine in (standard.engine, run.engine):
        pyro.set_rng_seed(3)
        pyro.clear_param_store()
        losses.append(engine.step(batch))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # the same objective on the same draws
    records = fit_records(program, small_data, objective=objective, particles=particles, gradient=gradient)
    assert all(torch.isfinite(torch.tensor([r["train_elbo"], r["val_elbo"]])).all() for r in records)


def fit_records(program, data, **settings):
    from ppl_vae.training import fit

    return fit(program, data, TrainConfig(epochs=1, batch_size=30, **settings), progress=False)


def test_stl_and_dreg_are_refused_for_programs_they_cannot_train(small_data):
    from ppl_vae.errors import ModelStructureError
    from tests.discrete_models import M2, BatchNormVAE

    with pytest.raises(ModelStructureError, match="'y' .*not reparameterized"):
        fit_records(M2(), small_data, gradient="stl")
    with pytest.raises(ModelStructureError, match="BatchNorm"):
        fit_records(BatchNormVAE(), small_data, objective="iwae", particles=2, gradient="dreg")


@pytest.mark.parametrize("settings, message", [
    (dict(gradient="stl", objective="iwae", particles=2), "use --gradient dreg"),
    (dict(gradient="dreg"), "use --gradient stl"),
    (dict(gradient="stl", engine="jit"), "--engine jit"),
    (dict(gradient="stl", objective="meanfield"), "--objective elbo only"),
])
def test_gradient_settings_that_make_no_sense_are_refused_in_one_line(settings, message):
    with pytest.raises(PplVaeError, match=message) as caught:
        TrainConfig(**settings)
    assert "\n" not in str(caught.value)


def test_the_new_train_options_are_refused_in_one_line_from_the_command_line(tmp_path, cli_main, small_data_root):
    ran = cli_main("train", "--run-dir", tmp_path / "run", "--gradient", "stl", "--engine", "jit", data_root=small_data_root)
    assert ran.returncode == 2 and "--engine jit" in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    ran = cli_main("train", "--run-dir", tmp_path / "run", "--min-delta", "0.5", data_root=small_data_root)
    assert ran.returncode == 2 and "--early-stopping" in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# --- --log tensorboard mlflow: started, resumed and closed by the loop ------------------------------------------


def test_trackers_log_every_epoch_once_across_a_kill_and_resume_and_overwrite_deletes_them(
    tmp_path, small_data_root, monkeypatch,
):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ppl_vae import trackers

    run_dir = tmp_path / "run"
    config = tiny_config(small_data_root, epochs=3, log=("tensorboard", "mlflow"), log_images_every=2, engine="svi")
    interrupted_and_resumed(run_dir, monkeypatch, config, kill_epoch=2)
    events = EventAccumulator(str(run_dir / trackers.TENSORBOARD_FOLDER), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val_elbo")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("val_kl_site/z")] == [1, 2, 3]  # the built-in VAE's latent site "z"
    metrics = runs.read_metrics(run_dir)
    assert [e.value for e in events.Scalars("learning_rate")] == pytest.approx([m["learning_rate"] for m in metrics])
    assert [e.step for e in events.Images("samples")] == [2, 3] == [e.step for e in events.Images("reconstructions")]
    saved = runs.read_json(run_dir / trackers.MLFLOW_RUN_FILE)
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    history = client.get_metric_history(saved["run_id"], "val_elbo")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([m["val_elbo"] for m in metrics])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "3"
    assert len(client.search_runs([saved["experiment_id"]])) == 1  # the resumed run continued the same MLflow run
    entries = runs.read_json(run_dir / runs.MANIFEST_FILE)["entries"]
    assert entries["tb"] == entries["mlruns"] == "tree" and entries["mlflow.db"] == "file"
    train(run_dir, tiny_config(small_data_root, epochs=1), TINY_MODEL, overwrite=True, progress=False)
    assert not (run_dir / "tb").exists() and not (run_dir / "mlruns").exists()
    assert not (run_dir / "mlflow.db").exists()


def test_a_missing_tracker_package_is_one_line_with_its_install_command_before_anything_is_written(
    tmp_path, small_data_root, monkeypatch,
):
    from ppl_vae import trackers

    monkeypatch.setitem(trackers._NEEDS, "mlflow", "ppl_vae_no_such_package")
    with pytest.raises(PplVaeError, match=r'pip install -e "\.\[mlflow\]"') as caught:
        train(tmp_path / "run", tiny_config(small_data_root, log=("mlflow",)), TINY_MODEL, progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "run" / runs.CONFIG_FILE).exists()


@pytest.mark.parametrize("settings, message", [
    (dict(tracking_uri="http://localhost:5000"), "--log mlflow"),
    (dict(log=("tensorboard",), tracking_uri="http://localhost:5000"), "--log mlflow"),
    (dict(log_images_every=2), "none is given"),
    (dict(log=("wandb",)), "unknown tracker"),
])
def test_tracker_settings_that_make_no_sense_are_refused(settings, message):
    with pytest.raises(PplVaeError, match=message):
        TrainConfig(**settings)


def test_fit_with_early_stopping_stops_and_leaves_the_best_epochs_weights(small_data):
    from ppl_vae.training import fit

    from tests.discrete_models import SmallVAE

    torch.manual_seed(0)
    program = SmallVAE()
    kept = {}
    real = loop.end_epoch

    def spy(run, record):  # the weights after each epoch, to compare with what fit leaves
        real(run, record)
        kept[record["epoch"]] = {k: v.clone() for k, v in run.program.state_dict().items()}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "end_epoch", spy)
        records = fit(program, small_data, TrainConfig(epochs=6, batch_size=30, learning_rate=1e-2, early_stopping=2,
                                                       min_delta=1e6), progress=False)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(torch.equal(program.state_dict()[k], kept[1][k]) for k in kept[1])
    assert not all(torch.equal(kept[3][k], kept[1][k]) for k in kept[1])


def test_the_train_command_says_the_test_table_is_of_the_best_epoch(tmp_path, cli_main, small_data_root):
    ran = cli_main("train", "--run-dir", tmp_path / "run", "--data-dir", small_data_root, "--train-examples", "300",
                   "--eval-examples", "100", "--batch-size", "50", "--latent-dim", "4", "--hidden-sizes", "32",
                   "--test-samples", "10", "--device", "cpu", "--epochs", "4", "--early-stopping", "1",
                   "--min-delta", "1000000", "--lr-schedule", "burda")
    assert ran.returncode == 0, ran.stderr
    assert "early stopping after epoch 2" in ran.stdout and "the best epoch is 1" in ran.stdout
    assert "after 2 epochs; epoch 1, the best checkpoint" in ran.stdout

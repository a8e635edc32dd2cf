"""Training on a small MNIST subset: it learns, it checkpoints, it resumes exactly."""

import json

import pytest
import torch

from ppl_vae import runs
from ppl_vae.errors import RunDirectoryError
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig, train

SMALL_MODEL = VAEConfig(latent_dim=8, hidden_sizes=(64,))


def small_config(small_data_root, **overrides):
    settings = dict(
        epochs=3, batch_size=50, learning_rate=3e-3, data_dir=str(small_data_root), train_examples=1500,
        eval_examples=300, test_samples=20, device="cpu", pyro_validation=True,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_improves_the_validation_elbo(tmp_path, small_data_root):
    result = train(tmp_path / "run", small_config(small_data_root, epochs=4), SMALL_MODEL, progress=False)
    metrics = runs.read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["val_elbo"] > metrics[0]["val_elbo"] + 3 * metrics[0]["val_elbo_stderr"]
    assert result["log_evidence"]["mean"] >= result["elbo"]["mean"] - 3 * result["elbo"]["stderr"]
    saved = json.loads((tmp_path / "run" / "test.json").read_text())
    assert saved["num_datapoints"] == 300 and saved["log_evidence"]["num_samples"] == 20
    for name in ("config.json", "checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file()


@pytest.mark.parametrize("engine", ["svi", "jit"])
def test_resume_continues_exactly_where_the_run_stopped(tmp_path, small_data_root, engine):
    schedule = dict(lr_schedule="step", lr_milestones=(1,), lr_gamma=0.5, engine=engine)
    config = small_config(small_data_root, epochs=2, **schedule)
    straight = train(tmp_path / "straight", config, SMALL_MODEL, progress=False)
    train(tmp_path / "split", small_config(small_data_root, epochs=1, **schedule), SMALL_MODEL, progress=False)
    resumed = train(tmp_path / "split", small_config(small_data_root, epochs=2), resume=True, progress=False)
    a, b = runs.read_metrics(tmp_path / "straight"), runs.read_metrics(tmp_path / "split")
    assert [m["epoch"] for m in b] == [1, 2]
    for key in ("train_elbo", "val_elbo", "learning_rate"):
        assert a[-1][key] == pytest.approx(b[-1][key], abs=1e-6)
    assert b[-1]["learning_rate"] == pytest.approx(0.5 * 3e-3)
    assert straight["log_evidence"]["mean"] == pytest.approx(resumed["log_evidence"]["mean"], abs=1e-6)
    state_a = runs.load_checkpoint(tmp_path / "straight")["model"]
    state_b = runs.load_checkpoint(tmp_path / "split")["model"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_resume_reads_the_checkpoint_onto_the_cpu(tmp_path, small_data_root, monkeypatch):
    # The saved RNG states must stay CPU byte tensors: torch.set_rng_state refuses any other kind, so a
    # checkpoint mapped onto a run's GPU could not be resumed there (shown here with the "meta" device).
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(torch.get_rng_state().to("meta"))
    train(tmp_path / "run", small_config(small_data_root, epochs=1, train_examples=100), SMALL_MODEL, progress=False)
    asked = []
    real = runs.load_checkpoint_for_resume

    def spy(run_dir, map_location="cpu"):
        asked.append(map_location)
        return real(run_dir, map_location)

    monkeypatch.setattr(runs, "load_checkpoint_for_resume", spy)
    train(tmp_path / "run", small_config(small_data_root, epochs=2, train_examples=100), resume=True, progress=False)
    assert asked == ["cpu"]  # not the run's device (torch.device("cpu") here, "cuda" on a GPU)


def test_existing_run_directory_is_refused_without_resume_or_overwrite(tmp_path, small_data_root):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("earlier work")
    with pytest.raises(RunDirectoryError, match="--resume"):
        train(tmp_path / "run", small_config(small_data_root, epochs=1), SMALL_MODEL, progress=False)
    assert (tmp_path / "run" / "something").read_text() == "earlier work"


def test_damaged_checkpoint_is_named_in_the_error(tmp_path, small_data_root):
    train(tmp_path / "run", small_config(small_data_root, epochs=1, train_examples=200), SMALL_MODEL, progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RunDirectoryError, match="checkpoint.pt is damaged"):
        runs.load_checkpoint(tmp_path / "run")

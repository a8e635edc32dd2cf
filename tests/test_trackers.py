"""ppl_vae.trackers: TensorBoard and MLflow, read back from what they wrote (event files, the MLflow store)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ppl_vae import trackers
from ppl_vae.errors import PplVaeError


def record(epoch: int, attempt: int = 0) -> dict:
    """An epoch's record as the loop writes it, with the KL of each latent site by its name; ``attempt`` marks a rerun."""
    return {"epoch": epoch, "train_elbo": -100.0 + epoch, "val_elbo": -101.0 + epoch + attempt / 10,
            "learning_rate": 1e-3, "kl_weight": 1.0, "device": "cpu", "val_elbo_stderr": 0.5,
            "val_kl_site": trackers.kl_per_site({"z_top": torch.full((4,), 2.0 * epoch),
                                                 "z_bottom": torch.tensor([1.0, 3.0])})}


def killed_and_resumed(tracker_factory, run_dir):
    """Epochs 1-3 logged, killed with its checkpoint at epoch 2; resumed, epochs 3-5 (epoch 3 again)."""
    tracker = tracker_factory()
    tracker.start(run_dir)
    tracker.log_params({"epochs": 5, "objective": "iwae", "seed": 0})
    for epoch in (1, 2, 3):
        tracker.log_epoch(record(epoch), step=epoch)
    tracker.log_images("samples", torch.rand(6, 1, 8, 8), step=2)
    tracker.close(finished=False)
    resumed = tracker_factory()
    resumed.start(run_dir, resume_epoch=2)
    resumed.log_params({"epochs": 5, "objective": "iwae", "seed": 0})
    for epoch in (3, 4, 5):
        resumed.log_epoch(record(epoch, attempt=1), step=epoch)
    resumed.close()


def test_kl_per_site_and_scalars_keep_the_programs_site_names():
    values = trackers.scalars(record(2))
    assert values["val_kl_site/z_top"] == 4.0 and values["val_kl_site/z_bottom"] == 2.0
    assert "epoch" not in values and "device" not in values and values["val_elbo"] == -99.0


def test_tensorboard_resume_continues_the_event_files_without_duplicated_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed_and_resumed(trackers.TensorBoardTracker, tmp_path)
    events = EventAccumulator(str(tmp_path / trackers.TENSORBOARD_FOLDER), size_guidance={"scalars": 0})
    events.Reload()
    val = events.Scalars("val_elbo")
    assert [e.step for e in val] == [1, 2, 3, 4, 5]
    assert val[2].value == pytest.approx(-101.0 + 3 + 0.1)  # epoch 3 as trained again, not the killed run's
    assert [e.value for e in events.Scalars("val_kl_site/z_top")] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert {"learning_rate", "kl_weight", "train_elbo", "val_kl_site/z_bottom"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("samples")] == [2]
    assert [e.step for e in events.Tensors("config/text_summary")] == [0]  # the configuration, once


def test_mlflow_resume_continues_the_same_run_without_duplicated_steps(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    killed_and_resumed(trackers.MLflowTracker, tmp_path)
    assert (tmp_path / trackers.MLFLOW_DATABASE).is_file()
    saved = __import__("json").loads((tmp_path / trackers.MLFLOW_RUN_FILE).read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    assert len(client.search_runs([saved["experiment_id"]])) == 1
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"epochs": "5", "objective": "iwae", "seed": "0"}
    history = client.get_metric_history(saved["run_id"], "val_elbo")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert [m.value for m in sorted(client.get_metric_history(saved["run_id"], "val_kl_site/z_top"),
                                    key=lambda m: m.step)] == [2.0, 4.0, 6.0, 8.0, 10.0]
    artifacts = [f for f in (tmp_path / trackers.MLFLOW_ARTIFACTS).rglob("*") if f.is_file()]
    assert any(f.suffix == ".png" for f in artifacts)  # the images, inside the run directory


def test_a_missing_extra_is_one_line_with_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "tensorboard")
                        else real(name, *a))
    for name in trackers.TRACKERS:
        with pytest.raises(PplVaeError, match=rf'pip install -e "\.\[{name}\]"') as caught:
            trackers.make_trackers([name])
        assert "\n" not in str(caught.value)
    with pytest.raises(PplVaeError, match="unknown tracker 'wandb'"):
        trackers.check_trackers(["wandb"])


def test_both_satisfy_the_tracker_protocol():
    assert isinstance(trackers.TensorBoardTracker(), trackers.Tracker)
    assert isinstance(trackers.MLflowTracker(), trackers.Tracker)

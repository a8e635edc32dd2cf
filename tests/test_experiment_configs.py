"""Every experiment configuration loads and runs for one step (the long runs happen elsewhere)."""

import json
from pathlib import Path

import pytest

from ppl_vae import runs
from ppl_vae.cli import main

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "experiments" / "configs").glob("burda2015-*.json"))
ONE_STEP = ["--epochs", "1", "--train-examples", "20", "--eval-examples", "10", "--test-samples", "2",
            "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_one_step(config, tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(data_root))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run_dir), *ONE_STEP]) == 0
    saved = json.loads((run_dir / "config.json").read_text())["train"]
    expected = json.loads(config.read_text())
    # The file's values arrive, the command line's win.
    assert saved["batch_size"] == expected["batch_size"] == 20
    assert saved["objective"] == expected["objective"] and saved["particles"] == expected["particles"]
    assert list(saved["lr_milestones"]) == expected["lr_milestones"]
    assert saved["epochs"] == 1
    assert [m["epoch"] for m in runs.read_metrics(run_dir)] == [1]


def test_config_with_an_unknown_option_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 1, "learning_rat": 0.1}))
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "unknown options ['learning_rat']" in capsys.readouterr().err


def test_learning_curve_of_log_px_is_recorded(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(data_root))
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "--epochs", "3", "--train-examples", "200", "--eval-examples",
                 "50", "--latent-dim", "4", "--hidden-sizes", "16", "--test-samples", "5", "--evidence-every", "2",
                 "--evidence-examples", "30", "--evidence-samples", "40", "--no-progress"]) == 0
    metrics = runs.read_metrics(run_dir)
    with_curve = [m["epoch"] for m in metrics if "val_log_px" in m]
    assert with_curve == [2, 3]  # every 2 epochs, and at the end
    last = metrics[-1]
    assert last["val_log_px_images"] == 30 and last["val_log_px_samples"] == 40
    assert last["val_log_px"] > last["val_elbo"] - 3 * last["val_elbo_stderr"]

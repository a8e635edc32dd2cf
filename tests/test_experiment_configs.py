"""Every experiment configuration loads and runs for one step (the long runs happen elsewhere)."""

import json
from pathlib import Path

import pytest

from ppl_vae import runs
from ppl_vae.cli import main

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "experiments" / "configs").glob("burda2015-*.json"))
TWO_LAYER = [c for c in CONFIGS if c.stem.startswith("burda2015-two-layer-")]
ONE_STEP = ["--epochs", "1", "--train-examples", "20", "--eval-examples", "10", "--test-samples", "2",
            "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_one_step(config, tmp_path, small_data_root, monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(small_data_root))
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


def test_two_layer_rows_are_the_papers():
    published = {"vae-k1": -85.33, "vae-k5": -85.01, "vae-k50": -84.78, "iwae-k5": -83.89, "iwae-k50": -82.90}
    assert sorted(c.stem.removeprefix("burda2015-two-layer-") for c in TWO_LAYER) == sorted(published)
    for path in TWO_LAYER:
        config = json.loads(path.read_text())
        row = path.stem.removeprefix("burda2015-two-layer-")
        assert config["_published_test_log_px"] == published[row]
        assert config["objective"] == ("iwae" if row.startswith("iwae") else "elbo") and config["particles"] == int(row.split("k")[-1])
        assert config["program"] == "two-layer" and config["program_kwargs"]["latent"] == [100, 50]


def test_two_layer_config_trains_with_the_compiled_engine(tmp_path, small_data_root, monkeypatch):
    # reproduce.py runs the VAE rows with --engine jit: the two-layer program compiles.
    monkeypatch.setenv("PPL_VAE_DATA", str(small_data_root))
    config = next(c for c in TWO_LAYER if c.stem.endswith("vae-k5"))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run_dir), *ONE_STEP, "--engine", "jit"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["train"]["engine"] == "jit"
    assert json.loads((run_dir / "program.json").read_text())["kwargs"]["hidden"] == [[200, 200], [100, 100]]


@pytest.mark.parametrize("value, message", [
    ([1, 2], "must be a JSON object of keyword arguments"),
    ("{not json", "is not valid JSON"),
    ("[1]", "must be a JSON object of keyword arguments"),
])
def test_config_program_kwargs_is_checked(value, message, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"program": "two-layer", "program_kwargs": value}))
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'program_kwargs' (--program-kwargs)" in err and message in err
    assert not (tmp_path / "run").exists()


def test_config_program_kwargs_as_an_object_or_as_json_text(tmp_path, small_data_root, monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(small_data_root))
    for i, value in enumerate(({"latent": [4, 2], "hidden": [[8], [8]]}, '{"latent": [4, 2], "hidden": [[8], [8]]}')):
        path = tmp_path / f"config{i}.json"
        path.write_text(json.dumps({"program": "two-layer", "program_kwargs": value, "batch_size": 10}))
        run_dir = tmp_path / f"run{i}"
        assert main(["train", "--config", str(path), "--run-dir", str(run_dir), *ONE_STEP]) == 0
        program = json.loads((run_dir / "program.json").read_text())
        assert program["name"] == "two-layer" and program["kwargs"] == {"latent": [4, 2], "hidden": [[8], [8]]}


def test_config_with_an_unknown_option_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 1, "learning_rat": 0.1}))
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "unknown options ['learning_rat']" in capsys.readouterr().err


def test_learning_curve_of_log_px_is_recorded(tmp_path, small_data_root, monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(small_data_root))
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

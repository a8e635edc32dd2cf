"""The command line end to end on a tiny configuration and a small copy of MNIST.

The commands run in this process through ``cli.main`` (its exit status, stdout and stderr are what a shell sees:
``python -m ppl_vae`` is ``sys.exit(main())``); the console script is started as a process once, and ``run_cli``
starts one for the tests elsewhere whose point is a fresh process per command.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--epochs", "1", "--train-examples", "500", "--eval-examples", "100", "--latent-dim", "4",
        "--hidden-sizes", "32", "--test-samples", "10", "--device", "cpu", "--no-progress"]


def run_cli(*args, data_root=None, cwd=None):
    env = dict(os.environ)
    if data_root is not None:
        env["PPL_VAE_DATA"] = str(data_root)
    return subprocess.run([sys.executable, "-m", "ppl_vae", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_train_then_evaluate_prints_the_table(tmp_path, small_data_root, cli_main):
    run_dir = tmp_path / "run"
    trained = cli_main("train", "--run-dir", run_dir, *TINY, data_root=small_data_root)
    assert trained.returncode == 0, trained.stderr
    assert "log p̂(x), importance sampled (K=10)" in trained.stdout
    evaluated = cli_main("evaluate", run_dir, "--num-samples", "25", "--examples", "40", "--no-progress",
                         data_root=small_data_root)
    assert evaluated.returncode == 0, evaluated.stderr
    for label in ("ELBO", "reconstruction", "KL", "log p̂(x), importance sampled (K=25)", "gap log p̂(x) - ELBO"):
        assert label in evaluated.stdout
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["num_datapoints"] == 40 and result["log_evidence"]["num_samples"] == 25
    assert result["gap"]["mean"] == pytest.approx(result["log_evidence"]["mean"] - result["elbo"]["mean"], abs=1e-9)
    # The second table: diagnostics, also in the JSON, and their figures.
    for label in ("PSIS k-hat (K=25)", "active units", "ELBO surgery", "total correlation"):
        assert label in evaluated.stdout
    diagnostics = result["diagnostics"]
    site = diagnostics["sites"]["z"]  # per latent site; the built-in VAE has one, "z"
    assert 0 <= site["active_units"] <= 4 and len(site["collapse"]["kl_per_dimension"]) == 4
    assert 0 <= diagnostics["psis"]["unreliable_share"] <= 1
    assert site["elbo_surgery"]["mutual_information_bound"] == pytest.approx(math.log(40))
    diagnosed = cli_main("diagnose", run_dir)
    assert diagnosed.returncode == 0, diagnosed.stderr
    for name in ("khat", "kl_per_dimension", "elbo_surgery"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000


def test_console_script_help_documents_every_option(cli_main):
    """The console script as a shell starts it (one process: each start imports torch); the other help in-process."""
    script = Path(sys.executable).parent / "ppl-vae"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ppl_vae"]
    out = subprocess.run([*command, "train", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for option in ("--device", "--batch-size", "--epochs", "--lr", "--lr-schedule", "--seed", "--resume", "--binarize"):
        assert option in out.stdout
    out = cli_main("evaluate", "--help")
    assert "--num-samples" in out.stdout and out.returncode == 0


def test_unknown_option_is_a_clear_error(cli_main):
    out = cli_main("train", "--epoch-count", "3")
    assert out.returncode == 2
    assert "unrecognized arguments: --epoch-count" in out.stderr


def test_missing_data_is_a_short_error_without_traceback(tmp_path, cli_main):
    out = cli_main("train", "--run-dir", tmp_path / "run", "--data-dir", tmp_path / "empty", *TINY)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "train-images-idx3-ubyte" in out.stderr and "MNIST" in out.stderr


def test_grey_levels_with_bernoulli_likelihood_are_refused(tmp_path, small_data_root, cli_main):
    out = cli_main("train", "--run-dir", tmp_path / "run", "--binarize", "none", *TINY, data_root=small_data_root)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "binary data" in out.stderr


def test_evaluate_on_a_folder_that_is_no_run(tmp_path, cli_main):
    out = cli_main("evaluate", tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "config.json does not exist" in out.stderr


def test_variants_train_and_compare_and_plot(tmp_path, small_data_root, cli_main):
    """Two variants from the command line, then one comparison table and the run's figures."""
    first, second = tmp_path / "standard", tmp_path / "vamp-iwae"
    assert cli_main("train", "--run-dir", first, *TINY, data_root=small_data_root).returncode == 0
    out = cli_main("train", "--run-dir", second, *TINY, "--prior", "vamp", "--prior-components", "5",
                  "--objective", "iwae", "--particles", "2", data_root=small_data_root)
    assert out.returncode == 0, out.stderr
    assert json.loads((second / "config.json").read_text())["model"]["prior"] == "vamp"
    compared = cli_main("compare", first, second, "--out", tmp_path / "cmp")
    assert compared.returncode == 0, compared.stderr
    assert "vamp(5) prior" in compared.stdout and "IWAE, 2 particles" in compared.stdout
    csv_lines = (tmp_path / "cmp" / "comparison.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("run,model,objective")
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    plotted = cli_main("plot", first, data_root=small_data_root)
    assert plotted.returncode == 0, plotted.stderr
    for name in ("training_curves", "reconstructions", "samples", "interpolations"):
        assert (first / "plots" / f"{name}.png").stat().st_size > 1000
    assert not (first / "plots" / "latent_space.png").exists()  # 4-D latents: no latent-space figure


def test_plot_draws_the_latent_space_of_a_2d_model(tmp_path, small_data_root, cli_main):
    run_dir = tmp_path / "two"
    tiny_2d = [*TINY[:6], "--latent-dim", "2", *TINY[8:]]
    assert cli_main("train", "--run-dir", run_dir, *tiny_2d, data_root=small_data_root).returncode == 0
    plotted = cli_main("plot", run_dir, data_root=small_data_root)
    assert plotted.returncode == 0, plotted.stderr
    assert (run_dir / "plots" / "latent_space.png").stat().st_size > 1000


def test_unknown_variant_name_lists_the_choices(tmp_path, cli_main):
    out = cli_main("train", "--run-dir", tmp_path / "run", "--prior", "cauchy")
    assert out.returncode == 2
    assert "invalid choice: 'cauchy'" in out.stderr and "vamp" in out.stderr

"""A run whose program --engine auto finds unfaithful to a compiled trace can be evaluated: its engine record is text.

Before, the reason was kept as the UnfaithfulTrace exception itself, pickled into checkpoint.pt, and every later
command refused the run's own checkpoint (weights-only loading allows plain data only)."""

from pathlib import Path

PROGRAMS = Path(__file__).parent / "discrete_models.py"


def test_a_program_trained_with_svi_for_an_unfaithful_trace_evaluates(tmp_path, small_data_root, cli_main):
    run_dir = tmp_path / "run"
    trained = cli_main("train", "--run-dir", run_dir, "--program", f"{PROGRAMS}:M2", "--epochs", "1",
                       "--train-examples", "100", "--batch-size", "50", "--eval-examples", "10", "--test-samples", "3",
                       "--device", "cpu", "--no-progress", data_root=small_data_root)
    assert trained.returncode == 0, trained.stderr
    ran = cli_main("evaluate", run_dir, "--examples", "4", "-k", "5", "--elbo-samples", "2", "--no-progress",
                   data_root=small_data_root)
    assert ran.returncode == 0, ran.stderr
    assert "importance sampled (K=5)" in ran.stdout
    # Its discrete site y cannot be moved by HMC: AIS refuses in one line, naming the site and the alternative.
    refused = cli_main("evaluate", run_dir, "--estimator", "ais", "--examples", "4", "--ais-steps", "3", "--no-progress",
                       data_root=small_data_root)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "site 'y' is discrete" in refused.stderr and "--estimator is" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

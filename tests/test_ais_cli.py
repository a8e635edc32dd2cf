"""``ppl-vae evaluate --estimator ais`` on a tiny run: the table, evaluation.json and the per-image file say AIS."""

import json
from pathlib import Path

import numpy
import pytest

from ppl_vae import cli
from ppl_vae.evaluation_files import read_per_datapoint

TINY = ["--train-examples", "200", "--batch-size", "50", "--eval-examples", "50", "--latent-dim", "4",
        "--hidden-sizes", "16", "--test-samples", "5", "--device", "cpu", "--no-progress"]
AIS = ["--estimator", "ais", "--ais-steps", "6", "--ais-chains", "3", "--leapfrog-steps", "2", "--examples", "12"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("ais_cli") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPL_VAE_DATA", str(small_data_root))
        assert cli.main(["train", "--run-dir", str(run_dir), "--epochs", "1", *TINY]) == 0
    return run_dir


def test_evaluate_with_ais_records_the_estimator_its_settings_and_the_checkpoint(tiny_run, small_data_root, cli_main):
    ran = cli_main("evaluate", tiny_run, *AIS, "--ais-schedule", "geometric", data_root=small_data_root)
    assert ran.returncode == 0, ran.stderr
    assert "AIS (T=6, L=2, C=3, geometric)" in ran.stdout and "importance sampled" not in ran.stdout
    assert "effective number of chains" in ran.stdout and "HMC acceptance" in ran.stdout
    assert "AIS, images 0-11" in ran.stderr  # its own progress bar (with tqdm's time left)
    result = json.loads((tiny_run / "evaluation.json").read_text())
    estimator = result["estimator"]
    assert estimator["name"] == "ais" and (estimator["steps"], estimator["chains"], estimator["leapfrog_steps"]) == (6, 3, 2)
    assert estimator["schedule"] == "geometric" and result["log_evidence"]["estimator"] == estimator
    assert result["log_evidence"]["num_samples"] == 3 and 0 < result["log_evidence"]["mean_acceptance"] <= 1
    assert result["checkpoint_id"] is not None and result["epoch"] == 1
    assert "AIS" in result["diagnostics"]["psis"]["unavailable"]
    arrays = read_per_datapoint(tiny_run, result)
    assert arrays["log_evidence"].shape == arrays["acceptance"].shape == (12,)
    assert numpy.all((arrays["acceptance"] > 0) & (arrays["acceptance"] <= 1))
    assert arrays["log_evidence"].mean() == pytest.approx(result["log_evidence"]["mean"])


def test_ais_evaluation_is_reproducible_from_its_seed_and_importance_sampling_says_so(tiny_run, small_data_root, cli_main):
    means = []
    for seed in ("1", "1", "2"):
        assert cli_main("evaluate", tiny_run, *AIS, "--seed", seed, "--no-progress",
                        data_root=small_data_root).returncode == 0
        means.append(json.loads((tiny_run / "evaluation.json").read_text())["log_evidence"]["mean"])
    assert means[0] == means[1] != means[2]
    ran = cli_main("evaluate", tiny_run, "--examples", "12", "-k", "20", "--no-progress", data_root=small_data_root)
    assert ran.returncode == 0 and "importance sampled (K=20)" in ran.stdout and "AIS" not in ran.stdout
    result = json.loads((tiny_run / "evaluation.json").read_text())
    assert result["estimator"] == {"name": "is", "num_samples": 20}
    assert "acceptance" not in read_per_datapoint(tiny_run, result)


@pytest.mark.parametrize("option, value", [("--ais-steps", "0"), ("--ais-chains", "-1"), ("--ais-schedule", "linear"),
                                           ("--estimator", "hmc")])
def test_bad_ais_options_are_one_line(tiny_run, cli_main, option, value):
    ran = cli_main("evaluate", tiny_run, "--estimator", "ais", option, value)
    assert ran.returncode == 2 and f"argument {option}" in ran.stderr and "Traceback" not in ran.stderr
    assert "unrecognized" not in ran.stderr and len(ran.stderr.strip().splitlines()[-1]) > 0


def test_audit_command_prints_the_tables_and_writes_audit_json(tiny_run, small_data_root, cli_main, tmp_path):
    ran = cli_main("audit", tiny_run, "--examples", "20", "--ais-examples", "3", "-k", "50", "--simulated", "6",
                   "--ais-steps", "8", "--ais-chains", "3", "--leapfrog-steps", "2", "--bdmc-steps", "2", "8",
                   "--no-progress", data_root=small_data_root)
    assert ran.returncode == 0, ran.stderr
    assert "IS (K=50) against AIS (T=8, L=2, C=3, sigmoid)" in ran.stdout and "BDMC on 6 images" in ran.stdout
    payload = json.loads((tiny_run / "audit.json").read_text())
    assert payload["ais"]["steps"] == 8 and payload["is"]["num_samples"] == 50 and len(payload["images"]) == 3
    assert [row["steps"] for row in payload["bdmc"]["rows"]] == [2, 8] and payload["checkpoint_id"] is not None
    assert (tiny_run / "plots" / "audit.png").is_file() and "written to" in ran.stdout
    missing = cli_main("audit", tmp_path / "nothing")
    assert missing.returncode == 2 and "not a run directory" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "nothing").exists()  # nothing made in its place


def test_audit_help_says_what_the_bdmc_gap_certifies_and_what_not(cli_main):
    text = " ".join(cli_main("audit", "--help").stdout.split())
    assert "on data from the model, AIS with these settings is within the gap of log p(x)" in text
    assert "not a certificate on the real images" in text and "--ais-steps" in text and "--bdmc-steps" in text


def test_bench_times_ais_against_its_floor_unless_told_not_to(tmp_path, cli_main):
    tiny = ["bench", "--device", "cpu", "--evidence-only", "--repeats", "1", "--evidence-examples", "4",
            "--evidence-samples", "4"]
    ran = cli_main(*tiny, "--ais-examples", "2", "--ais-steps", "2", "--ais-chains", "2", "--leapfrog-steps", "1",
                   "--out", tmp_path / "with.json")
    assert ran.returncode == 0, ran.stderr
    ais = json.loads((tmp_path / "with.json").read_text())["ais"]
    assert ais["settings"]["chains"] == 2 and ais["decoder_passes"] > 0 and ais["seconds"]["ais"] > 0
    assert "AIS, T=2 L=1 C=2" in ran.stdout and "of the floor" in ran.stdout
    skipped = cli_main(*tiny, "--no-ais", "--out", tmp_path / "without.json")
    assert skipped.returncode == 0 and "AIS" not in skipped.stdout
    assert json.loads((tmp_path / "without.json").read_text())["ais"] is None


@pytest.mark.parametrize("typed, estimator, named", [(["-k", "100"], "ais", "-k"), (["--num-samples=100"], "ais", "--num-samples"),
                                                     (["--ais-steps", "7"], "is", "--ais-steps")])
def test_an_option_of_the_other_estimator_is_named_as_unused(tiny_run, small_data_root, cli_main, typed, estimator, named):
    ais = ["--ais-steps", "3", "--ais-chains", "2", "--leapfrog-steps", "1"] if estimator == "ais" else []
    ran = cli_main("evaluate", tiny_run, "--estimator", estimator, *ais, *typed, "--examples", "4", "--no-progress",
                   data_root=small_data_root)
    assert ran.returncode == 0, ran.stderr
    assert f"warning: {named} does nothing with --estimator {estimator}" in ran.stderr

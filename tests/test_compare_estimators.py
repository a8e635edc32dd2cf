"""`ppl-vae compare` says which estimator each log p̂ came from and pairs only results of one estimator."""

import json
import shutil

import numpy
import pytest

from ppl_vae.compare import add_paired_differences, markdown_table, result_estimator
from test_compare import row

AIS = {"name": "ais", "steps": 100, "chains": 8, "leapfrog_steps": 5, "schedule": "sigmoid", "target_accept": 0.65,
       "pilot_steps": 10}


def with_estimator(name: str, values, estimator: dict | None, text: str) -> dict:
    r = row(name, values)
    r.update(_estimator=estimator, estimator=text)
    return r


def test_only_results_of_one_estimator_are_paired_and_the_others_say_why():
    base = numpy.random.default_rng(0).normal(-90, 20, size=50)
    rows = [with_estimator("is-run", base, {"name": "is", "num_samples": 5000}, "IS, K=5000"),
            with_estimator("is-k1000", base + 1, {"name": "is", "num_samples": 1000}, "IS, K=1000"),
            with_estimator("ais-run", base + 2, AIS, "AIS, T=100 L=5 C=8 sigmoid"),
            with_estimator("odd", base + 3, None, "?")]
    add_paired_differences(rows)
    assert rows[1]["log_px_minus_first"] == pytest.approx(1.0) and rows[1].get("not_paired") is None
    assert rows[2]["log_px_minus_first"] is None and rows[3]["log_px_minus_first"] is None
    assert "AIS, T=100 L=5 C=8 sigmoid" in rows[2]["not_paired"] and "IS, K=5000" in rows[2]["not_paired"]
    assert "different estimators" in rows[2]["not_paired"] and "unknown estimator" in rows[3]["not_paired"]
    table = markdown_table(rows)
    assert "| estimator |" in table and "AIS, T=100 L=5 C=8 sigmoid" in table
    assert "Not paired with the first run: ais-run: its log p̂ is from AIS" in table


def test_ais_results_pair_only_with_the_same_settings():
    base = numpy.random.default_rng(1).normal(-90, 20, size=40)
    rows = [with_estimator("a", base, AIS, "AIS"), with_estimator("b", base + 0.5, dict(AIS), "AIS"),
            with_estimator("c", base + 0.5, {**AIS, "steps": 1000}, "AIS, T=1000")]
    add_paired_differences(rows)
    assert rows[1]["log_px_minus_first"] == pytest.approx(0.5) and rows[2]["log_px_minus_first"] is None
    assert "T=1000" in rows[2]["not_paired"]


def test_result_estimator_reads_old_files_as_importance_sampled_and_refuses_odd_records():
    old = {"log_evidence": {"mean": -90.0, "num_samples": 5000}}
    assert result_estimator(old) == {"name": "is", "num_samples": 5000}
    assert result_estimator({**old, "estimator": AIS}) == AIS
    assert result_estimator({**old, "estimator": "ais"}) is None and result_estimator({**old, "estimator": {"name": 3}}) is None


def test_compare_of_an_is_and_an_ais_evaluation_of_the_same_images(tmp_path, small_data_root, cli_main):
    from ppl_vae import cli
    from test_ais_cli import AIS as AIS_OPTIONS, TINY

    first = tmp_path / "is"
    assert cli.main(["train", "--run-dir", str(first), "--epochs", "1", "--data-dir", str(small_data_root), *TINY]) == 0
    second = tmp_path / "ais"
    shutil.copytree(first, second)
    assert cli_main("evaluate", first, "--examples", "12", "-k", "20", "--no-progress", data_root=small_data_root).returncode == 0
    assert cli_main("evaluate", second, *AIS_OPTIONS, "--no-progress", data_root=small_data_root).returncode == 0
    ran = cli_main("compare", first, second, "--out", tmp_path / "out")
    assert ran.returncode == 0, ran.stderr
    assert "IS, K=20" in ran.stdout and "AIS, T=6 L=2 C=3 sigmoid" in ran.stdout
    assert "ais: its log p̂ is from AIS, T=6 L=2 C=3 sigmoid, the first run's from IS, K=20" in ran.stdout
    csv = (tmp_path / "out" / "comparison.csv").read_text().splitlines()
    header, ais_row = csv[0].split(","), csv[2]
    assert "estimator" in header and "different estimators" in ais_row
    assert json.loads((second / "evaluation.json").read_text())["estimator"]["name"] == "ais"

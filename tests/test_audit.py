"""The evidence audit of a tiny run (IS against AIS, BDMC), and the AIS evaluation summary."""

import json
from pathlib import Path

import pyro
import pytest
import torch

from ppl_vae import cli
from ppl_vae.audit import AUDIT_FILE, AUDIT_FIGURE, ais_summary, audit_run
from ppl_vae.evaluate import evaluation_summary
from ppl_vae.model import VAE, VAEConfig

TINY = ["--train-examples", "200", "--batch-size", "50", "--eval-examples", "50", "--latent-dim", "4",
        "--hidden-sizes", "16", "--test-samples", "5", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("audit") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPL_VAE_DATA", str(small_data_root))
        assert cli.main(["train", "--run-dir", str(run_dir), "--epochs", "2", *TINY]) == 0
    return run_dir


def test_audit_writes_its_json_and_figure_and_returns_the_tables(tiny_run, small_data_root):
    text = audit_run(tiny_run, data_dir=str(small_data_root), examples=30, ais_examples=4, num_samples=100,
                     simulated=10, steps=20, bdmc_steps=[2, 20], chains=4, leapfrog_steps=3)
    payload = json.loads((tiny_run / AUDIT_FILE).read_text())
    config = json.loads((tiny_run / "config.json").read_text())
    assert payload["ais"]["name"] == "ais" and payload["ais"]["steps"] == 20 and payload["ais"]["pilot_steps"] == 10
    assert payload["is"] == {"name": "is", "num_samples": 100, "num_datapoints": 30}
    assert payload["checkpoint_id"] is not None
    khat = [row["khat"] for row in payload["images"]]
    assert len(khat) == 4 and khat == sorted(khat, reverse=True)  # the highest k-hat first
    for row in payload["images"]:
        assert row["is_minus_ais"] == pytest.approx(row["is"] - row["ais"])
    rows = payload["bdmc"]["rows"]
    assert [row["steps"] for row in rows] == [2, 20]
    for row in rows:  # the reverse bound above the forward one (up to their Monte Carlo error), by more with fewer steps
        assert row["upper"]["mean"] - row["lower"]["mean"] == pytest.approx(row["gap"]["mean"])
        assert row["gap"]["mean"] > -3 * row["gap"]["stderr"]
    assert rows[0]["gap"]["mean"] > rows[1]["gap"]["mean"] and rows[0]["gap"]["mean"] > 0
    # The same simulated images at every number of steps: the bounds bracket one value, so they overlap.
    assert rows[0]["lower"]["mean"] < rows[1]["upper"]["mean"] and rows[1]["lower"]["mean"] < rows[0]["upper"]["mean"]
    assert (tiny_run / "plots" / AUDIT_FIGURE).stat().st_size > 1000
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert AUDIT_FILE in json.dumps(manifest) and f"plots/{AUDIT_FIGURE}" in json.dumps(manifest)
    assert "highest PSIS k-hat" in text and "BDMC on 10 images" in text and str(config.get("epoch", "")) in text


def test_ais_summary_has_the_importance_sampled_shape_and_records_its_estimator():
    pyro.set_rng_seed(0)
    vae = VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,)))
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    result, estimate = ais_summary(vae.model, vae.guide, x, steps=10, chains=3, leapfrog_steps=2, elbo_samples=2)
    plain = evaluation_summary(vae.model, vae.guide, x, num_samples=10, elbo_samples=2)
    assert set(plain) <= set(result) and set(plain["log_evidence"]) <= set(result["log_evidence"])
    assert result["estimator"]["name"] == "ais" and result["estimator"]["steps"] == 10
    assert result["log_evidence"]["num_samples"] == 3  # the chains
    assert result["log_evidence"]["mean"] == pytest.approx(estimate.log_evidence.mean().item())
    assert result["gap"]["mean"] == pytest.approx((estimate.log_evidence - 0).mean().item() - result["elbo"]["mean"])

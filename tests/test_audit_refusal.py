"""``ppl-vae audit`` refuses a program AIS cannot anneal before it estimates anything (issue 27)."""

import pytest

from ppl_vae import audit, cli
from ppl_vae.errors import ModelStructureError

SMALL = ["--batch-size", "50", "--train-examples", "100", "--eval-examples", "20", "--test-samples", "2",
         "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory, small_data_root):
    """A one-epoch M2 run: its guide enumerates the discrete class y, which AIS (HMC) cannot move."""
    run = tmp_path_factory.mktemp("refusal") / "m2"
    assert cli.main(["train", "--program", "m2", "--program-kwargs", '{"hidden_sizes": [8], "latent_dim": 2}',
                     "--labelled", "20", "--epochs", "1", *SMALL, "--data-dir", str(small_data_root),
                     "--run-dir", str(run)]) == 0
    return run


def test_audit_refuses_an_enumerated_program_before_importance_sampling(m2_run, small_data_root, monkeypatch, cli_main):
    estimated = []

    def recording(*args, **kwargs):  # the audit's first estimate (IS with PSIS over the images), when it runs
        estimated.append(args)
        raise AssertionError("importance sampling ran before the refusal")

    monkeypatch.setattr(audit, "evidence_with_psis", recording)
    with pytest.raises(ModelStructureError, match="'y' is marked for enumeration"):
        audit.audit_run(m2_run, data_dir=str(small_data_root), examples=10, ais_examples=2, num_samples=10,
                        simulated=2, steps=2, chains=2, leapfrog_steps=1)
    assert estimated == []
    ran = cli_main("audit", str(m2_run), "--data-dir", str(small_data_root), "--examples", "10", "--no-progress")
    assert ran.returncode != 0 and estimated == []
    assert len(ran.stderr.strip().splitlines()) == 1 and "enumeration" in ran.stderr
    assert not (m2_run / audit.AUDIT_FILE).exists()

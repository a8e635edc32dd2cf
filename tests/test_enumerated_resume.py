"""An enumerated run resumed under the compiled engine (issue 26, item 1's "checkpoints and resume"): ``--engine auto``
picks JitTraceEnum_ELBO where it is checked equal to TraceEnum_ELBO; ``--resume`` keeps that objective and engine
(and its record of why), and the resumed run's numbers continue those of a run trained straight through."""

from pathlib import Path

import pytest
import torch

from ppl_vae import cli, runs

PROGRAMS = Path(__file__).parent / "discrete_models.py"
SMALL = ["--batch-size", "50", "--train-examples", "100", "--eval-examples", "20", "--test-samples", "2",
         "--device", "cpu", "--no-progress", "--engine", "auto"]
PROGRAMS_ARGS = {
    "unsupervised, --enumerate": ["--program", f"{PROGRAMS}:M2", "--enumerate"],
    "m2, --labelled": ["--program", "m2", "--program-kwargs", '{"hidden_sizes": [16], "latent_dim": 2}',
                       "--labelled", "10", "--labelled-batches", "2"],
}


@pytest.mark.parametrize("program", PROGRAMS_ARGS)
def test_a_compiled_enumerated_run_resumes_with_its_objective_and_engine_and_its_numbers_continue(
        tmp_path, data_root, program):
    args = ["train", *PROGRAMS_ARGS[program], *SMALL, "--data-dir", str(data_root)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main([*args, "--epochs", "2", "--run-dir", str(straight)]) == 0
    assert cli.main([*args, "--epochs", "1", "--run-dir", str(resumed)]) == 0
    first = runs.read_json(resumed / "config.json")["engine"]
    assert cli.main(["train", "--resume", "--run-dir", str(resumed), "--epochs", "2", "--no-progress",
                     "--data-dir", str(data_root)]) == 0
    engine = runs.read_json(straight / "config.json")["engine"]
    assert engine["engine"] == "jit", engine["reason"]  # the compiled TraceEnum_ELBO, checked equal on the first batch
    after = runs.read_json(resumed / "config.json")["engine"]
    for key in ("requested", "engine", "reason"):  # kept on resume, with its reason (check_seconds: each run's own)
        assert after[key] == first[key] == engine[key]
    objective = runs.read_json(straight / "test.json")["objective"]
    assert objective.startswith("TraceEnum_ELBO") and runs.read_json(resumed / "test.json")["objective"] == objective
    metrics = {name: runs.read_metrics(run) for name, run in (("straight", straight), ("resumed", resumed))}
    assert [m["epoch"] for m in metrics["resumed"]] == [1, 2]
    for before, after in zip(metrics["straight"], metrics["resumed"]):  # epoch 2 continues from epoch 1's state
        assert after["train_elbo"] == pytest.approx(before["train_elbo"], rel=1e-5)
        assert after["val_elbo"] == pytest.approx(before["val_elbo"], rel=1e-5)
    a, b = runs.load_checkpoint(straight)["model"], runs.load_checkpoint(resumed)["model"]
    assert all(torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6) for name in a)

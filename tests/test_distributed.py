"""Scale-out (issue 9): training and evaluation on 2 processes with torch.distributed, on the CPU with gloo.

The processes are started by ``torch.multiprocessing.spawn`` (tests/distributed_workers.py) or, through
the command line, by torchrun itself (``ppl-vae train --devices 2``). Tiny models keep the file fast.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import distributed_workers as workers
import numpy as np
import pyro
import pytest
import torch

from ppl_vae import cli, distributed, runs
from ppl_vae.errors import PplVaeError
from ppl_vae.model import VAEConfig, build_vae
from ppl_vae.objectives import make_objective
from ppl_vae.programs import Weighted
from ppl_vae.train import TrainConfig, checked_svi_step, make_optimizer

WORLD_SIZE = 2


# --- In 2 processes of one gloo group (all tasks in one group: starting processes is what takes time) --

STEP_CASES = [(None, 1.0, False), (5.0, 0.5, False), (5.0, 0.5, True)]  # (clip_norm, kl_weight, compiled loss)
# 11 rows: shares of 6 and 5, so the loss scaling is checked with unequal shares too.
STEP_BATCH = torch.bernoulli(torch.full((11, workers.TINY["data_dim"]), 0.3), generator=torch.Generator().manual_seed(1))
# 8 blocks of 32 (the last of 26) dealt to 2 processes; K = 30 gives PSIS diagnostics too.
EVALUATION_OPTIONS = {"num_samples": 30, "elbo_samples": 3, "seed": 7, "psis": True, "block_size": 32, "chunk_size": 20}
# --labelled: Kingma's alpha = 0.1 N, and 0 (the classifier then unused on labelled steps: DDP must find it unused);
# "cond": --labels --cond c, a program given (x, y, c); "shift": default alpha, a parameter unused on labelled steps.
LABELLED_ALPHAS = [None, 0.0, "cond", "shift"]

TINY_RUN = ["--program", "conditional", "--labels", "--program-kwargs", '{"latent_dim": 4, "hidden_sizes": [16]}',
            "--train-examples", "230", "--batch-size", "50", "--eval-examples", "60", "--test-samples", "5",
            "--evidence-every", "1", "--evidence-examples", "30", "--evidence-samples", "10", "--device", "cpu",
            "--no-progress"]
# `ppl-vae evaluate RUN` with few draws, on the CPU (then --devices 2, or one process).
EVALUATE_RUN = ["evaluate", "--num-samples", "30", "--examples", "130", "--elbo-samples", "2", "--device", "cpu",
                "--no-progress"]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, small_data_root):
    """The folder where the 2 processes saved what they got; they ran every task below."""
    path = tmp_path_factory.mktemp("spawned")
    pyro.set_rng_seed(3)
    vae = build_vae(VAEConfig(**workers.TINY))
    x = torch.bernoulli(torch.full((250, workers.TINY["data_dim"]), 0.4), generator=torch.Generator().manual_seed(2))
    torch.save({"state": vae.state_dict(), "x": x}, path / "model-and-data.pt")
    ais_vae, ais_x = workers.tiny_vae_and_data(10)
    (path / "ais").mkdir()
    torch.save({"state": ais_vae.state_dict(), "x": ais_x}, path / "ais" / "model-and-data.pt")
    tasks = [(workers.one_step, (path / f"step{i}", STEP_BATCH, 1e-2, clip_norm, kl_weight, compiled))
             for i, (clip_norm, kl_weight, compiled) in enumerate(STEP_CASES)]
    tasks += [(workers.faulty_step, (path, STEP_BATCH[:8])), (workers.evaluate, (path, EVALUATION_OPTIONS)),
              (workers.evaluate, (path / "ais", workers.AIS_OPTIONS))]
    tasks += [(workers.labelled_epoch, (path, alpha)) for alpha in LABELLED_ALPHAS]
    tasks += [(workers.tensors_runs, (path,))]
    # The uninterrupted reference run of the resume test below, and its evaluation on 2 processes: `ppl-vae train` and
    # `ppl-vae evaluate` as torchrun's processes run them, in these processes rather than in 3 more started for each.
    # And the resume test's run stopped after its first epoch (the same command torchrun's processes run, whether
    # torchrun was started by hand or by `ppl-vae --devices 2`: process_group.launch_command).
    tasks += [(workers.commands, (path, small_data_root, [["train", "--run-dir", path / "straight", "--epochs", "2",
                                                            "--devices", "2", *TINY_RUN],
                                                           [*EVALUATE_RUN, path / "straight", "--devices", "2"],
                                                           ["train", "--run-dir", path / "stopped", "--epochs", "1",
                                                            "--devices", "2", *TINY_RUN]]))]
    workers.spawn(tasks, WORLD_SIZE)
    return path


# Every test of the spawned processes' results on one xdist worker (addopts: --dist loadgroup): they start once.
SPAWNED = pytest.mark.xdist_group("spawned")


@SPAWNED
@pytest.mark.parametrize("case", range(len(STEP_CASES)))
def test_one_distributed_step_equals_one_single_process_step_on_the_global_minibatch(spawned, monkeypatch, case):
    clip_norm, kl_weight, _ = STEP_CASES[case]
    # The same step in this process: SVI (Pyro's Adam, one torch Adam per parameter) on the whole minibatch,
    # with the same fixed draws from the guide (the compiled loss, --engine jit, included).
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", workers.fixed_noise)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    vae = build_vae(VAEConfig(**workers.TINY))
    program = Weighted(vae, kl_weight)  # the KL weight as training applies it
    svi = pyro.infer.SVI(program.model, program.guide, make_optimizer(TrainConfig(learning_rate=1e-2)), loss=make_objective("elbo"))
    before = {name: value.clone() for name, value in vae.state_dict().items()}
    loss = checked_svi_step(svi, STEP_BATCH, clip_norm)

    ranks = [torch.load(spawned / f"step{case}" / f"step-rank{rank}.pt") for rank in range(WORLD_SIZE)]
    assert [r["rows"] for r in ranks] == [6, 5]
    for r in ranks:
        assert r["loss"] == pytest.approx(loss, rel=1e-6) and r["stop"] is True  # rank 1 alone was asked to stop
        for name, value in vae.state_dict().items():
            torch.testing.assert_close(r["state"][name], value, atol=1e-6, rtol=0, msg=name)
    assert all(torch.equal(ranks[0]["state"][n], ranks[1]["state"][n]) for n in ranks[0]["state"])
    moved = [name for name, _ in vae.named_parameters() if not torch.equal(vae.state_dict()[name], before[name])]
    assert moved == [name for name, _ in vae.named_parameters()]  # the step changed every parameter tensor


@SPAWNED
def test_a_nan_gradient_on_one_process_stops_every_process_before_the_update(spawned):
    for rank in range(WORLD_SIZE):
        result = torch.load(spawned / f"fault-rank{rank}.pt")
        assert result["message"] == "the gradient became nan (non-finite gradients of decoder.0.weight)"
        assert result["unchanged"]


@SPAWNED
@pytest.mark.parametrize("alpha", LABELLED_ALPHAS)
def test_a_distributed_epoch_of_labelled_or_conditioned_batches_equals_one_process_epoch(spawned, monkeypatch, alpha):
    """--labelled on 2 processes: labelled (x, y) and unlabelled (x,) steps, each sharded, give one process's weights;
    so do (x, y, c) steps with --labels --cond c."""
    from ppl_vae.training.engines import ModuleEngine
    from ppl_vae.training.strategy import ProcessGroupStrategy

    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", workers.fixed_noise)
    config = workers.labelled_config(alpha)
    data = workers.labelled_data(cond=bool(config.cond))
    program, engine = workers.labelled_engine(config, data, lambda trained: ModuleEngine(
        trained, config, 1, compiled=False, enumerated=not config.cond), shifted=alpha == "shift")
    before = {name: value.clone() for name, value in program.state_dict().items()}
    # the global minibatches every process built (the strategy of rank 0, in this process), whole
    batches = list(ProcessGroupStrategy(0, WORLD_SIZE, 0, torch.device("cpu"), "gloo").epoch_batches(data, config, 1))
    losses = [engine.step(batch) for batch in batches]
    assert {len(batch) for batch in batches} == ({3} if config.cond else {1, 2})  # (x, y, c); labelled, unlabelled
    ranks = [torch.load(spawned / f"labelled-{alpha}-rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for r in ranks:
        assert r["losses"] == pytest.approx(losses, rel=1e-5)
        for name, value in program.state_dict().items():
            torch.testing.assert_close(r["state"][name], value, atol=1e-5, rtol=0, msg=name)
    moved = {name for name, value in program.state_dict().items() if not torch.equal(value, before[name])}
    assert moved == set(before)  # every tensor trained, the classifier included (by unlabelled steps at alpha 0)
    # what DDP was told to look for: the classifier on labelled steps at alpha 0, the shift of the shifted M2
    unused = {name.rsplit("program.", 1)[-1].split(".")[0] for name in ranks[0]["unused"]}
    assert unused == {0.0: {"classifier"}, "shift": {"unlabelled_shift"}}.get(alpha, set())


@SPAWNED
def test_train_distributed_takes_a_program_and_tensors_and_refuses_tensors_that_differ_between_processes(spawned):
    ranks = [torch.load(spawned / f"tensors-rank{rank}.pt") for rank in range(WORLD_SIZE)]
    # The same tensors: one run, its test evaluation the same on every process, its tensors kept by rank 0.
    assert "error" not in ranks[0]["same"] and ranks[0]["same"] == ranks[1]["same"]
    run = spawned / "tensors-same"
    assert runs.read_json(run / runs.CONFIG_FILE)["train"]["dataset"] == str((run / "tensors.npz").resolve())
    assert runs.load_checkpoint(run)["world_size"] == WORLD_SIZE
    # Tensors that differ on process 1: the same one line on both, and no run directory left.
    for rank in ranks:
        assert rank["differ"]["error"].startswith("data=: the tensors given to process(es) 1 differ from those of process 0")
    assert not (spawned / "tensors-differ").exists()


@SPAWNED
def test_distributed_evaluation_equals_single_process_evaluation_exactly(spawned):
    saved = torch.load(spawned / "model-and-data.pt")
    vae = build_vae(VAEConfig(**workers.TINY))
    vae.load_state_dict(saved["state"])
    single = vars(distributed.evaluate_per_datapoint(vae.model, vae.guide, saved["x"], **EVALUATION_OPTIONS))
    for rank in range(WORLD_SIZE):
        gathered = torch.load(spawned / f"evaluation-rank{rank}.pt", weights_only=False)
        decomposition, expected = gathered["decomposition"], single["decomposition"]
        for key in ("elbo", "reconstruction"):
            assert torch.equal(decomposition[key], expected[key]), key
        assert torch.equal(decomposition["kl"]["z"], expected["kl"]["z"])
        for key in ("log_evidence", "stderr", "ess"):
            assert torch.equal(getattr(gathered["evidence"], key), getattr(single["evidence"], key)), key
        for key in distributed.PSIS_PER_DATAPOINT:
            assert torch.equal(gathered["psis"][key], single["psis"][key]), key
        assert gathered["psis"]["unreliable_share"] == single["psis"]["unreliable_share"]
    assert decomposition["elbo"].shape == (250,)


@SPAWNED
def test_ais_on_two_processes_equals_one_process_exactly(spawned):
    """AIS through the blocked evaluation (tests/test_ais_blocks.py): seeded per block, so the same on 2 processes."""
    saved = torch.load(spawned / "ais" / "model-and-data.pt")
    vae = build_vae(VAEConfig(**workers.TINY))
    vae.load_state_dict(saved["state"])
    single = distributed.evaluate_per_datapoint(vae.model, vae.guide, saved["x"], **workers.AIS_OPTIONS)
    for rank in range(WORLD_SIZE):
        gathered = torch.load(spawned / "ais" / f"evaluation-rank{rank}.pt", weights_only=False)
        for key in ("log_evidence", "stderr", "ess"):
            assert torch.equal(getattr(gathered["evidence"], key), getattr(single.evidence, key)), key
        assert torch.equal(gathered["acceptance"], single.acceptance)
        assert torch.equal(gathered["decomposition"]["elbo"], single.decomposition["elbo"])


def test_the_draws_of_a_datapoint_depend_on_the_seed_and_its_block_only():
    """Blocks of 20: the first 60 datapoints of 90 and 60 datapoints alone fill the same 3 blocks."""
    pyro.set_rng_seed(3)
    vae = build_vae(VAEConfig(**workers.TINY))
    x = torch.bernoulli(torch.full((90, workers.TINY["data_dim"]), 0.4), generator=torch.Generator().manual_seed(2))
    options = {"num_samples": 8, "elbo_samples": 2, "block_size": 20}
    whole = distributed.evaluate_per_datapoint(vae.model, vae.guide, x, seed=1, **options)
    torch.manual_seed(123)  # the caller's stream plays no part, and is left as it was
    state = torch.get_rng_state()
    part = distributed.evaluate_per_datapoint(vae.model, vae.guide, x[:60], seed=1, **options)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(part.evidence.log_evidence, whole.evidence.log_evidence[:60])
    assert torch.equal(part.decomposition["elbo"], whole.decomposition["elbo"][:60])
    other = distributed.evaluate_per_datapoint(vae.model, vae.guide, x[:60], seed=2, **options)
    assert not torch.equal(other.evidence.log_evidence, part.evidence.log_evidence)


# --- Training from the command line: torchrun, checkpoints, resume ----------------------------------

# A program with labels (the built-in conditional VAE, its labels y sharded with the images): the one training loop
# under DDP with per-datapoint data besides x, and its evidence log p(x | y).
TIMING_KEYS = {"epoch_seconds", "steps_per_second", "train_seconds"}


def without_timings(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


@SPAWNED
def test_a_distributed_run_with_labels_resumes_to_the_numbers_of_an_uninterrupted_one_and_evaluates_the_same(
    spawned, tmp_path, small_data_root, cli_launch, monkeypatch
):
    # torchrun's processes print every thread's Python stack if one dies of a signal: one rank aborted at exit once
    # ("terminate called without an active exception"), and that message alone does not say where.
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    # The uninterrupted run of 2 epochs, and its evaluation on 2 processes, were made by `ppl-vae train` and
    # `ppl-vae evaluate` in the spawned processes (fixture above). A copy: the evaluation in one process below writes
    # into the run it evaluates.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(spawned / "straight", straight)
    printed = [(spawned / f"commands-rank{rank}.txt").read_text() for rank in range(WORLD_SIZE)]
    assert "test evaluation of" in printed[0] and printed[1] == ""  # rank 0 alone prints
    # One stopped after its first epoch, trained by the spawned processes as torchrun's processes (under torchrun,
    # --devices is only checked against the group); a copy, as the resume writes into it.
    shutil.copytree(spawned / "stopped", resumed)
    assert runs.load_checkpoint(resumed)["epoch"] == 1
    # Resumed by `ppl-vae train --resume --devices 2`, launched by this process (its run directory checked before
    # torchrun starts): every setting, the program and its labels included, is the run's own.
    ran = cli_launch("train", "--run-dir", resumed, "--resume", "--epochs", "2", "--devices", "2", "--no-progress",
                     data_root=small_data_root)
    assert ran.returncode == 0, ran.stderr
    out = ran.stdout
    assert "test evaluation of" in out and "cpu, 2 processes (gloo)" in out and "log p̂(x | y)" in out
    assert out.count("run directory:") == 1  # rank 0 alone prints

    a, b = runs.load_checkpoint(straight), runs.load_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 2 and a["world_size"] == b["world_size"] == 2
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])
    metrics = runs.read_metrics(straight)
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["world_size"] == 2 for m in metrics)
    assert without_timings(runs.read_metrics(resumed)) == without_timings(metrics)
    for key in ("elbo", "log_evidence", "reconstruction"):
        assert runs.read_json(resumed / "test.json")[key] == runs.read_json(straight / "test.json")[key]

    # Evaluation on 2 processes (`evaluate --devices 2`, made in the spawned processes) gives the numbers of
    # evaluation in one process, digit for digit.
    two = dict(np.load(straight / runs.PER_DATAPOINT_FILE))
    two_json = json.loads((straight / "evaluation.json").read_text())
    assert cli_launch(*EVALUATE_RUN, straight).returncode == 0
    one = dict(np.load(straight / runs.PER_DATAPOINT_FILE))
    one_json = json.loads((straight / "evaluation.json").read_text())
    # Every key but the id each evaluation stores to pair its npz with its evaluation.json.
    assert str(two["evaluation_id"]) != str(one["evaluation_id"])  # the one-process evaluation did write its own
    assert sorted(two) == sorted(one) and all(np.array_equal(two[key], one[key]) for key in one if key != "evaluation_id")
    assert two_json["world_size"] == 2 and one_json["world_size"] == 1
    for key in ("elbo", "reconstruction", "kl", "log_evidence", "gap", "diagnostics"):
        assert two_json[key] == one_json[key], key

    # A distributed run's checkpoint cannot be resumed by single-process SVI: a clear error, nothing changed.
    ran = cli_launch("train", "--run-dir", resumed, "--resume", "--epochs", "3", "--no-progress")
    assert ran.returncode == 2
    assert "written by training on 2 processes under torchrun: resume it with --devices 2" in ran.stderr
    assert runs.load_checkpoint(resumed)["epoch"] == 2


# --- Pieces that need no processes ----------------------------------------------------------------


def test_shares_of_a_minibatch_cover_it_in_order():
    batch = torch.arange(11).unsqueeze(1)
    for world_size in (1, 2, 3, 4, 11, 12):
        shares = [distributed.shard_rows(batch, rank, world_size) for rank in range(world_size)]
        assert torch.equal(torch.cat(shares), batch)
        assert max(s.shape[0] for s in shares) - min(s.shape[0] for s in shares) <= 1


def test_the_data_stream_of_an_epoch_comes_from_its_generator_alone(mnist):
    data = dataclasses.replace(mnist, train=mnist.train[:500], train_labels=mnist.train_labels[:500])  # 500 images

    def epoch(seed: int) -> list[torch.Tensor]:
        return list(data.train_batches(200, generator=torch.Generator().manual_seed(seed)))

    first = epoch(5)
    torch.manual_seed(99)  # the global stream plays no part
    again = epoch(5)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and [b.shape[0] for b in first] == [200, 200, 100]
    assert not torch.equal(epoch(6)[0], first[0])


def test_derived_seeds_depend_on_every_part():
    seeds = {distributed.derive_seed(seed, "block", block) for seed in range(5) for block in range(200)}
    assert len(seeds) == 1000 and all(0 <= s < 2**32 for s in seeds)
    assert distributed.derive_seed(0, "draws", 1, 0) != distributed.derive_seed(0, "draws", 1, 1)


def test_launch_commands_use_torchrun():
    argv = ["train", "--devices", "4"]
    command = distributed.launch_command(argv, 4)
    assert command[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone", "-m", "ppl_vae", *argv]
    command = distributed.launch_command(argv, 4, num_nodes=2, rdzv_endpoint="node0:29400", rdzv_id="job")
    assert command[3:13] == ["--nproc-per-node", "4", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                             "node0:29400", "--rdzv-id", "job"]


def test_scale_out_options_that_cannot_work_are_refused(monkeypatch, tmp_path, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PplVaeError, match="--rdzv-endpoint HOST:PORT"):
        distributed.check_launch(2, 2, None, "cpu")
    assert not distributed.should_launch(None, 1) and not distributed.should_launch(1, 1)
    assert distributed.should_launch(2, 1) and distributed.should_launch(1, 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not distributed.should_launch(4, 1)  # already under torchrun
    distributed.check_launch(4, 1, None, "cpu")
    with pytest.raises(PplVaeError, match=r"--devices 2 --num-nodes 1 disagree with torchrun, which started 4"):
        distributed.check_launch(2, 1, None, "cpu")
    monkeypatch.delenv("RANK")
    # From the command line: the error, before any process is started or any file written.
    assert cli.main(["train", "--run-dir", str(tmp_path / "run"), "--devices", "2", "--num-nodes", "2"]) == 2
    assert "--num-nodes above 1 needs --rdzv-endpoint" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # The iwae objective has no differentiable loss (Pyro's RenyiELBO); an existing run directory is refused too.
    assert cli.main(["train", "--run-dir", str(tmp_path / "run"), "--objective", "iwae", "--particles", "2",
                     "--devices", "2"]) == 2
    assert "iwae cannot be trained on several processes" in capsys.readouterr().err and not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("earlier work")
    assert cli.main(["train", "--run-dir", str(tmp_path / "run"), "--devices", "2"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    with pytest.raises(PplVaeError, match="iwae cannot be trained on several processes"):
        distributed.check_trainable_on_processes(TrainConfig(objective="iwae", particles=2))
    distributed.check_trainable_on_processes(TrainConfig(objective="meanfield"))

"""Reliability (issue 7): interrupted runs, checkpoints, numerical faults, bad input, memory, run
directories, determinism, and properties of the evaluation API.

The interruption tests start ``python -m ppl_vae train`` in subprocesses and stop them with SIGKILL or
SIGINT; everything else runs in-process on tiny configurations. To stay fast on a shared 2-core
machine, torch runs on one thread here (two threads contending for busy cores make these tiny networks
tens of times slower) and in-process training reads MNIST once (``ppl_vae.training.checks.load_mnist`` is memoized).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_small_mnist
from gaussian_models import LinearGaussian
from ppl_vae import chunking, cli, inspection, runs
from ppl_vae.training import checks as training_checks
from ppl_vae.training import setup as training_setup
from ppl_vae.errors import (
    CheckpointFallbackWarning,
    EvaluationMemoryWarning,
    InvalidDataError,
    ModelStructureError,
    NumericalFaultError,
    PplVaeError,
    RunDirectoryError,
)
from ppl_vae.evaluate import elbo_decomposition, evidence_estimate, iter_chunk_terms, log_evidence, plan_evaluation
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig, checked_svi_step, train

OUT_OF_MEMORY = inspection.OUT_OF_MEMORY_ERRORS[0]
TIMING_KEYS = {"epoch_seconds", "steps_per_second", "train_seconds"}
COMPARED_METRICS = ("train_elbo", "val_elbo", "val_reconstruction", "val_kl", "learning_rate")


# --- Set-up --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_LOADED_MNIST: dict[str, object] = {}
_load_mnist = training_checks.load_mnist


def _memoized_load_mnist(*args, **kwargs):
    key = repr((args, sorted(kwargs.items())))
    if key not in _LOADED_MNIST:
        _LOADED_MNIST[key] = _load_mnist(*args, **kwargs)
    return _LOADED_MNIST[key]


@pytest.fixture
def fast_mnist(monkeypatch):
    monkeypatch.setattr(training_checks, "load_mnist", _memoized_load_mnist)


TINY_MODEL = VAEConfig(latent_dim=4, hidden_sizes=(32,))
TINY_STEPS_PER_EPOCH = 6  # 300 images, batches of 50


def tiny_config(data_root, **overrides) -> TrainConfig:
    settings_ = dict(epochs=3, batch_size=50, learning_rate=3e-3, data_dir=str(data_root), train_examples=300,
                     eval_examples=100, test_samples=10, device="cpu")
    settings_.update(overrides)
    return TrainConfig(**settings_)


def tiny_cli_args(data_root) -> list[str]:
    return ["--data-dir", str(data_root), "--train-examples", "300", "--batch-size", "50", "--eval-examples", "100",
            "--latent-dim", "4", "--hidden-sizes", "32", "--test-samples", "10", "--device", "cpu", "--no-progress"]


def without_timings(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


def assert_same_metrics(a: list[dict], b: list[dict], tolerance: float) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for key in COMPARED_METRICS:
            assert ra[key] == pytest.approx(rb[key], abs=tolerance, rel=0), (ra["epoch"], key)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_root):
    """A tiny 3-epoch run, never interrupted, trained in-process: (run_dir, test result)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training_checks, "load_mnist", _memoized_load_mnist)
        result = train(run_dir, tiny_config(data_root), TINY_MODEL, progress=False)
    return run_dir, result


# --- 1. Interrupted runs (subprocesses) ----------------------------------------------------------

# 400 steps an epoch (the compiled loss of the default engine runs one in about a second on a quiet core): a signal
# sent within milliseconds of epoch 1's metrics line lands in the middle of training, about two epochs before its end
# (the tests check that it did).
STEPS_PER_EPOCH = 400
SUBPROCESS_ARGS = ["--train-examples", str(10 * STEPS_PER_EPOCH), "--batch-size", "10", "--eval-examples", "200",
                   "--latent-dim", "4", "--hidden-sizes", "32", "--test-samples", "10", "--epochs", "3", "--device",
                   "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def signal_data_root(data_root, tmp_path_factory) -> Path:
    """The first 4,800 images of MNIST's training file (4,000 training, the last sixth validation) and 200 of its
    test file: the runs below read them in milliseconds, in each of their processes, instead of all 70,000."""
    root = tmp_path_factory.mktemp("signal_data")
    (root / "MNIST" / "raw").mkdir(parents=True)
    write_small_mnist(data_root / "MNIST" / "raw", root / "MNIST" / "raw", 12 * STEPS_PER_EPOCH, 200)
    return root


def _as_from_a_terminal() -> None:
    """In the child before exec: Ctrl-C (SIGINT) with its default action, as a command started from a shell has
    it; an ignored SIGINT would be inherited from whatever started the test process (signal dispositions are)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_cli(data_root, *args) -> subprocess.Popen:
    env = {**os.environ, "PPL_VAE_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ppl_vae", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_as_from_a_terminal)


def wait_for_epoch(run_dir: Path, epoch: int, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll metrics.jsonl until it records ``epoch``; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(record["epoch"] >= epoch for record in runs.read_metrics(run_dir)):
            return
        if process.poll() is not None:
            pytest.fail(f"training ended (status {process.returncode}) before epoch {epoch}: {process.communicate()[1]}")
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"no epoch {epoch} in {run_dir / 'metrics.jsonl'} after {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, signal_data_root):
    """The reference run of SUBPROCESS_ARGS, never interrupted: (metrics, test.json).

    ``ppl-vae train`` in this process (cli.main): only the runs that get stopped need processes of their own, and
    the resumed runs, trained here too, are compared with it digit for digit."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setenv("PPL_VAE_DATA", str(signal_data_root))
        code = cli.main(["train", "--run-dir", str(run_dir), *SUBPROCESS_ARGS])
    assert code == 0, err.getvalue()
    return runs.read_metrics(run_dir), runs.read_json(run_dir / "test.json")


def assert_resumes_to_the_reference(run_dir: Path, signal_data_root, uninterrupted, cli_main) -> None:
    """Resume ``run_dir`` to the end; its metrics and test numbers must equal the uninterrupted run's.

    Only ``--resume`` is given: everything else, the number of epochs included, is the run's own. The resume
    runs in this process (``ppl-vae train`` through cli.main): what is under test is the folder the stopped
    process left, which any process reads alike; only the runs that get stopped need processes of their own.
    """
    ran = cli_main("train", "--run-dir", run_dir, "--resume", "--no-progress", data_root=signal_data_root)
    assert ran.returncode == 0, ran.stderr
    metrics, test = uninterrupted
    assert_same_metrics(runs.read_metrics(run_dir), metrics, tolerance=1e-6)
    resumed_test = runs.read_json(run_dir / "test.json")
    for key in ("elbo", "log_evidence", "reconstruction"):
        assert resumed_test[key]["mean"] == pytest.approx(test[key]["mean"], abs=1e-6, rel=0)


@pytest.mark.xdist_group("uninterrupted")  # one reference run (--dist loadgroup)
def test_a_run_killed_mid_epoch_resumes_to_the_numbers_of_an_uninterrupted_run(
    tmp_path, signal_data_root, uninterrupted, cli_main
):
    run_dir = tmp_path / "run"
    process = start_cli(signal_data_root, "train", "--run-dir", run_dir, *SUBPROCESS_ARGS)
    wait_for_epoch(run_dir, 1, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "test.json").exists() and len(runs.read_metrics(run_dir)) < 3, "the kill came too late"
    assert_resumes_to_the_reference(run_dir, signal_data_root, uninterrupted, cli_main)


@pytest.mark.xdist_group("uninterrupted")  # one reference run (--dist loadgroup)
def test_ctrl_c_stops_between_steps_and_the_run_resumes_to_the_same_numbers(
    tmp_path, signal_data_root, uninterrupted, cli_main
):
    run_dir = tmp_path / "run"
    process = start_cli(signal_data_root, "train", "--run-dir", run_dir, *SUBPROCESS_ARGS)
    wait_for_epoch(run_dir, 1, process)
    at_signal = len(runs.read_metrics(run_dir))
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (at_signal, len(runs.read_metrics(run_dir)), err, out[-3000:])
    assert "Traceback" not in err
    assert re.search(rf"interrupted by Ctrl-C (at epoch \d, step \d+ of {STEPS_PER_EPOCH}|after the last epoch)", err), err
    # The run directory is consistent: its checkpoint and its metrics end at the same epoch.
    saved_epoch = runs.load_checkpoint(run_dir)["epoch"]
    assert [record["epoch"] for record in runs.read_metrics(run_dir)] == list(range(1, saved_epoch + 1))
    assert not (run_dir / "test.json").exists()
    assert_resumes_to_the_reference(run_dir, signal_data_root, uninterrupted, cli_main)


# --- 2. Checkpoints ------------------------------------------------------------------------------


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_damaged(
    tmp_path, data_root, straight_run, fast_mnist, capsys
):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_config(data_root, epochs=2), TINY_MODEL, progress=False)
    latest = run_dir / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    # Evaluation names the damaged file and the good one, and does not silently use an older epoch.
    with pytest.raises(RunDirectoryError, match=r"checkpoint\.pt is damaged or truncated.*checkpoint\.prev\.pt"):
        runs.load_checkpoint(run_dir)
    assert runs.read_checkpoint(run_dir / "checkpoint.prev.pt")["epoch"] == 1

    code = cli.main(["train", "--run-dir", str(run_dir), "--resume", "--epochs", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert re.search(r"(?s)ppl-vae train: warning: the checkpoint \S+checkpoint\.pt is damaged.*\(epoch 1\)", err), err
    assert (run_dir / "checkpoint.damaged.pt").is_file()
    assert runs.read_checkpoint(run_dir / "checkpoint.prev.pt")["epoch"] == 2  # not the damaged file
    # metrics.jsonl was cut back to epoch 1, and epochs 2 and 3 came out as in the uninterrupted run.
    assert without_timings(runs.read_metrics(run_dir)) == without_timings(runs.read_metrics(straight_run[0]))


def test_resume_without_any_readable_checkpoint_names_both_files(tmp_path):
    runs.save_checkpoint(tmp_path, {"epoch": 1})
    runs.save_checkpoint(tmp_path, {"epoch": 2})
    (tmp_path / "checkpoint.pt").unlink()  # a kill between the two renames of save_checkpoint
    with pytest.warns(CheckpointFallbackWarning, match=r"checkpoint\.pt is missing.*\(epoch 1\)"):
        assert runs.load_checkpoint_for_resume(tmp_path)["epoch"] == 1
    assert runs.load_checkpoint(tmp_path)["epoch"] == 1  # the good checkpoint is the latest again
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"nor this")
    with pytest.raises(RunDirectoryError, match=r"checkpoint\.pt is damaged.*checkpoint\.prev\.pt is damaged.*--overwrite"):
        runs.load_checkpoint_for_resume(tmp_path)


def test_a_failed_checkpoint_write_keeps_both_earlier_checkpoints(tmp_path, monkeypatch):
    runs.save_checkpoint(tmp_path, {"epoch": 1})
    runs.save_checkpoint(tmp_path, {"epoch": 2})

    def disk_full(state, stream):
        stream.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(runs.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runs.save_checkpoint(tmp_path, {"epoch": 3})
    monkeypatch.undo()
    assert runs.load_checkpoint(tmp_path)["epoch"] == 2
    assert runs.read_checkpoint(tmp_path / "checkpoint.prev.pt")["epoch"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


# --- 3. Numerical faults -------------------------------------------------------------------------


def no_guide(batch) -> None:
    """A guide for models without latent sites."""


def _svi(model, guide, optimizer=None):
    return pyro.infer.SVI(model, guide, optimizer or pyro.optim.SGD({"lr": 1.0}), loss=pyro.infer.Trace_ELBO())


def test_a_nan_gradient_is_refused_before_the_update_and_names_the_parameter():
    def model(batch):
        p = pyro.param("p", torch.tensor([1.0, 2.0]))
        q = pyro.param("q", torch.tensor(0.5))
        # sqrt(p - p) is 0, so the loss is finite, but its gradient is 0 * inf = NaN.
        pyro.sample("y", dist.Normal(torch.sqrt(p - p).sum() + q, 1.0), obs=torch.tensor(0.0))

    svi = _svi(model, no_guide)
    with pytest.raises(NumericalFaultError, match=r"non-finite gradients of p\b"):
        checked_svi_step(svi, None)
    store = pyro.get_param_store()
    assert torch.equal(store["p"], torch.tensor([1.0, 2.0])) and store["q"].item() == 0.5  # no update applied
    assert all(store[name].unconstrained().grad is None or not store[name].unconstrained().grad.any() for name in ("p", "q"))


def test_a_distribution_with_nan_parameters_under_validation_is_a_numerical_fault():
    def model(batch):
        scale = pyro.param("scale", torch.tensor(math.nan))
        pyro.sample("y", dist.Normal(0.0, scale), obs=torch.tensor(0.0))

    with pytest.raises(NumericalFaultError, match="NaN or infinite parameters"):
        checked_svi_step(_svi(model, no_guide), None)


def test_clip_norm_clips_the_global_gradient_norm():
    def model(batch):
        a = pyro.param("a", torch.zeros(2))
        b = pyro.param("b", torch.zeros(2))
        pyro.factor("f", -(a * torch.tensor([3.0, 0.0])).sum() - (b * torch.tensor([0.0, 4.0])).sum())

    svi = _svi(model, no_guide)
    assert checked_svi_step(svi, None, clip_norm=1.0) == 0.0
    # The gradient (3, 0, 0, 4) has norm 5: one SGD step of rate 1 moves by it scaled to norm 1, the same
    # factor for both tensors (Pyro's per-parameter clip_args would give (-1, 0) and (0, -1)).
    store = pyro.get_param_store()
    torch.testing.assert_close(store["a"], torch.tensor([-0.6, 0.0]))
    torch.testing.assert_close(store["b"], torch.tensor([0.0, -0.8]))
    checked_svi_step(svi, None)  # without clipping: the whole gradient
    torch.testing.assert_close(store["a"], torch.tensor([-3.6, 0.0]))


@pytest.mark.parametrize("engine", ["svi", "jit"])
def test_a_nan_gradient_in_training_stops_at_its_step_and_keeps_the_last_good_state(
    tmp_path, data_root, fast_mnist, monkeypatch, engine
):
    built = {}

    def build_with_a_poisoned_gradient(config):
        vae = build_vae(config)
        backward_passes = {"count": 0}

        def poison(grad):
            backward_passes["count"] += 1
            return grad * math.nan if backward_passes["count"] == TINY_STEPS_PER_EPOCH + 1 else grad

        next(vae.decoder.parameters()).register_hook(poison)  # NaN in epoch 2, step 1
        built["vae"] = vae
        return vae

    build_vae = training_setup.build_vae
    monkeypatch.setattr(training_setup, "build_vae", build_with_a_poisoned_gradient)
    with pytest.raises(NumericalFaultError) as info:
        train(tmp_path / "run", tiny_config(data_root, engine=engine), TINY_MODEL, progress=False)
    message = str(info.value)
    assert re.search(r"the gradient became nan \(non-finite gradients of decoder\S*\) at epoch 2, step 1 of 6", message)
    assert "Likely causes" in message and "checkpoint of epoch 1" in message
    checkpoint = runs.load_checkpoint(tmp_path / "run")
    assert checkpoint["epoch"] == 1 and [m["epoch"] for m in runs.read_metrics(tmp_path / "run")] == [1]
    # The faulty update was never applied: the model in memory is still the saved one.
    state = built["vae"].state_dict()
    assert all(torch.equal(state[name], checkpoint["model"][name]) for name in state)


def test_a_diverging_run_exits_with_status_2_from_the_cli(tmp_path, data_root, fast_mnist, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(["train", "--run-dir", str(run_dir), "--epochs", "2", "--lr", "1e30", *tiny_cli_args(data_root)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(r"ppl-vae train: error: the (loss|gradient)\b.* at epoch 1, step \d of 6: training diverged", err)
    assert "--clip-norm" in err and "checkpoint of epoch 0" in err
    checkpoint = runs.load_checkpoint(run_dir)
    assert checkpoint["epoch"] == 0 and all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_bad_learning_rate_and_clip_norm_are_refused(tmp_path, data_root):
    for option, value in (("--lr", "inf"), ("--lr", "nan"), ("--clip-norm", "0"), ("--clip-norm", "-1")):
        with pytest.raises(SystemExit) as info:
            cli.main(["train", "--run-dir", str(tmp_path / "run"), option, value])
        assert info.value.code == 2
    with pytest.raises(PplVaeError, match="clip_norm must be a positive finite number"):
        tiny_config(data_root, clip_norm=math.inf)


# --- 4. Bad input to the evaluation API ----------------------------------------------------------

A = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7]])


def normal_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ A, 1.0).to_event(1), obs=x)


def normal_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ A.T / 3, 1.0).to_event(1))


def fixed_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def bernoulli_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ A).to_event(1), obs=x)


def test_wrong_dtype_and_shape_are_clear_errors_that_keep_the_cause():
    with pytest.raises(InvalidDataError, match=r"dtype torch\.int64.*failed with RuntimeError") as info:
        log_evidence(normal_model, normal_guide, torch.zeros(4, 3, dtype=torch.long), num_samples=5)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(InvalidDataError, match=r"shape \[4, 5\].*the shape, dtype and device the programs expect"):
        elbo_decomposition(normal_model, normal_guide, torch.zeros(4, 5))


@pytest.mark.parametrize("validation", [True, False])
def test_values_outside_the_likelihood_support_are_refused(validation):
    pyro.enable_validation(validation)
    with pytest.raises(InvalidDataError, match=r"observed site 'x' holds values outside the support Boolean\(\) of its distribution Bernoulli"):
        log_evidence(bernoulli_model, normal_guide, torch.full((4, 3), 0.5), num_samples=5)
    x = torch.zeros(4, 3)
    x[2, 1] = math.nan
    with pytest.raises(InvalidDataError, match=r"x holds NaN values: 1 entries in 1 datapoint\(s\), the first at index 2"):
        elbo_decomposition(normal_model, fixed_guide, x)


def test_values_outside_the_support_beyond_the_first_chunk_are_refused():
    pyro.enable_validation(False)  # so that the check, not torch's validation, has to catch it
    x = torch.zeros(8, 3)
    x[6, 0] = 0.5
    with pytest.raises(InvalidDataError, match="outside the support"):
        log_evidence(bernoulli_model, normal_guide, x, num_samples=4, chunk_size=2)


def test_a_guide_that_samples_a_latent_outside_the_data_plate_is_refused():
    def global_guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(2))

    with pytest.raises(ModelStructureError, match=r"guide samples the latent site 'z' outside it"):
        elbo_decomposition(normal_model, global_guide, torch.zeros(4, 3))

    def other_dim_guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1, 2), 1.0).to_event(1))

    with pytest.raises(ModelStructureError, match=r"'z' at dim -2 instead of the model's -1"):
        elbo_decomposition(normal_model, other_dim_guide, torch.zeros(4, 3))


# Nested data plates: x is [N, M] with M = N, one latent per row. Two nested plates of size len(x) hold
# the observed site, so which one is the data plate is ambiguous: refused unless data_plate names it.
def nested_model(x):
    with pyro.plate("rows", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("columns", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def nested_exact_guide(x):
    m = x.shape[1]  # the posterior of z given a row: N(sum / (1 + m), 1 / (1 + m))
    with pyro.plate("rows", x.shape[0], dim=-2):
        pyro.sample("z", dist.Normal(x.sum(-1, keepdim=True) / (1 + m), (1 / (1 + m)) ** 0.5))


def test_nested_plates_of_the_data_size_are_ambiguous_until_the_data_plate_is_named():
    x = torch.randn(3, 3)
    with pytest.raises(ModelStructureError, match=r"several plates of size len\(x\)=3 .*\['columns', 'rows'\].*data_plate="):
        log_evidence(nested_model, nested_exact_guide, x, num_samples=5)
    with pytest.raises(ModelStructureError, match="site 'z' is not inside the data plate 'columns'"):
        log_evidence(nested_model, nested_exact_guide, x, num_samples=5, data_plate="columns")
    # Named, the nesting is supported: the inner plate is summed per row, and the exact guide gives log p(x).
    exact = torch.distributions.MultivariateNormal(torch.zeros(3), torch.eye(3) + torch.ones(3, 3)).log_prob(x)
    estimate = log_evidence(nested_model, nested_exact_guide, x, num_samples=5, data_plate="rows")
    torch.testing.assert_close(estimate, exact.double(), atol=1e-4, rtol=0)


# --- 5. Out of memory during evaluation ----------------------------------------------------------


def failing_chunks(monkeypatch, fails) -> list[tuple[int, int]]:
    """Make ``chunk_terms`` raise OutOfMemoryError when ``fails(calls, rows, k)``; returns the calls made."""
    calls: list[tuple[int, int]] = []
    chunk_terms = chunking.chunk_terms

    def flaky(model, guide, data, k, structure):
        rows = data[0].shape[0]  # data is (x, *cond), sliced to the chunk's rows
        calls.append((rows, k))
        if fails(len(calls), rows, k):
            raise OUT_OF_MEMORY("CUDA out of memory (simulated)")
        return chunk_terms(model, guide, data, k, structure)

    monkeypatch.setattr(chunking, "chunk_terms", flaky)
    return calls


def test_out_of_memory_retries_with_fewer_particles_and_gives_the_exact_answer(monkeypatch):
    lg = LinearGaussian()
    x = lg.sample(6)
    unchunked = log_evidence(lg.model, lg.exact_guide, x, num_samples=32)
    calls = failing_chunks(monkeypatch, lambda call, rows, k: call == 1)
    with pytest.warns(EvaluationMemoryWarning, match="3 datapoints x 16 particles at once; retrying with 8 particles"):
        retried = log_evidence(lg.model, lg.exact_guide, x, num_samples=32, chunk_size=3, particles_per_chunk=16)
    assert calls == [(3, 16)] + [(3, 8)] * 8
    # With the exact posterior as guide every weight is p(x): any draws give log p(x).
    torch.testing.assert_close(retried, lg.log_evidence(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(retried, unchunked, atol=1e-4, rtol=0)


def test_out_of_memory_at_one_particle_halves_the_datapoints_and_covers_every_draw_once(monkeypatch):
    lg = LinearGaussian()
    x = lg.sample(7)
    calls = failing_chunks(monkeypatch, lambda call, rows, k: rows * k > 4)
    plan = plan_evaluation(lg.model, lg.exact_guide, x, num_samples=10, chunk_size=6, particles_per_chunk=4)
    with pytest.warns(EvaluationMemoryWarning) as caught:
        chunks = [(rows, terms.log_weight.shape) for rows, terms in iter_chunk_terms(lg.model, lg.exact_guide, x, plan)]
    assert [str(w.message).split("retrying with ")[1].split(" (")[0] for w in caught] == [
        "2 particles per chunk", "1 particle per chunk", "3 datapoints per chunk"]
    assert calls[:4] == [(6, 4), (6, 2), (6, 1), (3, 1)] and max(rows * k for rows, k in calls[3:]) <= 4
    draws = torch.zeros(7, dtype=torch.long)
    for index, (rows, shape) in enumerate(chunks):
        assert shape == (shape[0], rows.stop - rows.start)
        draws[rows] += shape[0]
        if index and chunks[index - 1][0] != rows:  # a data chunk's particle chunks come together
            assert all(earlier != rows for earlier, _ in chunks[: index - 1])
    assert draws.tolist() == [10] * 7
    with pytest.warns(EvaluationMemoryWarning):
        parts = elbo_decomposition(lg.model, lg.exact_guide, x, num_samples=10, kl="mc", chunk_size=6,
                                   particles_per_chunk=4)
    torch.testing.assert_close(parts["elbo"], lg.log_evidence(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_datapoints, fails, message", [
    (1, lambda call, rows, k: True, "a single datapoint with a single particle"),
    (2, lambda call, rows, k: call == 2, "2 datapoints with 1 particle after earlier chunks of them fit"),
])
def test_out_of_memory_that_no_smaller_chunk_can_fix_is_a_clear_error(monkeypatch, num_datapoints, fails, message):
    lg = LinearGaussian()
    failing_chunks(monkeypatch, fails)
    with pytest.raises(PplVaeError, match=message) as info:
        log_evidence(lg.model, lg.exact_guide, lg.sample(num_datapoints), num_samples=2, particles_per_chunk=1)
    assert isinstance(info.value.__cause__, OUT_OF_MEMORY)


@pytest.mark.parametrize("device_error", inspection.DEVICE_ERRORS)
def test_device_errors_are_neither_reworded_nor_swallowed(device_error):
    # Out of memory or a CUDA error is not bad input: it must not become "check x's shape" or a diagnostic
    # marked unavailable (after a CUDA error every later step fails too, and the evaluation would exit 0).
    from ppl_vae.diagnostics import _or_reason

    def broken_model(x):
        raise device_error("CUDA error: an illegal memory access was encountered (simulated)")

    lg = LinearGaussian()
    with pytest.raises(device_error, match="simulated"):
        log_evidence(broken_model, lg.exact_guide, lg.sample(3), num_samples=4)
    with pytest.raises(device_error, match="simulated"):
        _or_reason(lambda: broken_model(None))
    assert "unavailable" in _or_reason(lambda: torch.ones(2) @ torch.ones(3))  # an ordinary RuntimeError still is


# --- 6. Run directories from the command line ----------------------------------------------------


def test_the_cli_refuses_to_reuse_a_run_directory_without_resume_or_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("earlier work")
    assert cli.main(["train", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--resume" in err and "--overwrite" in err
    assert (run_dir / "notes.txt").read_text() == "earlier work"
    assert cli.main(["train", "--run-dir", str(run_dir), "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert cli.main(["train", "--run-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_the_cli_names_a_damaged_checkpoint_when_evaluating(tmp_path, capsys):
    runs.write_json(tmp_path / "config.json", {"model": TINY_MODEL.to_dict(), "train": {}})
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 64)
    assert cli.main(["evaluate", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(r"the checkpoint \S+checkpoint\.pt is damaged or truncated", err)


# --- 7. Determinism ------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_numbers_and_another_seed_does_not(tmp_path, data_root, straight_run, fast_mnist):
    run_dir, result = straight_run
    again = train(tmp_path / "again", tiny_config(data_root), TINY_MODEL, progress=False)
    assert without_timings(runs.read_metrics(tmp_path / "again")) == without_timings(runs.read_metrics(run_dir))
    for key in ("elbo", "reconstruction", "kl", "log_evidence", "gap"):
        assert again[key] == result[key]
    a, b = runs.load_checkpoint(run_dir)["model"], runs.load_checkpoint(tmp_path / "again")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    train(tmp_path / "other", tiny_config(data_root, epochs=1, seed=1), TINY_MODEL, progress=False)
    assert runs.read_metrics(tmp_path / "other")[0]["val_elbo"] != runs.read_metrics(run_dir)[0]["val_elbo"]


# --- 8. Properties of the evaluation API (hypothesis) --------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=15, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def chain_of_latents(sizes: list[int], data_dim: int, seed: int):
    """A model z_1 -> z_2 -> ... -> x with Gaussian sites of the given sizes, and a diagonal Gaussian guide."""
    g = torch.Generator().manual_seed(seed)
    links = [torch.randn(a, b, generator=g) / 2 for a, b in zip(sizes, sizes[1:])]
    loadings = [torch.randn(size, data_dim, generator=g) for size in sizes]
    encoders = [torch.randn(data_dim, size, generator=g) / 2 for size in sizes]
    scales = [0.3 + torch.rand(size, generator=g) for size in sizes]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            mean, z = 0.0, None
            for i, size in enumerate(sizes):
                loc = torch.zeros(size) if z is None else z @ links[i - 1]
                z = pyro.sample(f"z{i}", dist.Normal(loc, 1.0).to_event(1))
                mean = mean + z @ loadings[i]
            pyro.sample("x", dist.Normal(mean, 0.8).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            for i in range(len(sizes)):
                pyro.sample(f"z{i}", dist.Normal(x @ encoders[i], scales[i]).to_event(1))

    return model, guide


@PROPERTY_SETTINGS
@given(
    n=st.integers(1, 6), data_dim=st.integers(1, 4), sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    k=st.integers(1, 6), chunk_size=st.none() | st.integers(1, 6), particles=st.none() | st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_the_decomposition_sums_to_the_elbo_and_the_evidence_estimate_is_above_it(
    n, data_dim, sizes, k, chunk_size, particles, seed
):
    pyro.enable_validation(True)
    model, guide = chain_of_latents(sizes, data_dim, seed)
    x = torch.randn(n, data_dim, generator=torch.Generator().manual_seed(seed + 1))
    chunks = dict(chunk_size=chunk_size, particles_per_chunk=particles)
    names = [f"z{i}" for i in range(len(sizes))]

    parts = elbo_decomposition(model, guide, x, num_samples=k, **chunks)
    assert parts["elbo"].shape == (n,) and sorted(parts["kl"]) == names
    assert parts["kl_method"] == {name: "analytic" for name in names}
    torch.testing.assert_close(parts["elbo"], parts["reconstruction"] - sum(parts["kl"].values()), atol=1e-9, rtol=0)
    assert all((kl >= -1e-5).all() for kl in parts["kl"].values())  # each is an average of KL(q || p) >= 0

    # With Monte Carlo KL and the same draws, the decomposition sums to the mean log-weight (what Trace_ELBO
    # estimates), and log p̂(x) = log mean_k w_k is above it (Jensen).
    pyro.set_rng_seed(seed)
    plan = plan_evaluation(model, guide, x, num_samples=k, kl="mc", **chunks)
    log_w = torch.zeros(k, n, dtype=torch.float64)
    taken = torch.zeros(n, dtype=torch.long)
    for rows, terms in iter_chunk_terms(model, guide, x, plan):
        block = terms.log_weight.double()
        log_w[taken[rows.start] : taken[rows.start] + block.shape[0], rows] = block
        taken[rows] += block.shape[0]
    pyro.set_rng_seed(seed)
    mc_parts = elbo_decomposition(model, guide, x, num_samples=k, kl="mc", **chunks)
    pyro.set_rng_seed(seed)
    evidence = evidence_estimate(model, guide, x, num_samples=k, **chunks)
    torch.testing.assert_close(mc_parts["elbo"], log_w.mean(0), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(evidence.log_evidence, torch.logsumexp(log_w, 0) - math.log(k), atol=1e-6, rtol=1e-9)
    assert (evidence.log_evidence >= mc_parts["elbo"] - 1e-4).all()


def diagonal_guide_elbo(lg: LinearGaussian, x: torch.Tensor, loc: torch.Tensor, scale: float) -> torch.Tensor:
    """The exact ELBO of the guide N(loc, scale^2 I) in the linear-Gaussian model, per datapoint (float64)."""
    W, b, s2 = lg.W.double(), lg.b.double(), lg.noise**2
    loc, x = loc.double(), x.double()
    residual = ((x - loc @ W.T - b) ** 2).sum(-1)
    reconstruction = -0.5 * lg.data_dim * math.log(2 * math.pi * s2) - (residual + scale**2 * (W**2).sum()) / (2 * s2)
    kl = 0.5 * (lg.latent_dim * (scale**2 - 1 - math.log(scale**2)) + (loc**2).sum(-1))
    return reconstruction - kl


@PROPERTY_SETTINGS
@given(
    data_dim=st.integers(1, 4), latent_dim=st.integers(1, 3), noise=st.floats(0.3, 1.5), n=st.integers(1, 4),
    shift=st.floats(-1.0, 1.0), widen=st.floats(1.0, 1.5), seed=st.integers(0, 2**16),
)
def test_elbo_and_evidence_estimates_agree_with_the_closed_forms(data_dim, latent_dim, noise, n, shift, widen, seed):
    """With q wider than the posterior the weights are bounded, so 5-standard-error bands are sound."""
    lg = LinearGaussian(data_dim=data_dim, latent_dim=latent_dim, noise=noise, seed=seed)
    x = lg.sample(n, seed=seed + 1)
    posterior_loc, scale_tril = lg.posterior(x)
    largest_variance = torch.linalg.eigvalsh(scale_tril.double() @ scale_tril.double().T).max().item()
    loc, scale = posterior_loc + shift, widen * largest_variance**0.5

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))

    k = 2000
    pyro.set_rng_seed(seed)
    plan = plan_evaluation(lg.model, guide, x, num_samples=k, kl="mc")
    log_w = torch.cat([terms.log_weight.double() for _, terms in iter_chunk_terms(lg.model, guide, x, plan)])
    pyro.set_rng_seed(seed)
    evidence = evidence_estimate(lg.model, guide, x, num_samples=k)
    torch.testing.assert_close(evidence.log_evidence, torch.logsumexp(log_w, 0) - math.log(k), atol=1e-6, rtol=1e-9)

    exact_log_px, exact_elbo = lg.log_evidence(x), diagonal_guide_elbo(lg, x, loc, scale)
    assert (exact_elbo <= exact_log_px + 1e-9).all()
    elbo, elbo_se = log_w.mean(0), log_w.std(0) / math.sqrt(k)
    assert ((elbo - exact_elbo).abs() <= 5 * elbo_se + 1e-4).all()
    assert (elbo <= exact_log_px + 5 * elbo_se + 1e-4).all()  # the ELBO is below log p(x)
    assert (evidence.log_evidence >= elbo - 1e-9).all()
    tolerance = 5 * evidence.stderr + evidence.stderr**2 + 1e-4  # noise, and the IWAE bias of about -se^2 / 2
    assert ((evidence.log_evidence - exact_log_px).abs() <= tolerance).all()

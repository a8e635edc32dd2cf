"""Run directories and checkpoints under accidents (issue 17): --overwrite, two writers, crafted checkpoints,
stale results, --resume with other options, damaged metrics, failed writes, config files, NaN weights.

Most cases go through the command line (``ppl-vae ARGS`` through cli.main, in this process: an exception would
fail the test as a traceback would show), on tiny runs copied from one trained run per module; processes of their
own where the process is the point (a second writer's lock holder, a file-size limit set on the command).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Ran

from ppl_vae import cli, runs
from ppl_vae.errors import DamagedMetricsWarning, RunDirectoryError, RunWriteError

TINY = ["--train-examples", "200", "--batch-size", "50", "--eval-examples", "50", "--latent-dim", "4",
        "--hidden-sizes", "16", "--test-samples", "5", "--device", "cpu", "--no-progress"]
EVALUATE = ["--num-samples", "5", "--examples", "20", "--elbo-samples", "2", "--device", "cpu", "--no-progress"]


def cli_env(small_data_root) -> dict:
    return {**os.environ, "PPL_VAE_DATA": str(small_data_root), "OMP_NUM_THREADS": "1"}


def run_cli(small_data_root, *args, cwd=None) -> Ran:
    """``ppl-vae ARGS`` reading ``small_data_root``, in this process (cli.main, in ``cwd``): what a shell would see
    of it (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setenv("PPL_VAE_DATA", str(small_data_root))
        if cwd is not None:
            patch.chdir(cwd)
        try:
            code = cli.main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse's refusals
            code = exit_.code
    return Ran(code, out.getvalue(), err.getvalue())


def refused(result: Ran) -> str:
    """The stderr of a command that must fail with one message (status 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def succeeded(result: Ran) -> Ran:
    assert result.returncode == 0, result.stderr
    return result


def main(*args) -> int:
    """``ppl-vae ARGS`` in this process, its output read from capsys (the variations of a case)."""
    return cli.main([str(arg) for arg in args])


@pytest.fixture(autouse=True)
def data_from_env(small_data_root, monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(small_data_root))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data_root) -> Path:
    """A finished 3-epoch tiny run (tests copy it before changing anything)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPL_VAE_DATA", str(small_data_root))
        assert main("train", "--run-dir", run_dir, "--epochs", "3", *TINY) == 0
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and not p.name.startswith(".ppl_vae")}


# --- 1. --overwrite deletes only a run, and only after every check ---------------------------------


def test_overwrite_refuses_a_folder_that_holds_files_ppl_vae_did_not_write(tmp_path, small_data_root, run_copy, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "data").mkdir()
    (folder / "data" / "x.csv").write_text("1,2")
    err = refused(run_cli(small_data_root, "train", "--run-dir", ".", "--overwrite", "--epochs", "1", *TINY, cwd=folder))
    # No manifest.json (issue 24): no run wrote this folder, and nothing in it is deleted.
    assert "manifest.json, and . has none: it holds data/, notes.txt" in err and "Nothing was deleted" in err
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "data" / "x.csv").read_text() == "1,2"
    # A run with a file of the user's in it: refused too, naming that file; the run is untouched.
    (run_copy / "my-notes.md").write_text("keep")
    before = files(run_copy)
    assert main("train", "--run-dir", run_copy, "--overwrite", "--epochs", "1", *TINY) == 2
    err = capsys.readouterr().err
    assert "my-notes.md" in err and "config.json" not in err.split("write:")[1]
    assert files(run_copy) == before
    # A folder of ppl_vae file names without a run's manifest is no run either.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "evaluation.json").write_text("{}")
    assert main("train", "--run-dir", lone, "--overwrite", "--epochs", "1", *TINY) == 2
    assert "has none: it holds evaluation.json" in capsys.readouterr().err
    assert (lone / "evaluation.json").read_text() == "{}"


def test_overwrite_keeps_the_old_run_when_another_check_fails_and_replaces_it_when_all_pass(
    tmp_path, small_data_root, run_copy, capsys
):
    runs.record_written(run_copy, "evaluation.json")[0].write_text("{}")  # recorded in the manifest, as evaluate does
    before = files(run_copy)
    empty = tmp_path / "empty-data"
    empty.mkdir()
    err = refused(run_cli(small_data_root, "train", "--run-dir", run_copy, "--overwrite", "--epochs", "1", *TINY,
                          "--data-dir", empty))
    assert "MNIST" in err
    assert files(run_copy) == before
    assert main("train", "--run-dir", run_copy, "--overwrite", "--epochs", "1", *TINY, "--device", "cuda:99") == 2
    assert "cuda" in capsys.readouterr().err and files(run_copy) == before
    assert main("train", "--run-dir", run_copy, "--overwrite", "--epochs", "1", *TINY) == 0
    assert [m["epoch"] for m in runs.read_metrics(run_copy)] == [1]
    assert not (run_copy / "evaluation.json").exists()  # the old run's files went with it
    assert runs.read_json(run_copy / "test.json")["epoch"] == 1


# --- 2. One writer per run; a killed one blocks nothing --------------------------------------------


def checkpointed_epochs(run_dir: Path) -> int:
    """The epoch of ``run_dir``'s last checkpoint, 0 while there is none (checkpoints are replaced atomically)."""
    if not (run_dir / runs.CHECKPOINT_FILE).exists():
        return 0
    return runs.load_checkpoint(run_dir)["epoch"]


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path, small_data_root, capsys):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "ppl_vae", "train", "--run-dir", str(run_dir), "--epochs", "100000",
         "--train-examples", "200", "--batch-size", "20", "--eval-examples", "50", "--latent-dim", "4",
         "--hidden-sizes", "16", "--test-samples", "5", "--device", "cpu", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(small_data_root))
    try:
        deadline = time.monotonic() + 240
        while not checkpointed_epochs(run_dir):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no epoch after 240 s"
            time.sleep(0.05)
        # Paused (after an epoch's checkpoint: a pause between its metrics line and its checkpoint would leave the
        # epoch-0 one), the holder keeps its lock (a live process) without taking a core from the commands below.
        process.send_signal(signal.SIGSTOP)
        err = refused(run_cli(small_data_root, "train", "--run-dir", run_dir, "--resume"))
        assert f"is in use: process {process.pid} on " in err and "is training into it" in err, err
        assert "ppl_vae train --run-dir" in err  # its command
        assert main("train", "--run-dir", run_dir, "--overwrite", "--epochs", "1", *TINY) == 2
        assert f"is in use: process {process.pid} on " in capsys.readouterr().err
        # An evaluation may read the run meanwhile: its result says which epoch it saw, not the planned number.
        assert main("evaluate", run_dir, *EVALUATE) == 0
        evaluation = runs.read_json(run_dir / "evaluation.json")
        assert 1 <= evaluation["epoch"] == evaluation["epochs"] < 100000 and evaluation["epochs_planned"] == 100000
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    epoch = runs.load_checkpoint(run_dir)["epoch"]
    # The kill left the lock file; the system released the lock, so resuming is not blocked.
    assert main("train", "--run-dir", run_dir, "--resume", "--epochs", max(epoch, 1), "--no-progress") == 0
    assert runs.read_json(run_dir / "test.json")["epoch"] == max(epoch, 1)


def test_a_run_being_evaluated_is_not_overwritten(small_data_root, run_copy, capsys):
    with runs.RunLock(run_copy, "evaluate"):  # a second lock object on the same file is refused even in-process
        assert main("train", "--run-dir", run_copy, "--overwrite", "--epochs", "1", *TINY) == 2
    err = capsys.readouterr().err
    assert f"process {os.getpid()}" in err and "is evaluating it" in err
    assert runs.load_checkpoint(run_copy)["epoch"] == 3


def test_the_lock_refuses_a_second_holder_in_the_same_process_too(tmp_path):
    with runs.RunLock(tmp_path):
        with pytest.raises(RunDirectoryError, match="is in use: process"):
            runs.RunLock(tmp_path).acquire()
    runs.RunLock(tmp_path).acquire().release()  # free again


# --- 3. Checkpoints cannot run code ------------------------------------------------------------------


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, small_data_root, run_copy):
    marker = tmp_path / "code-ran"
    torch.save({"format": 1, "epoch": 3, "model": _RunsACommand(marker)}, run_copy / "checkpoint.pt")
    err = refused(run_cli(small_data_root, "evaluate", run_copy, *EVALUATE))
    assert "loading it could run code, so it is refused" in err and "checkpoint.pt" in err
    assert not marker.exists()
    with pytest.raises(RunDirectoryError, match="could run code"):
        runs.read_checkpoint(run_copy / "checkpoint.pt")
    assert not marker.exists()


# --- 4. Results record their epoch and checkpoint; compare marks a stale one ------------------------


def test_results_record_their_checkpoint_and_compare_marks_a_stale_one(tmp_path, small_data_root, run_copy, capsys):
    test = runs.read_json(run_copy / "test.json")
    checkpoint = runs.load_checkpoint(run_copy)
    assert test["epoch"] == 3 and test["checkpoint_id"] == checkpoint["id"]
    assert main("evaluate", run_copy, *EVALUATE) == 0
    evaluation = runs.read_json(run_copy / "evaluation.json")
    assert evaluation["epoch"] == 3 and evaluation["checkpoint_id"] == checkpoint["id"]
    assert main("train", "--run-dir", run_copy, "--resume", "--epochs", "4", "--no-progress") == 0
    # compare takes the newest result (test.json, epoch 4): nothing stale.
    assert main("compare", run_copy, "--out", tmp_path / "cmp") == 0
    out = capsys.readouterr().out
    assert "| run | " in out and "⚠" not in out and "| 4 |" in out
    # Without it, evaluation.json (epoch 3) is marked: computed before the run's latest epoch.
    (run_copy / "test.json").unlink()
    out = succeeded(run_cli(small_data_root, "compare", run_copy, "--out", tmp_path / "cmp")).stdout
    assert "| 3 ⚠ (run at 4) |" in out and "evaluation.json computed at epoch 3, the run is at epoch 4" in out
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as stream:
        row = next(csv.DictReader(stream))
    assert row["epochs"] == "3" and row["run_epoch"] == "4" and row["result_file"] == "evaluation.json"


# --- 5. --resume with other options ------------------------------------------------------------------


def test_resume_refuses_fewer_epochs_and_options_that_would_change_the_run(small_data_root, run_copy, capsys):
    before = files(run_copy)
    err = refused(run_cli(small_data_root, "train", "--run-dir", run_copy, "--resume", "--epochs", "2"))
    assert "--epochs 2 is fewer than the 3 epochs" in err and "Give --epochs 3 or more" in err
    assert files(run_copy) == before
    assert main("train", "--run-dir", run_copy, "--resume", "--lr", "0.01", "--batch-size", "7", "--hidden-sizes", "8",
                "8", "--epochs", "5") == 2
    err = capsys.readouterr().err
    for change in ("--lr 0.01 (the run's: 0.001)", "--batch-size 7 (the run's: 50)", "--hidden-sizes 8 8 (the run's: 16)"):
        assert change in err
    assert "refused, not ignored" in err and "--epochs (train to that many epochs)" in err and "--epochs 5" not in err
    assert files(run_copy) == before
    # Repeating the run's own values is no change: accepted (this only runs the test evaluation again).
    assert main("train", "--run-dir", run_copy, "--resume", "--epochs", "3", "--batch-size", "50", "--device", "cpu",
                "--no-progress") == 0
    assert runs.read_json(run_copy / "test.json")["epochs"] == 3


# --- 6. Damaged metrics lines --------------------------------------------------------------------------


def test_a_damaged_metrics_line_is_reported_and_no_good_record_is_dropped(small_data_root, run_copy):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    damaged = lines[1][: len(lines[1]) // 2]
    (run_copy / "metrics.jsonl").write_text("\n".join([lines[0], damaged, lines[2]]) + "\n")
    with pytest.warns(DamagedMetricsWarning, match=r"line 2 cannot be read"):
        assert [m["epoch"] for m in runs.read_metrics(run_copy)] == [1, 3]
    result = succeeded(run_cli(small_data_root, "train", "--run-dir", run_copy, "--resume", "--no-progress"))
    assert "warning:" in result.stderr and "line 2 cannot be read (damaged)" in result.stderr
    assert "the records of epoch 2 are missing" in result.stderr
    assert (run_copy / "metrics.jsonl").read_text().splitlines() == [lines[0], lines[2]]
    assert (run_copy / "metrics.damaged.jsonl").read_text() == damaged + "\n"


def test_a_last_line_cut_short_by_a_crash_is_dropped_without_a_warning(tmp_path, recwarn):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "val')
    assert runs.read_metrics(tmp_path) == [{"epoch": 1}]
    runs.truncate_metrics(tmp_path, 1)
    assert not recwarn.list and not (tmp_path / "metrics.damaged.jsonl").exists()


# --- 7. Failed writes ----------------------------------------------------------------------------------


# ppl-vae commands one after another in a process of their own, each under its own file-size limit (RLIMIT_FSIZE,
# which the process cannot set on itself without setting it on the test's process too): a write past the limit fails
# with EFBIG, as a real disk refuses it. One JSON line out: each command's status, stdout and stderr.
_LIMITED_COMMANDS = """
import contextlib, io, json, resource, signal, sys
from ppl_vae import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of a kill
ran = []
for limit, argv in json.loads(sys.argv[1]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    ran.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(ran))
"""


def run_limited(small_data_root, *commands: tuple[int, list]) -> list[Ran]:
    """Each ``(limit in bytes, ARGS)`` of ``commands`` as ``ppl-vae ARGS`` under that file-size limit, in one process."""
    jobs = [[limit, [str(arg) for arg in args]] for limit, args in commands]
    result = subprocess.run([sys.executable, "-c", _LIMITED_COMMANDS, json.dumps(jobs)], capture_output=True, text=True,
                            env=cli_env(small_data_root), timeout=300)
    # Nothing besides the commands' own streams (written to them, as the process's would be) reaches stderr.
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return [Ran(*ran) for ran in json.loads(result.stdout)]


def test_a_failed_write_is_one_line_naming_the_file_and_the_tables_come_first(tmp_path, small_data_root, run_copy):
    (run_copy / "evaluation.json").unlink(missing_ok=True)
    new = tmp_path / "new"
    # Evaluation: its per-datapoint file does not fit. Training: the first checkpoint does not fit.
    evaluated, trained = run_limited(small_data_root, (1000, ["evaluate", run_copy, *EVALUATE]),
                                     (20_000, ["train", "--run-dir", new, "--epochs", "1", *TINY]))
    err = refused(evaluated)
    assert "log p̂(x), importance sampled (K=5)" in evaluated.stdout  # the result is printed before writing
    assert f"cannot write {run_copy / 'evaluation_per_datapoint.npz'}: the file is larger than" in err
    assert len(err.strip().splitlines()) == 1
    assert not [p.name for p in run_copy.iterdir() if p.name.endswith(".tmp")]
    # The half-made run is removed and blocks no later run.
    err = refused(trained)
    assert f"cannot write {new / 'checkpoint.pt'}: the file is larger than" in err
    assert not new.exists()
    assert main("train", "--run-dir", new, "--epochs", "1", *TINY) == 0


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied"),
                                         (errno.EROFS, "the file system is read-only")])
def test_a_failed_write_says_why_and_leaves_no_temporary_file(tmp_path, monkeypatch, code, words):
    runs.save_checkpoint(tmp_path, {"epoch": 1})

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runs.os, "fsync", failing_fsync)
    with pytest.raises(RunWriteError, match=f"cannot write {tmp_path / 'checkpoint.pt'}: {words}"):
        runs.save_checkpoint(tmp_path, {"epoch": 2})
    with pytest.raises(RunWriteError, match=f"cannot write {tmp_path / 'test.json'}: {words}"):
        runs.write_json(tmp_path / "test.json", {})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert runs.load_checkpoint(tmp_path)["epoch"] == 1


def test_temporary_files_left_by_a_kill_are_removed_when_training_resumes(small_data_root, run_copy):
    (run_copy / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert main("train", "--run-dir", run_copy, "--resume", "--no-progress") == 0
    assert not (run_copy / ".checkpoint.pt.abc123.tmp").exists()


# --- 8. Config files and odd values, checked before anything is written --------------------------------


def test_config_file_values_and_odd_options_are_refused_before_anything_is_written(tmp_path, small_data_root, capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"epochs": 0}))
    err = refused(run_cli(small_data_root, "train", "--config", config, "--run-dir", run_dir, *TINY))
    assert "'epochs' (--epochs) must be a positive integer, got 0" in err and not run_dir.exists()
    err = refused(run_cli(small_data_root, "train", "--run-dir", run_dir, "--seed", "-1", "--epochs", "1", *TINY))
    assert "--seed: must be an integer from 0 to 2**32 - 1" in err and not run_dir.exists()
    for values, message in (
        ({"batch_size": 2.5}, "'batch_size' (--batch-size) must be an integer, got 2.5"),
        ({"hidden_sizes": 200}, "'hidden_sizes' (--hidden-sizes) must be a list, e.g. [200], got 200"),
        ({"hidden_sizes": [200, "x"]}, "must be an integer, got \"x\""),
        ({"lr": -1}, "must be a positive finite number"),
        ({"prior": "nope"}, "'prior' (--prior) must be one of"),
        ({"no_progress": "yes"}, "must be true or false"),
        ({"seed": 2**40}, "must be an integer from 0 to 2**32 - 1"),
        ([1, 2], "must hold a JSON object"),
    ):
        config.write_text(json.dumps(values))
        with pytest.raises(SystemExit) as info:
            cli.main(["train", "--config", str(config), "--run-dir", str(run_dir)])
        assert info.value.code == 2
        assert message in capsys.readouterr().err, values
        assert not run_dir.exists()
    # A good file still works, and the command line wins over it.
    config.write_text(json.dumps({"epochs": 2, "clip_norm": None, "hidden_sizes": [16], "_note": "ignored"}))
    assert main("train", "--config", config, "--run-dir", run_dir, *TINY, "--epochs", "1") == 0
    saved = runs.read_json(run_dir / "config.json")
    assert saved["train"]["epochs"] == 1 and saved["model"]["hidden_sizes"] == [16]


def test_the_python_api_refuses_wrong_types_and_seeds():
    from ppl_vae.train import TrainConfig

    for bad in ({"batch_size": 2.5}, {"seed": -1}, {"epochs": True}, {"seed": 2**32}):
        with pytest.raises(Exception, match="must be an integer|seed must be"):
            TrainConfig(**bad)


# --- 9. NaN weights in a checkpoint ----------------------------------------------------------------------


def test_nan_weights_in_a_checkpoint_are_named(small_data_root, run_copy):
    path = run_copy / "checkpoint.pt"
    state = runs.read_checkpoint(path)
    name = next(key for key in state["model"] if key.endswith("weight"))
    state["model"][name][0, 0] = float("nan")
    torch.save(state, path)
    err = refused(run_cli(small_data_root, "evaluate", run_copy, *EVALUATE))
    assert f"holds NaN or infinite weights, in {name} (epoch 3)" in err, err
    assert "shape, dtype and device" not in err
    assert "checkpoint.prev.pt" in err  # the one before it is named


def test_plot_and_diagnose_hold_the_runs_second_lock(small_data_root, run_copy, capsys):
    """Figures are written while no evaluation (or another plot) writes into the run, and train --overwrite refuses
    to delete a run whose figures are being written."""
    assert main("evaluate", run_copy, *EVALUATE) == 0
    with runs.RunLock(run_copy, "evaluate"):
        assert main("plot", run_copy) == 2
        assert main("diagnose", run_copy) == 2
    assert capsys.readouterr().err.count("is evaluating it") == 2
    assert not (run_copy / "plots").exists()
    with runs.RunLock(run_copy, "figures"):
        assert main("train", "--run-dir", run_copy, "--overwrite", "--epochs", "1", *TINY) == 2
    assert "is writing figures into it (ppl-vae plot or diagnose)" in capsys.readouterr().err
    assert runs.load_checkpoint(run_copy)["epoch"] == 3
    assert main("plot", run_copy) == 0 and (run_copy / "plots" / "training_curves.png").is_file()


def test_saving_a_checkpoint_never_leaves_a_moment_without_one(tmp_path, monkeypatch):
    """The latest checkpoint stays in place while the one before it is kept: an evaluation reading a run while it
    trains never finds it missing (it was moved away first, then replaced)."""
    runs.save_checkpoint(tmp_path, {"epoch": 1})
    seen = []
    replace = os.replace

    def watching_replace(source, destination):
        seen.append((tmp_path / "checkpoint.pt").is_file())
        return replace(source, destination)

    monkeypatch.setattr(os, "replace", watching_replace)
    runs.save_checkpoint(tmp_path, {"epoch": 2})
    monkeypatch.undo()
    assert seen and all(seen)
    assert runs.load_checkpoint(tmp_path)["epoch"] == 2
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=False)["epoch"] == 1
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "checkpoint.prev.pt"}  # no link left behind

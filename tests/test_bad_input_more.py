"""Bad input, part two (issue 24, items 8-13): program kwargs, a program's own errors, tampered result files, unsafe
.npz files, labels out of range in one split, too many processes, resuming with the run's own program, and
evaluate --examples above the split's size. Each case is one line on stderr (status 2, no traceback), or works.

Runs are tiny: 8x8 images from a .npz file, networks of a few units, one epoch, in this process.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format

from ppl_vae import cli, distributed
from ppl_vae.errors import PplVaeError
from ppl_vae.train import load_run

TINY = ["--epochs", "1", "--batch-size", "40", "--hidden-sizes", "8", "--latent-dim", "2", "--test-samples", "3",
        "--device", "cpu", "--no-progress", "--val-samples", "1", "--evidence-every", "0"]
EVALUATE = ["--num-samples", "3", "--elbo-samples", "1", "--device", "cpu", "--no-progress"]

PROGRAM = '''
import pyro
import pyro.distributions as dist
import torch
from torch import nn


class Small(nn.Module):
    """A VAE over 8x8 images that raises where its arguments say: on a bad size, or on a batch of another size."""

    def __init__(self, latent=2, fail_unless_batch=None, rows=None):
        super().__init__()
        if latent < 1:
            raise ValueError(f"latent must be positive, got {latent}")
        self.latent, self.fail_unless_batch, self.rows = latent, fail_unless_batch, rows
        self.encoder, self.decoder = nn.Linear(64, 2 * latent), nn.Linear(latent, 64)

    def model(self, x):
        if self.fail_unless_batch is not None and x.shape[0] != self.fail_unless_batch:
            raise ValueError("a bug in the user's model")
        if self.rows is not None:  # a torch operation that fails on a batch of another size, with no Python branch
            x = x.view(self.rows, 64)
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        x = x.reshape(x.shape[0], -1)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


class OneHot(nn.Module):
    """A conditional program with no num_classes attribute: torch's one_hot refuses labels outside 0-9."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(64, 4), nn.Linear(12, 64)

    def model(self, x, y):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            onehot = nn.functional.one_hot(y, 10).float().expand(*z.shape[:-1], 10)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(torch.cat([z, onehot], -1))).to_event(1), obs=x)

    def guide(self, x, y):
        x = x.reshape(x.shape[0], -1)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))
'''


def images(rng: np.random.Generator, count: int) -> np.ndarray:
    return (rng.random((count, 8, 8)) * 255).astype(np.uint8)


def write_dataset(path: Path, y_val=None, y_test=None) -> Path:
    """100 training, 30 validation and 30 test images of 8x8 with labels 0-9 (or the labels given)."""
    rng = np.random.default_rng(0)
    labels = {name: rng.integers(0, 10, count) for name, count in (("y_train", 100), ("y_val", 30), ("y_test", 30))}
    labels.update({k: v for k, v in (("y_val", y_val), ("y_test", y_test)) if v is not None})
    np.savez(path, x_train=images(rng, 100), x_val=images(rng, 30), x_test=images(rng, 30), **labels)
    return path


def main(*args) -> int:
    return cli.main([str(arg) for arg in args])


def one_line(code: int, capsys) -> str:
    """The one line a refused command wrote on stderr (status 2, nothing else, no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def program_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("programs") / "small_models.py"
    path.write_text(PROGRAM)
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, dataset) -> Path:
    """A trained and evaluated built-in VAE on the tiny dataset (tests change copies of it)."""
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    assert main("train", "--dataset", dataset, "--run-dir", run_dir, *TINY) == 0
    assert main("evaluate", run_dir, *EVALUATE) == 0
    return run_dir


@pytest.fixture
def run_copy(evaluated, tmp_path) -> Path:
    return Path(shutil.copytree(evaluated, tmp_path / "run"))


# --- 8. --program-kwargs for the built-in VAE -------------------------------------------------------


def test_program_kwargs_set_the_builtin_vaes_settings_and_are_recorded(tmp_path, dataset, capsys):
    run_dir = tmp_path / "run"
    assert main("train", "--dataset", dataset, "--run-dir", run_dir, *TINY,
                "--program-kwargs", '{"latent_dim": 3, "hidden_sizes": [6]}') == 2  # --latent-dim given too
    line = one_line(2, capsys)
    assert "latent_dim" in line and "--latent-dim" in line and not run_dir.exists()
    without_latent = [a for a in TINY if a not in ("--latent-dim", "2", "--hidden-sizes", "8")]
    assert main("train", "--dataset", dataset, "--run-dir", run_dir, *without_latent,
                "--program-kwargs", '{"latent_dim": 3, "hidden_sizes": [6]}') == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["latent_dim"] == 3 and config["model"]["hidden_sizes"] == [6]
    vae, _ = load_run(run_dir)
    assert vae.config.latent_dim == 3 and vae.config.hidden_sizes == (6,)
    # The same through --program vae; unknown names and wrong types are one line naming the valid settings.
    line = one_line(main("train", "--dataset", dataset, "--run-dir", tmp_path / "other", *without_latent,
                         "--program", "vae", "--program-kwargs", '{"bogus": 1}'), capsys)
    assert "bogus" in line and "latent_dim" in line and "hidden_sizes" in line
    line = one_line(main("train", "--dataset", dataset, "--run-dir", tmp_path / "other", *without_latent,
                         "--program-kwargs", '{"latent_dim": "3"}'), capsys)
    assert "latent_dim must be an integer" in line and not (tmp_path / "other").exists()


# --- 9. A program's own errors ----------------------------------------------------------------------


def test_a_constructor_that_raises_or_unknown_kwargs_are_one_line(tmp_path, dataset, program_file, capsys):
    common = ["--dataset", dataset, "--run-dir", tmp_path / "run", *TINY]
    line = one_line(main("train", *common, "--program", f"{program_file}:Small", "--program-kwargs", '{"latent": -3}'),
                    capsys)
    assert "small_models.py:Small" in line and "ValueError: latent must be positive, got -3" in line
    assert "small_models.py, line" in line
    line = one_line(main("train", *common, "--program", "two-layer", "--program-kwargs", '{"bogus": 1}'), capsys)
    assert "two-layer" in line and "bogus" in line and "latent" in line
    line = one_line(main("train", *common, "--program", "two-layer", "--program-kwargs", '{"latent": -3}'), capsys)
    assert "two-layer" in line and "{'latent': -3}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("engine", ["svi", "jit"])
def test_an_exception_in_the_program_during_training_names_the_epoch_and_step(tmp_path, dataset, program_file, engine,
                                                                               capsys):
    # Batches of 40, 40 and 20: the program fails on the third (under jit, when the graph for 20 is compiled).
    # A Python branch on the batch's size is no faithful trace: --engine jit refuses that program up front, so under
    # jit the failure is a torch operation's (a view to 40 rows) rather than the program's own raise.
    if engine == "jit":
        line = one_line(main("train", "--dataset", dataset, "--run-dir", tmp_path / "branch", *TINY, "--engine", engine,
                             "--program", f"{program_file}:Small", "--program-kwargs", '{"fail_unless_batch": 40}'),
                        capsys)
        assert "--engine jit cannot train this program faithfully" in line and "small_models.py" in line
    kwargs, failure = (('{"fail_unless_batch": 40}', "ValueError: a bug in the user's model (small_models.py, line")
                       if engine == "svi" else ('{"rows": 40}', "RuntimeError: "))
    code = main("train", "--dataset", dataset, "--run-dir", tmp_path / "run", *TINY, "--engine", engine,
                "--program", f"{program_file}:Small", "--program-kwargs", kwargs)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "warning:" not in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert failure in lines[0] and "small_models.py, line" in lines[0]
    assert "epoch 1, step 3 of 3" in lines[0] and "Trace Shapes" not in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["engine"]["engine"] == engine  # no fallback
    # On the first batch it is the program's error too, not a question of the data's shape.
    line = one_line(main("train", "--dataset", dataset, "--run-dir", tmp_path / "first", *TINY, "--engine", engine,
                         "--program", f"{program_file}:Small", "--program-kwargs", '{"fail_unless_batch": 7}'), capsys)
    assert "ValueError: a bug in the user's model" in line and "check that the data have the shape" not in line


def tamper_per_datapoint(run_dir: Path) -> None:
    arrays = dict(np.load(run_dir / "evaluation_per_datapoint.npz"))
    arrays["khat"] = np.array([{"pickled": 1}] * len(arrays["log_evidence"]), dtype=object)
    np.savez(run_dir / "evaluation_per_datapoint.npz", **arrays)


def tamper_evaluation(run_dir: Path) -> None:
    result = json.loads((run_dir / "evaluation.json").read_text())
    del result["elbo"], result["diagnostics"]["psis"]
    (run_dir / "evaluation.json").write_text(json.dumps(result))


def tamper_config(run_dir: Path) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["bogus"] = 1
    (run_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("tamper, file, commands", [
    (tamper_per_datapoint, "evaluation_per_datapoint.npz", ("diagnose", "compare")),
    (tamper_evaluation, "evaluation.json", ("diagnose", "compare")),
    (tamper_config, "config.json", ("compare", "evaluate")),
])
def test_tampered_result_files_are_one_line_naming_the_file(run_copy, tmp_path, tamper, file, commands, capsys):
    tamper(run_copy)
    arguments = {"diagnose": [run_copy], "compare": [run_copy, "--out", tmp_path / "cmp"],
                 "evaluate": [run_copy, *EVALUATE, "--examples", "5"]}
    for command in commands:
        line = one_line(main(command, *arguments[command]), capsys)
        assert str(run_copy / file) in line, (command, line)


def huge_header_npz(path: Path) -> Path:
    """A few hundred bytes whose .npy headers claim 730 GiB arrays."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (730 * 2**30, 1, 1)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", header.getvalue())
        archive.writestr("x_test.npy", header.getvalue())
    return path


def test_unsafe_or_unreadable_npz_datasets_are_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([{"a": 1}] * 3, dtype=object), x_test=images(rng, 3))
    renamed = tmp_path / "renamed.npz"
    np.save(tmp_path / "array.npy", images(rng, 3))
    (tmp_path / "array.npy").rename(renamed)
    text = tmp_path / "text.npz"
    text.write_text("x_train,x_test\n1,2\n")
    huge = huge_header_npz(tmp_path / "huge.npz")
    assert huge.stat().st_size < 1000
    expected = {objects: "holds Python objects", renamed: "is a .npy file", text: "is not a readable .npz file",
                huge: "declares shape [783831531520, 1, 1]"}
    for path, words in expected.items():
        line = one_line(main("train", "--dataset", path, "--run-dir", tmp_path / "run", *TINY), capsys)
        assert str(path) in line and words in line and "allow_pickle" not in line, line
        assert not (tmp_path / "run").exists()


# --- 10. Labels out of range in one split -----------------------------------------------------------


@pytest.mark.parametrize("program", ["conditional", "file"])
def test_labels_out_of_range_in_one_split_are_refused_before_training(tmp_path, program_file, program, capsys):
    test_bad = write_dataset(tmp_path / "bad_test.npz", y_test=np.array([3] * 29 + [12]))
    val_bad = write_dataset(tmp_path / "bad_val.npz", y_val=np.array([-1] + [3] * 29))
    chosen = "conditional" if program == "conditional" else f"{program_file}:OneHot"
    for path, split, value in ((test_bad, "test", "12"), (val_bad, "val", "-1")):
        line = one_line(main("train", "--dataset", path, "--run-dir", tmp_path / "run", *TINY, "--labels",
                             "--program", chosen), capsys)
        assert f"the {split} labels (y_{split} of {path}" in line and value in line, line
        assert not (tmp_path / "run").exists()  # refused before anything was trained or written


# --- 11. More processes than the machine has -----------------------------------------------------------


def test_more_cpu_processes_than_cores_are_refused_unless_on_several_machines(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cores = distributed.usable_cores()
    line = one_line(main("train", "--run-dir", tmp_path / "run", "--devices", cores + 1, "--device", "cpu"), capsys)
    assert f"--devices {cores + 1}" in line and f"{cores} core(s)" in line and not (tmp_path / "run").exists()
    line = one_line(main("evaluate", tmp_path / "run", "--devices", 1000, "--device", "cpu"), capsys)
    assert "--devices 1000" in line
    distributed.check_launch(cores, 1, None, "cpu")
    distributed.check_launch(1000, 2, "node0:29400", "cpu")  # the processes run on several machines
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PplVaeError, match="more GPUs than this machine has"):
        distributed.check_launch(2, 1, None, "auto")


# --- 12. --resume repeating the run's own program ---------------------------------------------------------


def test_resume_accepts_the_runs_own_program_and_names_it_when_another_is_given(tmp_path, dataset, program_file,
                                                                                 capsys):
    run_dir = tmp_path / "run"
    program = f"{program_file}:Small"
    assert main("train", "--dataset", dataset, "--run-dir", run_dir, *TINY, "--program", program,
                "--program-kwargs", '{"latent": 3}') == 0
    assert main("train", "--resume", "--run-dir", run_dir, "--epochs", "2", "--no-progress", "--program", program,
                "--program-kwargs", '{"latent": 3}') == 0
    copy = tmp_path / "elsewhere" / "small_models.py"  # the same file, by its content
    copy.parent.mkdir()
    shutil.copyfile(program_file, copy)
    assert main("train", "--resume", "--run-dir", run_dir, "--epochs", "2", "--no-progress",
                "--program", f"{copy}:Small") == 0
    capsys.readouterr()
    line = one_line(main("train", "--resume", "--run-dir", run_dir, "--epochs", "2", "--program", f"{program_file}:OneHot",
                         "--program-kwargs", '{"latent": 4}'), capsys)
    assert f"--program {program_file}:OneHot (the run's: {program_file.resolve()}:Small)" in line
    assert "--program-kwargs {\"latent\": 4} (the run's: {\"latent\": 3})" in line and "None" not in line


# --- 13. evaluate --examples above the split's size ---------------------------------------------------------


def test_evaluate_says_when_fewer_images_than_examples_are_evaluated(run_copy, capsys):
    assert main("evaluate", run_copy, *EVALUATE, "--examples", "100000") == 0
    err = capsys.readouterr().err
    assert "warning: --examples 100000: the test split holds 30 images; all 30 are evaluated" in err
    assert json.loads((run_copy / "evaluation.json").read_text())["num_datapoints"] == 30

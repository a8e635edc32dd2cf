"""What the evidence is of, and an evaluation's two files committed as one (issue 23, items 4 and 5).

A program that observes the label (``pyro.sample("digit", ..., obs=y)``) estimates log p(x, y), a conditional one
given y only as an input log p(x | y), the plain VAE log p(x): the evaluation names the quantity (table,
evaluation.json, test.json), splits the reconstruction per observed site, and ``compare`` pairs only runs of the
same quantity. ``evaluation.json`` and ``evaluation_per_datapoint.npz`` carry one evaluation id: a pair from two
evaluations is refused by ``compare`` and ``diagnose`` with one line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy
import pyro
import pyro.distributions as dist
import pytest
import torch
from structured_models import ConditionalGaussian

from ppl_vae import cli, runs
from ppl_vae.errors import RunWriteError
from ppl_vae.evaluate import elbo_decomposition, evaluation_summary
from ppl_vae.evaluation_files import ID_KEY, RECORD_KEY, read_per_datapoint, result_quantity
from ppl_vae.report import format_evaluation

LABEL_PROGRAMS = '''
"""Programs that observe the label, as a user would write them (M2's p(y) p(z) p(x | y, z), y given)."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F


class LabelVAE(nn.Module):
    """p(y) p(z) p(x | z, y) with p(y) uniform: the model observes the label at site "digit"."""

    def __init__(self, data_dim=784, classes=10, latent=2, one_hot=False):
        super().__init__()
        self.encoder = nn.Linear(data_dim + classes, 2 * latent)
        self.decoder = nn.Linear(latent + classes, data_dim)
        self.data_dim, self.classes, self.latent, self.one_hot = data_dim, classes, latent, one_hot

    def model(self, x, y):
        x = x.reshape(x.shape[0], self.data_dim)
        onehot = F.one_hot(y, self.classes).to(x.dtype)
        with pyro.plate("data", x.shape[0]):
            if self.one_hot:
                pyro.sample("digit", dist.OneHotCategorical(logits=x.new_zeros(self.classes)), obs=onehot)
            else:
                pyro.sample("digit", dist.Categorical(logits=x.new_zeros(self.classes)), obs=y)
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            logits = self.decoder(torch.cat([z, onehot.expand(*z.shape[:-1], self.classes)], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x, y):
        x = x.reshape(x.shape[0], self.data_dim)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(torch.cat([x, F.one_hot(y, self.classes).to(x.dtype)], -1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))
'''
TRAIN = ["--epochs", "1", "--train-examples", "100", "--batch-size", "50", "--eval-examples", "40",
         "--test-samples", "3", "--evidence-every", "0", "--device", "cpu", "--no-progress"]
EVALUATE = ["--num-samples", "5", "--examples", "20", "--elbo-samples", "2", "--device", "cpu", "--no-progress"]
MISMATCH = "evaluation.json and evaluation_per_datapoint.npz are from different evaluations"


def label_programs() -> dict:
    namespace: dict = {}
    exec(compile(LABEL_PROGRAMS, "label_models.py", "exec"), namespace)
    return namespace


def main(*args) -> int:
    return cli.main([str(arg) for arg in args])


def one_line_error(capsys) -> str:
    """The stderr of a command that just failed with status 2: one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    return err


# --- 4. The quantity, from the programs' observed sites (no data files) ---------------------------------


def synthetic(n: int = 30, data_dim: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(n, data_dim, generator=generator) < 0.5).float(), torch.randint(classes, (n,), generator=generator)


@pytest.mark.parametrize("one_hot", [False, True], ids=["Categorical obs=y", "OneHotCategorical obs=one_hot(y)"])
def test_a_program_observing_the_label_estimates_the_joint_and_splits_the_reconstruction(one_hot):
    x, y = synthetic()
    program = label_programs()["LabelVAE"](data_dim=6, classes=4, one_hot=one_hot)
    parts = elbo_decomposition(program.model, program.guide, x, y, num_samples=3)
    assert parts["quantity"] == "log p(x, y)"
    assert parts["observed_data"] == {"digit": "y", "x": "x"}
    # The label's term is its log-probability under the uniform p(y): log(1/4) for every image, whatever z is.
    torch.testing.assert_close(parts["reconstruction_by_site"]["digit"], torch.full((30,), -math.log(4), dtype=torch.float64))
    torch.testing.assert_close(parts["reconstruction"], sum(parts["reconstruction_by_site"].values()))
    result = evaluation_summary(program.model, program.guide, x, y, num_samples=4, decomposition=parts)
    assert result["quantity"] == "log p(x, y)"
    assert result["reconstruction_by_site"]["digit"]["mean"] == pytest.approx(-math.log(4))
    table = format_evaluation(result)
    assert "log p̂(x, y), importance sampled (K=4)" in table and "at site 'digit' (observes y)" in table
    assert "The evidence is log p(x, y): site 'digit' observes y, site 'x' observes x." in table


def test_a_conditional_program_estimates_log_p_x_given_y_and_the_plain_one_log_p_x():
    conditional = ConditionalGaussian()
    x, y = conditional.sample(20)
    result = evaluation_summary(conditional.model, conditional.exact_guide, x, y, num_samples=3, elbo_samples=2)
    assert result["quantity"] == "log p(x | y)" and result["observed_sites"] == {"x": "x"}
    assert "log p̂(x | y), importance sampled" in format_evaluation(result)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("pixels", dist.Normal(z.sum(-1, keepdim=True).expand(*z.shape[:-1], 5), 1.0).to_event(1),
                        obs=x * 2 - 1)  # a transform of x: still the data

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    plain = evaluation_summary(model, guide, x, num_samples=3, elbo_samples=2)
    assert plain["quantity"] == "log p(x)" and plain["observed_sites"] == {"pixels": "x"}
    assert set(plain["reconstruction_by_site"]) == {"pixels"}


# --- 4. Through the command line: train, evaluate, compare ---------------------------------------------


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, small_data_root) -> Path:
    """Three tiny evaluated runs: the plain VAE, a program observing the label, the built-in conditional program."""
    root = tmp_path_factory.mktemp("quantity")
    source = root / "label_models.py"
    source.write_text(LABEL_PROGRAMS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPL_VAE_DATA", str(small_data_root))
        assert main("train", "--run-dir", root / "plain", *TRAIN, "--latent-dim", "2", "--hidden-sizes", "8") == 0
        assert main("train", "--run-dir", root / "label", *TRAIN, "--program", f"{source}:LabelVAE", "--labels") == 0
        assert main("train", "--run-dir", root / "conditional", *TRAIN, "--program", "conditional", "--labels",
                    "--program-kwargs", '{"latent_dim": 2, "hidden_sizes": [8]}') == 0
        for name in ("plain", "label", "conditional"):
            assert main("evaluate", root / name, *EVALUATE) == 0
    return root


@pytest.mark.parametrize("name, quantity", [("plain", "log p(x)"), ("label", "log p(x, y)"),
                                            ("conditional", "log p(x | y)")])
def test_test_json_and_evaluation_json_name_the_quantity(runs_dir, name, quantity):
    for result_file in (runs.TEST_FILE, runs.EVALUATION_FILE):
        result = runs.read_json(runs_dir / name / result_file)
        assert result["quantity"] == quantity, result_file
        by_site = result["reconstruction_by_site"]
        assert sum(site["mean"] for site in by_site.values()) == pytest.approx(result["reconstruction"]["mean"])
        if name == "label":  # log p(y) = log(1/10) for every image, in the reconstruction term
            assert by_site["digit"]["mean"] == pytest.approx(-math.log(10)) and by_site["digit"]["stderr"] == 0
            assert result["observed_sites"] == {"digit": "y", "x": "x"}


def test_compare_pairs_only_runs_whose_evidence_is_of_the_same_quantity(runs_dir, tmp_path, capsys):
    plain, label, conditional = (runs_dir / name for name in ("plain", "label", "conditional"))
    capsys.readouterr()
    assert main("compare", plain, label, conditional, plain, "--out", tmp_path / "cmp") == 0
    table = capsys.readouterr().out
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["quantity"] for row in rows] == ["log p(x)", "log p(x, y)", "log p(x | y)", "log p(x)"]
    assert rows[1]["log_px_minus_first"] == rows[2]["log_px_minus_first"] == ""
    assert float(rows[3]["log_px_minus_first"]) == 0  # the same quantity on the same images is paired
    assert "| log p(x, y) |" in table and "| log p(x \\| y) |" in table  # a bar escaped in a Markdown cell
    assert ("Not paired with the first run: label: its evidence is log p(x, y), the first run's log p(x): a "
            "difference of different quantities; conditional: its evidence is log p(x | y)") in table


def test_result_files_older_than_the_quantity_are_read_by_the_stated_rule(runs_dir, tmp_path, capsys):
    copies = {}
    for name in ("plain", "label", "conditional"):
        copies[name] = tmp_path / name
        shutil.copytree(runs_dir / name, copies[name])
        for result_file in (runs.TEST_FILE, runs.EVALUATION_FILE):
            result = runs.read_json(copies[name] / result_file)
            del result["quantity"]
            runs.write_json(copies[name] / result_file, result)
    config = {name: runs.read_json(path / runs.CONFIG_FILE) for name, path in copies.items()}
    read = {name: result_quantity(runs.read_json(path / runs.EVALUATION_FILE), config[name], path)
            for name, path in copies.items()}
    # Without --labels the programs saw x alone; a built-in program never observes labels; a user's may.
    assert read == {"plain": "log p(x)", "conditional": "log p(x | y)", "label": None}
    capsys.readouterr()
    assert main("compare", copies["plain"], copies["label"], runs_dir / "plain", "--out", tmp_path / "cmp") == 0
    table = capsys.readouterr().out
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows[1]["log_px_minus_first"] == "" and rows[2]["log_px_minus_first"] != ""
    assert "| ? |" in table and "label: its evidence is of an unknown quantity" in table


# --- 5. evaluation.json and its npz, committed as one --------------------------------------------------


@pytest.fixture
def plain_copy(runs_dir, tmp_path, small_data_root, monkeypatch) -> Path:
    monkeypatch.setenv("PPL_VAE_DATA", str(small_data_root))
    copy = tmp_path / "plain"
    shutil.copytree(runs_dir / "plain", copy)
    return copy


def test_an_npz_from_another_evaluation_is_refused_by_compare_and_diagnose(plain_copy, tmp_path, capsys):
    first = (plain_copy / runs.PER_DATAPOINT_FILE).read_bytes()
    assert main("evaluate", plain_copy, *EVALUATE, "--seed", "1") == 0
    assert main("diagnose", plain_copy) == 0  # the pair of one evaluation is read
    (plain_copy / runs.PER_DATAPOINT_FILE).write_bytes(first)  # the npz of the seed-0 evaluation beside seed 1's summary
    capsys.readouterr()
    assert main("compare", plain_copy, "--out", tmp_path / "cmp") == 2
    assert MISMATCH in one_line_error(capsys)
    assert main("diagnose", plain_copy) == 2
    err = one_line_error(capsys)
    assert MISMATCH in err and f"run `ppl-vae evaluate {plain_copy}` again" in err


def test_a_kill_between_the_two_writes_leaves_a_pair_that_is_refused(plain_copy, tmp_path, capsys, monkeypatch):
    """The npz is written, evaluation.json is not (a kill, a full disk): the old summary is not read with the new npz."""
    write_json = runs.write_json

    def failing(path, payload):
        if Path(path).name == runs.EVALUATION_FILE:
            raise RunWriteError(f"cannot write {path}: No space left on device (simulated)")
        write_json(path, payload)

    monkeypatch.setattr(runs, "write_json", failing)
    assert main("evaluate", plain_copy, *EVALUATE, "--seed", "2") == 2
    monkeypatch.setattr(runs, "write_json", write_json)
    capsys.readouterr()
    assert main("compare", plain_copy, "--out", tmp_path / "cmp") == 2
    assert MISMATCH in one_line_error(capsys)


def test_an_npz_changed_after_it_was_written_is_refused(plain_copy, capsys):
    path = plain_copy / runs.PER_DATAPOINT_FILE
    with numpy.load(path) as stored:
        arrays = {key: stored[key] for key in stored.files}
    arrays["log_evidence"] = arrays["log_evidence"] + 1.0  # same id, other numbers
    buffer = io.BytesIO()
    numpy.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    capsys.readouterr()
    assert main("diagnose", plain_copy) == 2
    assert "was changed after `ppl-vae evaluate` wrote it" in one_line_error(capsys)


def legacy(run_dir: Path) -> None:
    """Make an evaluation look written before the id: no record in evaluation.json, no id in the npz."""
    result = runs.read_json(run_dir / runs.EVALUATION_FILE)
    del result[RECORD_KEY]
    runs.write_json(run_dir / runs.EVALUATION_FILE, result)
    with numpy.load(run_dir / runs.PER_DATAPOINT_FILE) as stored:
        arrays = {key: stored[key] for key in stored.files if key != ID_KEY}
    numpy.savez(run_dir / runs.PER_DATAPOINT_FILE, **arrays)


def test_pairs_written_before_the_id_are_accepted_only_when_their_numbers_agree(plain_copy, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(plain_copy, other)
    assert main("evaluate", other, *EVALUATE, "--seed", "3") == 0
    legacy(plain_copy)
    legacy(other)
    values = read_per_datapoint(plain_copy)["log_evidence"]  # one evaluation's pair: its numbers reproduce the summary
    assert values.shape == (20,)
    assert main("compare", plain_copy, other, "--out", tmp_path / "cmp") == 0
    shutil.copyfile(other / runs.PER_DATAPOINT_FILE, plain_copy / runs.PER_DATAPOINT_FILE)
    capsys.readouterr()
    assert main("compare", plain_copy, "--out", tmp_path / "cmp") == 2
    err = one_line_error(capsys)
    assert MISMATCH in err and "the npz's per-image log p̂ have mean" in err
    # A new npz beside an old summary is from another evaluation too.
    assert main("evaluate", other, *EVALUATE, "--seed", "4") == 0
    shutil.copyfile(other / runs.PER_DATAPOINT_FILE, plain_copy / runs.PER_DATAPOINT_FILE)
    assert main("diagnose", plain_copy) == 2
    assert MISMATCH in one_line_error(capsys)
    assert json.loads((other / runs.EVALUATION_FILE).read_text())[RECORD_KEY][ID_KEY]

"""Any per-datapoint conditioning data in training (issue 26 item 4): ``--cond NAME`` arrays of a ``.npz`` and
tensors from Python, passed after x to both programs in training and every evaluation, checked up front (one line
naming the array), and the evidence named log p(x | c) so that compare never pairs it with log p(x)."""

import json
import shutil

import numpy as np
import pytest
import torch

from ppl_vae.data import load_npz, tensor_data
from ppl_vae.errors import InvalidDataError, PplVaeError
from ppl_vae.evaluation_files import result_quantity
from ppl_vae.inspection import name_data_arguments
from ppl_vae.programs import ProgramSpec
from ppl_vae.train import TrainConfig, fit, train

PROGRAM = '''
"""A VAE of 8x8 images given a float covariate c [N, 3], as a user would write it."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn


class CovariateVAE(nn.Module):
    def __init__(self, latent=2, hidden=16, cond_dim=3, data_dim=64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(data_dim + cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent + cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, data_dim))
        self.latent = latent

    def _check(self, x, c):
        # c must be the float covariate of these very images: row i of c belongs to x[i]
        assert c.dtype == torch.float32 and c.shape == (x.shape[0], 3), (c.dtype, c.shape)

    def decode_mean(self, z, c):
        return torch.sigmoid(self.decoder(torch.cat([z, c.expand(*z.shape[:-1], c.shape[-1])], -1)))

    def encode_mean(self, x, c):
        return self.encoder(torch.cat([x.reshape(x.shape[0], -1), c], -1)).chunk(2, -1)[0]

    def model(self, x, c):
        self._check(x, c)
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            logits = self.decoder(torch.cat([z, c.expand(*z.shape[:-1], c.shape[-1])], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x, c):
        self._check(x, c)
        loc, raw = self.encoder(torch.cat([x.reshape(x.shape[0], -1), c], -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


class LabelledCovariateVAE(CovariateVAE):
    """model(x, y, c): the labels (--labels), then the covariate (--cond c), in that order."""

    def model(self, x, y, c):
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],), (y.dtype, y.shape)
        super().model(x, c + y[:, None])

    def guide(self, x, y, c):
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],), (y.dtype, y.shape)
        super().guide(x, c + y[:, None])


class PlainVAE(CovariateVAE):
    """The same networks given x alone (c = 0): its evidence is log p(x)."""

    def model(self, x):
        super().model(x, x.new_zeros(x.shape[0], 3))

    def guide(self, x):
        super().guide(x, x.new_zeros(x.shape[0], 3))
'''

SIZES = {"train": 60, "val": 20, "test": 20}
SMALL = ["--epochs", "1", "--batch-size", "20", "--test-samples", "5", "--device", "cpu", "--no-progress"]


def covariate_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split: uint8 8x8 images whose pixels are on with probability sigmoid(c_0), and c [N, 3] float32."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in SIZES.items():
        c = rng.normal(size=(n, 3)).astype(np.float32)
        x = (rng.random((n, 8, 8)) < 1 / (1 + np.exp(-c[:, :1, None]))).astype(np.uint8) * 255
        splits[split] = (x, c)
    return splits


def write_npz(path, drop=(), **replace) -> str:
    arrays = {f"{name}_{split}": array for split, pair in covariate_splits().items() for name, array in zip("xc", pair)}
    arrays.update({f"y_{split}": np.arange(n) % 2 for split, n in SIZES.items()})  # labels, for --labels --cond c
    arrays.update(replace)
    np.savez(path, **{key: value for key, value in arrays.items() if key not in drop})
    return str(path)


def tensors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same data as tensors: binary x [N, 1, 8, 8] float32, c [N, 3]."""
    return {split: (torch.from_numpy(x / 255.0).float()[:, None], torch.from_numpy(c))
            for split, (x, c) in covariate_splits().items()}


@pytest.fixture
def program_file(tmp_path):
    path = tmp_path / "covariate_models.py"
    path.write_text(PROGRAM)
    return path


def program_classes():
    namespace = {}
    exec(compile(PROGRAM, "covariate_models.py", "exec"), namespace)
    return namespace["CovariateVAE"], namespace["PlainVAE"]


def test_the_covariate_program_trains_from_a_npz_and_every_command_reapplies_c(tmp_path, program_file, cli_main):
    dataset, run_dir, plain_dir = write_npz(tmp_path / "cov.npz"), tmp_path / "cov", tmp_path / "plain"
    trained = cli_main("train", "--program", f"{program_file}:CovariateVAE", "--dataset", dataset, "--cond", "c",
                       "--run-dir", run_dir, *SMALL)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run_dir / "config.json").read_text())["train"]["cond"] == ["c"]
    assert json.loads((run_dir / "data.json").read_text())["cond"] == {"c": {"dtype": "float32", "row_shape": [3]}}
    test = json.loads((run_dir / "test.json").read_text())
    assert test["quantity"] == "log p(x | c)" and "log p̂(x | c)" in trained.stdout
    resumed = cli_main("train", "--resume", "--run-dir", run_dir, "--epochs", "2", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    changed = cli_main("train", "--resume", "--run-dir", run_dir, "--epochs", "2", "--cond", "d", "--no-progress")
    assert changed.returncode == 2 and "--cond d (the run's: c)" in changed.stderr
    evaluated = cli_main("evaluate", run_dir, "--num-samples", "30", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["quantity"] == "log p(x | c)" and result["epoch"] == 2 and result["num_datapoints"] == 20
    assert result["observed_sites"] == {"x": "x"} and "c is only an input" in evaluated.stdout
    assert cli_main("diagnose", run_dir).returncode == 0
    plotted = cli_main("plot", run_dir)
    assert plotted.returncode == 0, plotted.stderr
    assert (run_dir / "plots" / "reconstructions.png").is_file()  # encode_mean(x, c), decode_mean(z, c)
    assert (run_dir / "plots" / "samples.png").is_file() and "samples: skipped" not in plotted.stdout  # given c
    # The same images given x alone: log p(x), another quantity, which compare does not pair with log p(x | c).
    assert cli_main("train", "--program", f"{program_file}:PlainVAE", "--dataset", dataset, "--run-dir", plain_dir,
                    *SMALL).returncode == 0
    assert cli_main("evaluate", plain_dir, "--num-samples", "30", "--no-progress").returncode == 0
    compared = cli_main("compare", plain_dir, run_dir, "--out", tmp_path / "comparison")
    assert compared.returncode == 0, compared.stderr
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert "its evidence is log p(x | c), the first run's log p(x)" in table


def test_labels_and_cond_arrays_are_passed_in_that_order(tmp_path, program_file, cli_main):
    run_dir = tmp_path / "both"
    trained = cli_main("train", "--program", f"{program_file}:LabelledCovariateVAE", "--dataset",
                       write_npz(tmp_path / "cov.npz"), "--labels", "--cond", "c", "--run-dir", run_dir, *SMALL)
    assert trained.returncode == 0, trained.stderr  # the labels' up-front check runs the program on (x, y, c) too
    assert json.loads((run_dir / "test.json").read_text())["quantity"] == "log p(x | y, c)"


def test_the_covariate_program_trains_from_tensors(tmp_path, program_file, cli_main):
    config = TrainConfig(epochs=1, batch_size=20, test_samples=5, device="cpu", cond=("c",), binarize="none")
    run_dir = tmp_path / "tensors"
    result = train(run_dir, config, program=ProgramSpec.parse(f"{program_file}:CovariateVAE"), data=tensors(),
                   progress=False)
    assert result["quantity"] == "log p(x | c)" and (run_dir / "tensors.npz").is_file()
    assert "bits_per_dim" not in result  # tensors are no 8-bit grey levels: bits/dim would be a wrong number
    recorded = json.loads((run_dir / "config.json").read_text())["train"]
    assert recorded["dataset"] == str((run_dir / "tensors.npz").resolve()) and recorded["cond"] == ["c"]
    # every command reads the run's tensors again, with c
    assert cli_main("train", "--resume", "--run-dir", run_dir, "--epochs", "2", "--no-progress").returncode == 0
    evaluated = cli_main("evaluate", run_dir, "--num-samples", "10", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["quantity"] == "log p(x | c)" and "bits_per_dim" not in evaluation
    # The run directory moved (as handed to someone): it keeps its tensors, and every command reads them there,
    # checked against the recorded SHA-256. The old code read the path config.json recorded, which is gone.
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    evaluated = cli_main("evaluate", moved, "--num-samples", "10", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((moved / "evaluation.json").read_text())["quantity"] == "log p(x | c)"
    assert cli_main("train", "--resume", "--run-dir", moved, "--epochs", "3", "--no-progress").returncode == 0
    assert json.loads((moved / "config.json").read_text())["train"]["dataset"] == str((moved / "tensors.npz").resolve())
    assert cli_main("plot", moved).returncode == 0
    # Its own copy must still be the data it was trained on: one value changed is refused.
    arrays = dict(np.load(moved / "tensors.npz"))
    arrays["x_test"][0].flat[0] = 1.0 - arrays["x_test"][0].flat[0]
    np.savez(moved / "tensors.npz", **arrays)
    changed = cli_main("evaluate", moved, "--num-samples", "10", "--no-progress")
    assert changed.returncode == 2 and "has changed since the run was trained" in changed.stderr
    # in memory, with the program object
    covariate, _ = program_classes()
    history = fit(covariate(), tensors(), config, progress=False)
    assert len(history) == 1 and np.isfinite(history[0]["val_elbo"])


def test_a_program_given_too_few_data_arguments_names_the_python_way_too():
    """The fix: a program model(x, c) trained on x alone was told to use --labels, a flag that cannot pass c."""
    covariate, _ = program_classes()
    config = TrainConfig(epochs=1, batch_size=20, device="cpu", binarize="none")
    x_only = {split: x for split, (x, _) in tensors().items()}
    with pytest.raises(PplVaeError) as refused:
        fit(covariate(), tensor_data(**x_only), config, progress=False)
    message = str(refused.value)
    assert "takes 2 data arguments, but the training batches give 1 (x)" in message
    assert "--cond NAME" in message and "tensor_data" in message and "\n" not in message


@pytest.mark.parametrize("drop, replace, names", [
    (("c_val",), {}, "c_val of .* is missing"),
    ((), {"c_test": np.zeros((19, 3), np.float32)}, r"c_test of .* has shape \[19, 3\]: expected one row per image, \[20"),
    ((), {"c_train": np.array(["a"] * 60)}, "c_train of .* is <U1, not numeric"),
    ((), {"c_val": np.full((20, 3), np.nan, np.float32)}, "c_val of .* holds NaN or infinite values"),
    ((), {"c_val": np.zeros((20, 4), np.float32)}, r"c_val of .* has rows of shape \[4\], the training split's \[3\]"),
    (("x_val",), {}, "c_val is given but x_val is not"),
])
def test_bad_conditioning_arrays_are_one_line_naming_the_array(tmp_path, program_file, cli_main, drop, replace,
                                                               names):
    dataset = write_npz(tmp_path / "bad.npz", drop, **replace)
    refused = cli_main("train", "--program", f"{program_file}:CovariateVAE", "--dataset", dataset, "--cond", "c",
                       "--run-dir", tmp_path / "run", *SMALL)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert __import__("re").search(names, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    (["--cond", "c"], "is a named dataset: give --dataset PATH.npz"),
    (["--cond", "y"], "y names the class labels (condition on them with --labels)"),
    (["--cond", "c", "c"], "--cond names c more than once"),
    (["--cond", "c", "--labelled", "10"], "semi-supervised training takes no --cond arrays"),
])
def test_conditioning_options_that_cannot_work_are_one_line(tmp_path, program_file, cli_main, options, message):
    refused = cli_main("train", "--program", f"{program_file}:CovariateVAE", *options, "--run-dir", tmp_path / "run",
                       *SMALL)
    assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_bad_conditioning_tensors_are_one_line_naming_the_tensor():
    good = tensors()

    def with_split(split, value):
        return {**good, split: value}

    cases = [
        (with_split("val", good["val"][:1]), ("c",), r"the val split gives 1 tensor\(s\), but the programs take \(x, c\)"),
        (with_split("test", (good["test"][0], good["test"][1][:5])), ("c",), r"the tensor c_test has shape \[5, 3\]"),
        (with_split("train", (good["train"][0], torch.full((60, 3), float("nan")))), ("c",),
         "the tensor c_train holds NaN"),
        (with_split("train", (good["train"][0], torch.zeros(60, 3, dtype=torch.complex64))), ("c",),
         "the tensor c_train is torch.complex64, not real"),
        (with_split("val", (good["val"][0].long(), good["val"][1])), ("c",), "the val x is torch.int64"),
        (good, (), r"the train split gives x and 1 more tensor\(s\), but cond names 0 \(\[\]\): name every tensor"),
    ]
    for splits, cond, message in cases:
        with pytest.raises(InvalidDataError, match=message) as refused:
            tensor_data(**splits, cond=cond)
        assert "\n" not in str(refused.value)
    data = tensor_data(**good, cond=("c",), train_examples=30, eval_examples=10)
    assert data.conditioning("val", ("c",))[0].shape == (10, 3) and data.train.shape == (30, 1, 8, 8)
    torch.testing.assert_close(data.cond["c"]["test"], good["test"][1][:10])


def test_a_npz_without_x_val_holds_out_c_with_its_images(tmp_path):
    dataset = write_npz(tmp_path / "noval.npz", drop=("x_val", "c_val"))
    data = load_npz(dataset, cond=("c",))
    plain = load_npz(dataset)
    x, c = covariate_splits()["train"]
    # each held-out image keeps its own covariate: find every validation image's row of x_train
    rows = [int(np.flatnonzero((x.reshape(60, -1) / 255.0 == image.reshape(-1).numpy()).all(1))[0])
            for image in plain.val]
    torch.testing.assert_close(data.cond["c"]["val"], torch.from_numpy(c[rows]))
    assert data.cond["c"]["train"].shape[0] == data.train.shape[0] == 54


def test_batches_give_x_then_the_labels_then_the_cond_arrays_row_by_row():
    data = tensor_data(**tensors(), cond=("c",))
    data.train_labels = torch.arange(60)
    data.cond["c"]["train"] = torch.arange(60.0)[:, None].expand(60, 3).contiguous()
    data.train = torch.arange(60.0)[:, None, None, None].expand(60, 1, 8, 8) / 60
    for x, y, c in data.train_batches(20, labels=True, cond=("c",)):
        rows = (x[:, 0, 0, 0] * 60).round().long()
        assert torch.equal(y, rows) and torch.equal(c[:, 0].long(), rows)


def test_the_evidence_is_named_after_the_arguments_and_old_cond_results_are_not_read_as_log_p_x(tmp_path):
    result = {"quantity": "log p(x | y)", "observed_sites": {"pixels": "x"}}
    assert name_data_arguments(result, ("c",))["quantity"] == "log p(x | c)"
    assert name_data_arguments(result, ("y",)) == result  # --labels runs: unchanged
    both = name_data_arguments({"quantity": "log p(x, y1 | y2)", "observed_sites": {"px": "x", "py": "y1"}},
                               ("y", "c"))
    assert both == {"quantity": "log p(x, y | c)", "observed_sites": {"px": "x", "py": "y"}}
    # a result file without its quantity, of a run given c: unknown, never log p(x) (the old rule's answer)
    assert result_quantity({}, {"train": {"cond": ["c"]}}, tmp_path) is None
    assert result_quantity({}, {"train": {}}, tmp_path) == "log p(x)"

"""Training any program with the package's trainer: a user's file, the built-in two-layer and conditional VAEs."""

import json
import shutil

import pytest
import torch

from ppl_vae import runs
from ppl_vae.errors import ModelStructureError, PplVaeError
from ppl_vae.programs import ProgramSpec
from ppl_vae.train import TrainConfig, load_run, train

SMALL = ["--epochs", "1", "--train-examples", "300", "--eval-examples", "60", "--test-samples", "5",
         "--batch-size", "50", "--device", "cpu", "--no-progress"]

USER_PROGRAM = '''
"""A ladder of two latent sites with names of its own, as a user would write it."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn


def gaussian(net, h):
    loc, raw = net(h).chunk(2, -1)
    return dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1)


class LadderVAE(nn.Module):
    def __init__(self, latent=(8, 4), hidden=32):
        super().__init__()
        top, bottom = latent
        self.q_bottom = nn.Sequential(nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, 2 * top))
        self.q_top = nn.Sequential(nn.Linear(top, hidden), nn.Tanh(), nn.Linear(hidden, 2 * bottom))
        self.p_bottom = nn.Sequential(nn.Linear(bottom, hidden), nn.Tanh(), nn.Linear(hidden, 2 * top))
        self.p_pixels = nn.Sequential(nn.Linear(top, hidden), nn.Tanh(), nn.Linear(hidden, 784))
        self.bottom = bottom

    def model(self, x):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("images", x.shape[0]):
            deep = pyro.sample("deep", dist.Normal(x.new_zeros(self.bottom), 1.0).to_event(1))
            shallow = pyro.sample("shallow", gaussian(self.p_bottom, deep))
            pyro.sample("pixels", dist.Bernoulli(logits=self.p_pixels(shallow)).to_event(1), obs=x)

    def guide(self, x):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("images", x.shape[0]):
            shallow = pyro.sample("shallow", gaussian(self.q_bottom, x))
            pyro.sample("deep", gaussian(self.q_top, shallow))
'''


def test_a_users_program_trains_resumes_and_is_evaluated_after_its_file_moved(tmp_path, small_data_root, cli_main):
    # The commands run in this process: each builds the program by running its file's bytes afresh (programs.py),
    # so the one after the move has no file to read, as in a shell.
    source = tmp_path / "work" / "my_models.py"
    source.parent.mkdir()
    source.write_text(USER_PROGRAM)
    run_dir, vae_dir = tmp_path / "ladder", tmp_path / "vae"
    trained = cli_main("train", "--program", f"{source}:LadderVAE", "--program-kwargs", '{"latent": [6, 3]}',
                      "--run-dir", run_dir, *SMALL, data_root=small_data_root)
    assert trained.returncode == 0, trained.stderr
    assert "LadderVAE(latent=[6, 3])" in trained.stdout and "KL at site 'shallow' is Monte Carlo" in trained.stdout
    spec = json.loads((run_dir / "program.json").read_text())
    assert spec["name"] == "LadderVAE" and spec["kwargs"] == {"latent": [6, 3]}
    assert (run_dir / spec["source"]).read_text() == USER_PROGRAM
    resumed = cli_main("train", "--resume", "--run-dir", run_dir, "--epochs", "2", "--no-progress", data_root=small_data_root)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["epoch"] for m in runs.read_metrics(run_dir)] == [1, 2]
    # The user's file moves away: every command rebuilds the program from the run's copy, and says so.
    shutil.move(source, tmp_path / "elsewhere.py")
    evaluated = cli_main("evaluate", run_dir, "--num-samples", "30", "--examples", "40", "--no-progress",
                        data_root=small_data_root)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "is gone; using the copy recorded" in evaluated.stderr
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert set(result["kl"]["sites"]) == {"deep", "shallow"} and result["epoch"] == 2
    sites = result["diagnostics"]["sites"]
    assert isinstance(sites["shallow"]["active_units"], int)  # q(shallow | x) depends on x alone
    assert "guide depends on latent site(s) ['shallow']" in sites["deep"]["active_units"]["unavailable"]
    assert "site 'deep':" in evaluated.stdout
    diagnosed = cli_main("diagnose", run_dir)
    assert diagnosed.returncode == 0, diagnosed.stderr
    plotted = cli_main("plot", run_dir, data_root=small_data_root)
    assert plotted.returncode == 0, plotted.stderr
    # no sample_prior: samples from its model run on its own; no encode_mean/decode_mean nor label site: a note
    assert str(run_dir / "plots" / "samples.png") in plotted.stdout
    assert "reconstructions: skipped (the program has no encode_mean(x) and decode_mean(z) methods" in plotted.stdout
    assert (run_dir / "plots" / "training_curves.png").is_file()
    vae = cli_main("train", "--run-dir", vae_dir, *SMALL, "--latent-dim", "4", "--hidden-sizes", "32", data_root=small_data_root)
    assert vae.returncode == 0, vae.stderr
    assert cli_main("evaluate", vae_dir, "--num-samples", "30", "--examples", "40", "--no-progress",
                   data_root=small_data_root).returncode == 0
    compared = cli_main("compare", run_dir, vae_dir, "--out", tmp_path / "comparison")
    assert compared.returncode == 0, compared.stderr
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert "LadderVAE" in table and "MLP" in table


def test_the_builtin_two_layer_and_conditional_programs_train(tmp_path, small_data_root, cli_main):
    two_layer = cli_main("train", "--program", "two-layer", "--program-kwargs",
                        '{"latent": [8, 4], "hidden": [[32], [16]]}', "--run-dir", tmp_path / "two", *SMALL,
                        data_root=small_data_root)
    assert two_layer.returncode == 0, two_layer.stderr
    assert "KL at site 'z1' is Monte Carlo" in two_layer.stdout
    # A program's run is a ppl_vae run like any other: --overwrite replaces it, its program record included.
    replaced = cli_main("train", "--run-dir", tmp_path / "two", "--overwrite", *SMALL, "--latent-dim", "2",
                       "--hidden-sizes", "16", data_root=small_data_root)
    assert replaced.returncode == 0, replaced.stderr
    assert not (tmp_path / "two" / "program.json").exists()
    conditional = cli_main("train", "--program", "conditional", "--labels", "--program-kwargs",
                          '{"latent_dim": 4, "hidden_sizes": [32]}', "--run-dir", tmp_path / "cvae", *SMALL,
                          "--engine", "jit", data_root=small_data_root)
    assert conditional.returncode == 0, conditional.stderr
    assert json.loads((tmp_path / "cvae" / "config.json").read_text())["train"]["labels"] is True
    plotted = cli_main("plot", tmp_path / "cvae", data_root=small_data_root)
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "cvae" / "plots" / "samples_by_class.png").is_file()
    missing_labels = cli_main("train", "--program", "conditional", "--run-dir", tmp_path / "nolabels", *SMALL,
                             data_root=small_data_root)
    assert missing_labels.returncode == 2 and "train with --labels" in missing_labels.stderr
    assert "Traceback" not in missing_labels.stderr


def test_the_kl_weight_scales_every_latent_site_of_any_program(tmp_path, small_data_root):
    """beta through the trainer: the training objective is reconstruction - beta KL, for a program with no beta of its own."""
    config = dict(epochs=1, train_examples=100, eval_examples=20, test_samples=2, batch_size=100,
                  data_dir=str(small_data_root), device="cpu")
    spec = ProgramSpec.parse("two-layer", {"latent": [4, 2], "hidden": [[16], [8]]})
    losses = {}
    for beta in (1.0, 0.25):
        train(tmp_path / f"b{beta}", TrainConfig(**config, beta=beta), program=spec, progress=False)
        losses[beta] = runs.read_metrics(tmp_path / f"b{beta}")[0]["train_elbo"]
    # One step from the same initial state and draws: the weighted objective is larger by (1 - beta) KL > 0.
    assert losses[0.25] > losses[1.0]


class NotAProgram(torch.nn.Module):
    def model(self, x):
        pass


def test_python_objects_train_and_must_be_passed_again(tmp_path, small_data_root):
    from ppl_vae.models import TwoLayerVAE

    config = TrainConfig(epochs=1, train_examples=100, eval_examples=20, test_samples=2, batch_size=50,
                         data_dir=str(small_data_root), device="cpu")
    program = TwoLayerVAE(latent=(4, 2), hidden=((16,), (8,)))
    result = train(tmp_path / "obj", config, program=program, progress=False)
    assert set(result["kl"]["sites"]) == {"z1", "z2"}
    with pytest.raises(PplVaeError, match="trained from a Python object"):
        load_run(tmp_path / "obj")
    loaded, info = load_run(tmp_path / "obj", program=TwoLayerVAE(latent=(4, 2), hidden=((16,), (8,))))
    torch.testing.assert_close(loaded.decoder[0].weight, program.decoder[0].weight)
    with pytest.raises(ModelStructureError, match="has no guide method"):
        train(tmp_path / "bad", config, program=NotAProgram(), progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("program, kwargs, message", [
    ("missing.py:Thing", None, "does not exist"),
    ("{file}:Nothing", None, "has no 'Nothing'"),
    ("{file}:LadderVAE", '{"latnt": 3}', "takes no keyword argument(s) latnt (--program-kwargs); it takes latent, hidden"),
    ("{file}:Broken", None, "the program failed on the first training batch"),
])
def test_program_errors_on_the_command_line_are_one_line(tmp_path, small_data_root, cli_main, program, kwargs, message):
    source = tmp_path / "my_models.py"
    source.write_text(USER_PROGRAM + '''

class Broken(LadderVAE):
    def model(self, x):
        with pyro.plate("images", x.shape[0]):
            pyro.sample("pixels", dist.Bernoulli(logits=torch.zeros(3)).to_event(1), obs=x)
''')
    args = ["train", "--program", program.format(file=source), "--run-dir", tmp_path / "run", *SMALL]
    if kwargs:
        args[3:3] = ["--program-kwargs", kwargs]
    result = cli_main(*args, data_root=small_data_root)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


class LaplaceCode(torch.nn.Module):
    """A program whose guide draws from a Laplace: noise the fixed-draw check does not reach."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(784, 4), torch.nn.Linear(2, 784)

    def model(self, x):
        import pyro
        import pyro.distributions as dist

        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Laplace(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        import pyro
        import pyro.distributions as dist

        x = x.reshape(x.shape[0], -1)
        loc, raw = self.enc(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Laplace(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))


def test_the_compiled_engine_is_checked_against_trace_elbo_and_falls_back_with_a_note(tmp_path, small_data_root):
    from ppl_vae.models import TwoLayerVAE
    from ppl_vae.objectives import compiled_loss_problem
    from ppl_vae.programs import Weighted

    x = torch.bernoulli(torch.full((8, 784), 0.3))
    assert compiled_loss_problem(Weighted(TwoLayerVAE(latent=(4, 2), hidden=((16,), (8,)))), (x,)) is None
    problem = compiled_loss_problem(Weighted(LaplaceCode()), (x,))
    assert problem is not None and "differs from Trace_ELBO" in problem
    config = TrainConfig(epochs=1, train_examples=100, eval_examples=20, test_samples=2, batch_size=50,
                         data_dir=str(small_data_root), device="cpu", engine="jit")
    with pytest.warns(UserWarning, match="--engine jit: the compiled loss .* training with --engine svi instead"):
        train(tmp_path / "laplace", config, program=LaplaceCode(), progress=False)
    assert json.loads((tmp_path / "laplace" / "config.json").read_text())["train"]["engine"] == "svi"


# A program with labels on two processes (DDP, its labels sharded with the images), trained, resumed and evaluated:
# tests/test_distributed.py, test_a_distributed_run_with_labels_resumes_to_the_numbers_of_an_uninterrupted_one_...

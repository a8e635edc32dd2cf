"""``ppl-vae plot`` for programs with a class label (issue 26, item 5): samples per class and Kingma et al.'s (2014)
style/class grid -- each row one test image's style z = E_q[z | x, y], decoded with every class -- for the built-in M2
and any program with the model(x, y=None) / guide(x, y=None) convention; a one-line note for a program without one."""

import argparse

import pyro
import pyro.distributions as dist
import pytest
import torch
from discrete_models import SmallVAE
from matplotlib.image import imread
from torch import nn
from torch.nn import functional as F

from ppl_vae import cli, plots
from ppl_vae.commands.plot import STYLE_ROWS, plot_style_grid
from ppl_vae.models.m2 import M2
from ppl_vae.programs import ProgramSpec
from ppl_vae.style_grid import style_grid
from ppl_vae.train import TrainConfig, train


class DigitM2(nn.Module):
    """A user's semi-supervised program: label site ``digit`` (3 classes), style site ``s``, no figure methods."""

    def __init__(self, classes: int = 3, latent: int = 2):
        super().__init__()
        self.classes, self.latent = classes, latent
        self.classify = nn.Linear(784, classes)
        self.encode = nn.Linear(784 + classes, 2 * latent)
        self.decode = nn.Linear(latent + classes, 784)

    def model(self, x, digit=None):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("digit", dist.Categorical(logits=x.new_zeros(self.classes)), obs=digit)
            s = pyro.sample("s", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            logits = self.decode(torch.cat([s, F.one_hot(y, self.classes).to(x.dtype)], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x, digit=None):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            if digit is None:
                digit = pyro.sample("digit", dist.Categorical(logits=self.classify(x)))
            loc, raw = self.encode(torch.cat([x, F.one_hot(digit, self.classes).to(x.dtype)], -1)).chunk(2, -1)
            pyro.sample("s", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


def decoder_inputs(module: nn.Module) -> list[torch.Tensor]:
    """Every input the module gets from now on (a forward hook)."""
    seen = []
    module.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0].detach().clone()))
    return seen


def test_each_row_decodes_its_images_style_with_every_class_and_the_same_z():
    torch.manual_seed(0)
    program = M2(hidden_sizes=(8,), latent_dim=3, num_classes=4).eval()
    x, labels = torch.bernoulli(torch.full((5, 784), 0.3)), torch.tensor([0, 3, 1, 2, 3])
    seen = decoder_inputs(program.decoder)
    grid = style_grid(program, x, labels)
    assert grid.images.shape == (5, 1 + 4, 784) and grid.style_site == "z"
    assert torch.equal(grid.images[:, 0], x)  # column 0: the test image itself
    loc, _ = program.encoder(torch.cat([x, F.one_hot(labels, 4).float()], -1))
    assert torch.allclose(grid.styles, loc)  # z = E_q[z | x, y] with the image's own label
    z, onehot = seen[-1][:, :3].reshape(5, 4, 3), seen[-1][:, 3:].reshape(5, 4, 4)
    for row in range(5):
        assert torch.equal(z[row], loc[row].expand(4, 3))  # one z for the whole row
        assert torch.equal(onehot[row], torch.eye(4))  # the columns: classes 0..C-1
    expected = torch.sigmoid(program.decoder(seen[-1])).reshape(5, 4, 784)
    assert torch.allclose(grid.images[:, 1:], expected)  # decoded means E[x | z, y]


def test_prior_rows_decode_one_draw_of_the_prior_per_row_with_every_class():
    program = M2(hidden_sizes=(8,), latent_dim=3, num_classes=4).eval()
    x, labels = torch.bernoulli(torch.full((5, 784), 0.3)), torch.tensor([0, 3, 1, 2, 3])
    seen = decoder_inputs(program.decoder)
    pyro.set_rng_seed(3)
    grid = style_grid(program, x, labels, prior=True)
    decoded = seen[-1]  # the grid's decoder call
    pyro.set_rng_seed(3)
    drawn = pyro.poutine.trace(program.model).get_trace(x, labels).nodes["z"]["value"]  # the model's own z ~ p(z)
    assert grid.images.shape == (5, 4, 784) and torch.equal(grid.styles, drawn)  # no source column
    z = decoded[:, :3].reshape(5, 4, 3)
    assert torch.equal(z, drawn[:, None].expand(5, 4, 3))  # one z for the whole row
    assert torch.allclose(grid.images, torch.sigmoid(program.decoder(decoded)).reshape(5, 4, 784))


def test_a_users_program_with_another_label_site_gets_the_grid_and_without_labels_the_classifiers_class():
    torch.manual_seed(1)
    program = DigitM2()
    x = torch.bernoulli(torch.full((4, 784), 0.4))
    seen = decoder_inputs(program.decode)
    grid = style_grid(program, x, None, label_site="digit")
    predicted = program.classify(x).argmax(-1)
    assert torch.equal(grid.labels, predicted) and grid.style_site == "s"
    assert grid.images.shape == (4, 1 + 3, 784)
    styles = seen[-1][:, :2].reshape(4, 3, 2)
    assert torch.equal(styles, grid.styles[:, None].expand(4, 3, 2))


def test_a_program_without_a_label_is_one_skipped_line(tmp_path, capsys):
    data = argparse.Namespace(test=torch.bernoulli(torch.full((4, 784), 0.3)), labels=lambda split: None,
                              record={"image_shape": [1, 28, 28]})
    assert plot_style_grid(SmallVAE().eval(), data, tmp_path) == []
    out = capsys.readouterr().out.strip()
    assert out == ("style/class grid: skipped (the guide draws no discrete label site 'y' on x alone and the program "
                   "has no num_classes attribute: the style/class grid needs the classes)")
    assert not (tmp_path / "style_grid.png").exists()
    data.labels = lambda split: torch.arange(4)
    assert plot_style_grid(NumberedVAE().eval(), data, tmp_path) == []  # classes, but a guide(x) without labels
    assert capsys.readouterr().out.startswith("style/class grid: skipped (the program run as guide(x, y) and model(x, "
                                              "y) failed: TypeError: ")


class NumberedVAE(SmallVAE):
    num_classes = 10


def test_plot_of_a_tiny_m2_run_writes_the_style_grid_and_samples_per_class(tmp_path, data_root, capsys):
    config = TrainConfig(epochs=1, batch_size=50, data_dir=str(data_root), train_examples=100, eval_examples=20,
                         test_samples=2, device="cpu", labelled=10, engine="svi")
    run = tmp_path / "m2"
    train(run, config, program=ProgramSpec.parse("m2", '{"hidden_sizes": [8], "latent_dim": 2}'), progress=False)
    capsys.readouterr()
    assert cli.main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    grid, by_class = run / "plots" / "style_grid.png", run / "plots" / "samples_by_class.png"
    prior = run / "plots" / "style_grid_prior.png"
    assert str(grid) in out and str(by_class) in out and str(prior) in out
    # M2 has no sample_prior / encode_mean / decode_mean: samples from its model, reconstructions through q(y|x)
    assert str(run / "plots" / "samples.png") in out and str(run / "plots" / "reconstructions.png") in out
    assert "skipped" not in out
    # plot_image_grid: (0.6 nrow) x (0.6 rows + 0.4) inches; rows: the test images, columns: the image and 10 classes
    height, width = imread(grid).shape[:2]
    assert (height, width) == pytest.approx(((0.6 * STYLE_ROWS + 0.4) * plots.DPI, 0.6 * 11 * plots.DPI), abs=1)
    assert imread(prior).shape[:2] == pytest.approx(((0.6 * STYLE_ROWS + 0.4) * plots.DPI, 0.6 * 10 * plots.DPI), abs=1)
    assert imread(by_class).shape[:2] == pytest.approx(((0.6 * 10 + 0.4) * plots.DPI, 0.6 * 8 * plots.DPI), abs=1)


def test_a_conditional_vae_given_the_labels_gets_the_grid_of_its_classes():
    from ppl_vae.models.conditional import ConditionalVAE

    program = ConditionalVAE(latent_dim=2, hidden_sizes=(8,)).eval()  # no label site: y is data; num_classes = 10
    grid = style_grid(program, torch.bernoulli(torch.full((3, 784), 0.3)), torch.tensor([1, 2, 3]))
    assert grid.images.shape == (3, 1 + 10, 784) and grid.style_site == "z" and grid.styles.shape == (3, 2)

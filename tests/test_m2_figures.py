"""``ppl-vae plot`` of M2 and programs like it, which have no sample_prior / encode_mean / decode_mean (issue 26):
samples from the model run on its own (y ~ p(y), z ~ p(z), E[x | y, z]) and reconstructions through the classifier
q(y | x) and q(z | x, y), generic over the model(x, y=None) / guide(x, y=None) convention."""

import argparse

import pyro
import torch
from torch.nn import functional as F

from ppl_vae.commands.plot import plot_program
from ppl_vae.models.m2 import M2, joined
from ppl_vae.style_grid import class_reconstructions, model_samples

DIM, CLASSES, LATENT = 12, 4, 2


def tiny_m2() -> M2:
    pyro.set_rng_seed(0)
    return M2(data_dim=DIM, num_classes=CLASSES, latent_dim=LATENT, hidden_sizes=(8,)).eval()


def test_samples_of_m2_are_its_decoder_at_a_class_drawn_from_the_prior():
    program = tiny_m2()
    with torch.no_grad():  # the decoder made blind to z: each sample is then the image of the class it drew
        program.decoder[0].weight[:, :LATENT] = 0
        classes = torch.sigmoid(program.decoder(joined(torch.zeros(CLASSES, LATENT), torch.eye(CLASSES))))
    samples = model_samples(program, 64, torch.zeros(3, DIM))
    assert samples.shape == (64, DIM)
    distance = torch.cdist(samples, classes)  # [64, C]
    assert torch.all(distance.min(-1).values < 1e-6)
    assert len(set(distance.argmin(-1).tolist())) == CLASSES  # y ~ uniform p(y): all 4 classes among 64 draws


def test_samples_vary_with_the_style_drawn():
    samples = model_samples(tiny_m2(), 64, torch.zeros(1, DIM))
    assert samples.unique(dim=0).shape[0] == 64 and torch.all((samples >= 0) & (samples <= 1))


def test_reconstructions_of_m2_go_through_the_most_probable_class_and_the_mean_style():
    program = tiny_m2()
    x = torch.bernoulli(torch.full((5, DIM), 0.4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = F.one_hot(program.classifier(x).argmax(-1), CLASSES).float()
        z, _ = program.encoder(joined(x, y))
        expected = torch.sigmoid(program.decoder(joined(z, y)))
    torch.testing.assert_close(class_reconstructions(program, x), expected)


def test_plot_of_m2_draws_samples_and_reconstructions(tmp_path, capsys):
    data = argparse.Namespace(test=torch.bernoulli(torch.full((10, DIM), 0.3)), record={"image_shape": [1, 3, 4]})
    written = plot_program(tiny_m2(), data, tmp_path)
    out = capsys.readouterr().out
    assert "skipped" not in out
    names = {path.name for path in written}
    assert {"samples.png", "reconstructions.png", "samples_by_class.png"} <= names
    assert all(path.is_file() for path in written)


def test_a_program_given_its_labels_as_data_gets_one_line_notes(tmp_path, capsys):
    from ppl_vae.models.conditional import ConditionalVAE

    program = ConditionalVAE(latent_dim=2, hidden_sizes=(8,)).eval()  # model(x, y): y required, no label site
    data = argparse.Namespace(test=torch.bernoulli(torch.full((10, 784), 0.3)), record={"image_shape": [1, 28, 28]})
    names = {path.name for path in plot_program(program, data, tmp_path)}
    lines = capsys.readouterr().out.splitlines()
    assert "samples.png" not in names and "reconstructions.png" not in names
    assert [line.split(" (")[0] for line in lines] == ["samples: skipped", "reconstructions: skipped"]


class CovariateDecoder(torch.nn.Module):
    """model(x, c): z ~ N(0, 1), x ~ Bernoulli(sigmoid(4 c_0 + 0 z)): its mean given c is known, whatever z is drawn."""

    def model(self, x, c):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))
            logits = (4 * c[:, :1] + 0 * z[:, :1]).expand(x.shape[0], DIM)
            pyro.sample("x", pyro.distributions.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x, c):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))


def test_samples_of_a_program_given_cond_are_one_per_test_image_given_its_c(tmp_path, capsys):
    """--cond programs: the model run on its own with the test images' c, row by row (was: skipped with a note)."""
    c = torch.linspace(-1.0, 1.0, 10)[:, None].repeat(1, 3)
    expected = torch.sigmoid(4 * c[:, :1]).expand(10, DIM)
    torch.testing.assert_close(model_samples(CovariateDecoder(), 10, torch.zeros(10, DIM), (c,)), expected)
    data = argparse.Namespace(test=torch.bernoulli(torch.full((10, DIM), 0.3)), record={"image_shape": [1, 3, 4]})
    written = plot_program(CovariateDecoder(), data, tmp_path, cond=(c,))
    assert "samples.png" in {path.name for path in written} and (tmp_path / "samples.png").is_file()
    assert "samples: skipped" not in capsys.readouterr().out

"""The images sent to experiment trackers every --log-images-every epochs (issue 26's follow-up): what ``ppl-vae plot``
draws, for any program: M2's samples and class reconstructions, and a --cond program's images given its c."""

import types

import pyro
import torch

from ppl_vae.data import tensor_data
from ppl_vae.models.m2 import M2
from ppl_vae.style_grid import class_reconstructions
from ppl_vae.training.config import TrainConfig
from ppl_vae.training.tracking import IMAGES, epoch_images

DIM = 12


def run_of(program, data, **config) -> types.SimpleNamespace:
    """The three things of a TrainingRun that epoch_images reads."""
    return types.SimpleNamespace(program=program, data=data, config=TrainConfig(seed=3, binarize="none", **config))


def binary(rows: int, seed: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((rows, DIM), 0.4), generator=torch.Generator().manual_seed(seed))


def test_m2_gets_samples_from_its_model_and_reconstructions_through_its_classifier():
    pyro.set_rng_seed(0)
    program = M2(data_dim=DIM, num_classes=4, latent_dim=2, hidden_sizes=(8,)).eval()
    data = tensor_data(binary(20, 1), binary(10, 2), binary(10, 3), binarize="none")
    images = epoch_images(run_of(program, data), epoch=2)
    assert images["samples"].shape == (IMAGES, DIM) and torch.all((images["samples"] >= 0) & (images["samples"] <= 1))
    x = data.val[:IMAGES]
    torch.testing.assert_close(images["reconstructions"], torch.cat([x, class_reconstructions(program, x)]))
    again = epoch_images(run_of(program, data), epoch=2)  # their own random stream: the same images again
    assert torch.equal(again["samples"], images["samples"])


class CovariateVAE(torch.nn.Module):
    """model(x, c) with encode_mean(x, c) and decode_mean(z, c): x ~ Bernoulli(sigmoid(4 c_0 + w z))."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((DIM,), 0.1))

    def encode_mean(self, x, c):
        return x[:, :2] - c[:, :2]

    def decode_mean(self, z, c):
        return torch.sigmoid(4 * c[:, :1] + z[:, :1] * self.w)

    def model(self, x, c):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", pyro.distributions.Bernoulli(self.decode_mean(z, c)).to_event(1), obs=x)

    def guide(self, x, c):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro.distributions.Normal(self.encode_mean(x, c), 1.0).to_event(1))


def test_a_cond_program_gets_its_images_given_the_validation_images_c():
    """The old code called encode_mean(x) without c: a TypeError that stopped training at its first image epoch."""
    c = {split: torch.randn(rows, 3, generator=torch.Generator().manual_seed(rows)) for split, rows in
         (("train", 20), ("val", 10), ("test", 10))}
    data = tensor_data((binary(20, 1), c["train"]), (binary(10, 2), c["val"]), (binary(10, 3), c["test"]),
                       cond=("c",), binarize="none")
    program = CovariateVAE()
    images = epoch_images(run_of(program, data, cond=("c",)), epoch=1)
    x, given = data.val[:IMAGES], c["val"][:IMAGES]
    with torch.no_grad():
        expected = program.decode_mean(program.encode_mean(x, given), given)
    torch.testing.assert_close(images["reconstructions"], torch.cat([x, expected]))
    assert images["samples"].shape == (IMAGES, DIM)  # the model run on its own, given each validation image's c

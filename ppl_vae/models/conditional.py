r"""A conditional VAE (Sohn et al. 2015): the label y of each image is given to both programs.

Generative model ``model(x, y)``, for each datapoint in the data plate::

    z ~ N(0, I)                                    # site "z"
    x ~ Bernoulli(logits_theta([z, onehot(y)]))    # site "x", observed

Guide ``guide(x, y)``::

    z ~ N(mu_phi([x, onehot(y)]), diag sigma_phi([x, onehot(y)])^2)

so the evidence it bounds is log p(x | y). Against an unconditional VAE on the same images,
log p(x | y) - log p(x) says how many nats the label is worth (``experiments/conditional.py`` pairs them per
image; ``ppl-vae compare`` pairs only runs whose evidence is of the same quantity, and says so).
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidDataError
from ..networks import GaussianEncoder, mlp


class ConditionalVAE(nn.Module):
    """p(z) p(x | z, y) with q(z | x, y); y are int64 class labels in [0, num_classes)."""

    def __init__(
        self,
        data_dim: int = 784,
        num_classes: int = 10,
        latent_dim: int = 50,
        hidden_sizes: Sequence[int] = (200, 200),
        activation: str = "tanh",
    ):
        super().__init__()
        self.data_dim, self.num_classes, self.latent_dim = data_dim, num_classes, latent_dim
        self.encoder = GaussianEncoder(data_dim + num_classes, latent_dim, hidden_sizes, activation)
        self.decoder = mlp(latent_dim + num_classes, tuple(reversed(hidden_sizes)), data_dim, activation)

    def _inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 2 or x[0].numel() != self.data_dim:
            raise InvalidDataError(f"x must be a batch [N, {self.data_dim}], got shape {list(x.shape)}")
        if y.dtype != torch.int64 or y.shape != x.shape[:1]:
            raise InvalidDataError(f"y must be int64 labels, one per datapoint (shape [{x.shape[0]}]), got "
                                   f"{y.dtype} of shape {list(y.shape)}: train with --labels")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise InvalidDataError(f"labels must lie in [0, {self.num_classes}), got values in "
                                   f"[{int(y.min())}, {int(y.max())}]")
        return x.reshape(x.shape[0], self.data_dim), F.one_hot(y, self.num_classes).to(x.dtype)

    def _decode(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        # z may carry a leading particle dimension: broadcast the labels to it.
        return self.decoder(torch.cat([z, onehot.expand(*z.shape[:-1], onehot.shape[-1])], -1))

    def model(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, onehot = self._inputs(x, y)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self._decode(z, onehot), validate_args=False).to_event(1), obs=x)
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, onehot = self._inputs(x, y)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.Normal(*self.encoder(torch.cat([x, onehot], -1))).to_event(1))

    @torch.no_grad()
    def sample_digits(self, labels: torch.Tensor) -> torch.Tensor:
        """One image E[x | z, y] per label, z ~ p(z): [len(labels), data_dim]."""
        onehot = F.one_hot(labels, self.num_classes).float().to(self.decoder[0].weight.device)
        z = torch.randn(labels.shape[0], self.latent_dim, device=onehot.device)
        return torch.sigmoid(self._decode(z, onehot))

r"""The semi-supervised M2 of Kingma, Rezende, Mohamed & Welling (2014): a class y and a style z per image.

Generative model ``model(x, y=None)``, for each datapoint in the data plate::

    y ~ Categorical(1 / C)                          # site "y"; observed (obs=y) on labelled batches
    z ~ N(0, I)                                     # site "z"
    x ~ Bernoulli(logits_theta([z, onehot(y)]))     # site "x", observed

Guide ``guide(x, y=None)``::

    y ~ q_phi(y | x) = Categorical(softmax(classifier(x)))   # only when y is not given; marked for enumeration
    z ~ N(mu_phi([x, onehot(y)]), diag sigma_phi([x, onehot(y)])^2)

On an unlabelled batch (``y=None``) the guide's y site is summed out exactly (``TraceEnum_ELBO``; the
evaluation sums it too, :mod:`ppl_vae.enumerated`): the bound is Kingma's U(x) on log p(x). On a labelled batch
the model observes y and the guide draws z given it: L(x, y) on log p(x, y). The classifier q(y | x) gets no
term from labelled data in these two; the trainer adds alpha * log q(y | x) on them
(:class:`ppl_vae.semisupervised.SemiSupervised`). The classifier's test error: :func:`ppl_vae.semisupervised.classification_error`
(label site ``"y"``).

Networks: MLPs with ``hidden_sizes`` (default 500-500) and softplus, z of 50 units (the paper's MNIST M2);
smaller ones through ``--program-kwargs``, e.g. ``{"hidden_sizes": [64], "latent_dim": 8}``.
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


def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., A] and [..., B] broadcast over their leading dims (particles, enumerated values) and concatenated."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1)


class M2(nn.Module):
    """p(y) p(z) p(x | y, z) with q(y | x) q(z | x, y); y are int64 class labels in [0, num_classes).

    ``enumerate``: mark the guide's y site for parallel enumeration (default); without it y is drawn and gets
    score-function gradients (``Trace_ELBO``).
    """

    label_site = "y"

    def __init__(
        self,
        data_dim: int = 784,
        num_classes: int = 10,
        latent_dim: int = 50,
        hidden_sizes: Sequence[int] = (500, 500),
        activation: str = "softplus",
        enumerate: bool = True,
    ):
        super().__init__()
        self.data_dim, self.num_classes, self.latent_dim, self.enumerate = data_dim, num_classes, latent_dim, enumerate
        self.classifier = mlp(data_dim, hidden_sizes, num_classes, activation)  # q(y | x): logits
        self.encoder = GaussianEncoder(data_dim + num_classes, latent_dim, hidden_sizes, activation)  # q(z | x, y)
        self.decoder = mlp(latent_dim + num_classes, tuple(reversed(hidden_sizes)), data_dim, activation)  # p(x | y, z)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x[0].numel() != self.data_dim:
            raise InvalidDataError(f"x must be a batch [N, {self.data_dim}] (or [N, ...] with {self.data_dim} values "
                                   f"per item), got shape {list(x.shape)}")
        return x.reshape(x.shape[0], self.data_dim)

    def _check_labels(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if y is None:
            return
        if y.dtype != torch.int64 or y.shape != x.shape[:1]:
            raise InvalidDataError(f"y must be int64 labels, one per datapoint (shape [{x.shape[0]}]), got "
                                   f"{y.dtype} of shape {list(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise InvalidDataError(f"labels must lie in [0, {self.num_classes}), got values in "
                                   f"[{int(y.min())}, {int(y.max())}]")

    def _onehot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(like.dtype)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self._flat(x)
        self._check_labels(x, y)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.num_classes)), obs=y)
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            logits = self.decoder(joined(z, self._onehot(y, x)))
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self._flat(x)
        self._check_labels(x, y)
        with pyro.plate("data", x.shape[0]):
            if y is None:
                infer = {"enumerate": "parallel"} if self.enumerate else {}
                y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)), infer=infer)
            loc, scale = self.encoder(joined(x, self._onehot(y, x)))
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y | x): int64 [N]."""
        return self.classifier(self._flat(x)).argmax(-1)

    @torch.no_grad()
    def sample_digits(self, labels: torch.Tensor) -> torch.Tensor:
        """One image E[x | z, y] per label, z ~ p(z): [len(labels), data_dim]."""
        device = self.decoder[0].weight.device
        onehot = F.one_hot(labels.to(device), self.num_classes).float()
        z = torch.randn(labels.shape[0], self.latent_dim, device=device)
        return torch.sigmoid(self.decoder(torch.cat([z, onehot], -1)))

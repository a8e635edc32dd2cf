"""Programs as a user would write them, for the objective and engine checks (tests/test_objective_checks.py).

* :class:`M2` -- Kingma et al. (2014)'s M2 without labels: a class y ~ Categorical(1/C) and a style
  z ~ N(0, I) per datapoint, x ~ Bernoulli(decoder(z, y)); the guide q(y | x) q(z | x, y) has a
  non-reparameterized site y (optionally marked for enumeration).
* :class:`SmallVAE` -- a plain VAE (optionally with an invalid Bernoulli argument only validation refuses).
* :class:`BranchingVAE` -- a VAE whose decoder takes a data-dependent Python branch.
* :class:`BatchNormVAE` -- a VAE whose encoder has BatchNorm (running statistics a compiled trace freezes).
* :class:`CountingVAE` -- a VAE whose model counts its calls in a Python attribute and turns NaN after
  ``nan_after`` calls (Python state a compiled trace freezes).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F


def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., A] and [..., B] broadcast over their leading dims and concatenated (particle and enumeration dims)."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1)


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))


class M2(nn.Module):
    def __init__(self, data_dim: int = 784, classes: int = 3, latent: int = 2, hidden: int = 16,
                 enumerate: bool = False):
        super().__init__()
        self.classes, self.latent, self.data_dim = classes, latent, data_dim
        self.enumerate = enumerate
        self.classifier = mlp(data_dim, hidden, classes)  # q(y | x)
        self.encoder = mlp(data_dim + classes, hidden, 2 * latent)  # q(z | x, y)
        self.decoder = mlp(latent + classes, hidden, data_dim)  # p(x | z, y)

    def model(self, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.classes)))
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            logits = self.decoder(joined(z, F.one_hot(y, self.classes).to(x.dtype)))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            infer = {"enumerate": "parallel"} if self.enumerate else {}
            y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)), infer=infer)
            loc, raw = self.encoder(joined(x, F.one_hot(y, self.classes).to(x.dtype))).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


class SummedM2(M2):
    """M2 with y summed out of the model by enumeration (config_enumerate) and no guide site for it."""

    def model(self, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.classes)), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            logits = self.decoder(joined(z, F.one_hot(y, self.classes).to(x.dtype)))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(joined(x, x.new_zeros(self.classes))).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


class SmallVAE(nn.Module):
    """A Gaussian-latent, Bernoulli-pixel VAE; subclasses change its decoder's logits.

    ``probs_scale``: the pixels' probabilities are sigmoid(logits) * probs_scale, an invalid argument above 1
    that torch's Bernoulli clamps silently; only Pyro's validation (``--validate``) refuses it.
    """

    def __init__(self, data_dim: int = 784, latent: int = 2, hidden: int = 16, probs_scale: float | None = None):
        super().__init__()
        self.latent, self.probs_scale = latent, probs_scale
        self.encoder = mlp(data_dim, hidden, 2 * latent)
        self.decoder = mlp(latent, hidden, data_dim)

    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def model(self, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            logits = self.logits(z, x)
            pixels = dist.Bernoulli(logits=logits) if self.probs_scale is None else \
                dist.Bernoulli(probs=torch.sigmoid(logits) * self.probs_scale)
            pyro.sample("x", pixels.to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


class BatchNormVAE(SmallVAE):
    """Its encoder normalizes with BatchNorm1d: training steps update the running statistics (buffers)."""

    def __init__(self, data_dim: int = 784, latent: int = 2, hidden: int = 16, **kwargs):
        super().__init__(data_dim, latent, hidden, **kwargs)
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.BatchNorm1d(hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * latent))


class BranchingVAE(SmallVAE):
    def __init__(self, threshold: float = 0.13, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold

    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(z)
        if x.mean() > self.threshold:  # data-dependent Python control flow: a trace records one branch
            logits = 3 * logits
        return logits


class CountingVAE(SmallVAE):
    def __init__(self, nan_after: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.nan_after, self.calls = nan_after, 0

    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # Python state: SVI runs this every step, a compiled trace only when it is taken
        logits = self.decoder(z)
        return logits * float("nan") if self.calls > self.nan_after else logits

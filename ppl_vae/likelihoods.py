"""Likelihoods p(x | z): modules that turn the decoder's output into a distribution over x.

Interface: ``likelihood(decoder_output) -> Distribution`` with ``event_shape == (data_dim,)``;
``params_per_dim`` says how many decoder outputs each data dimension needs;
``check_data(x)`` raises :class:`InvalidDataError` for data outside the support.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .errors import InvalidDataError


class BernoulliLikelihood(nn.Module):
    """p(x | z) = prod_d Bernoulli(x_d; sigmoid(logits_d)), for binary data; log p in nats."""

    params_per_dim = 1

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        if not torch.all((x == 0) | (x == 1)):
            low, high = x.min().item(), x.max().item()
            raise InvalidDataError(
                f"the Bernoulli likelihood needs binary data (0 or 1), but got values in [{low:g}, {high:g}]. "
                "Binarize the images (--binarize dynamic or static) or choose a likelihood for grey levels."
            )


LIKELIHOODS = {"bernoulli": BernoulliLikelihood}

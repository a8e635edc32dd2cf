r"""Likelihoods p(x | z): modules that turn the decoder's output into a distribution over x.

Interface: ``likelihood(decoder_output) -> Distribution`` with ``event_shape == (data_dim,)``;
``params_per_dim`` says how many decoder outputs each data dimension needs;
``check_data(x)`` raises :class:`InvalidDataError` for data outside the support;
``data_kind`` is what the values mean, which decides the units of the evidence:

* ``"binary"`` -- a probability mass on {0, 1}^D: log p(x) in nats per image;
* ``"continuous"`` -- a density on [0, 1]^D: for 8-bit images it is evaluated on uniformly
  dequantized data y = (k + u) / 256 and reported in bits/dim through
  log P(k) >= E_u[log p(y)] - D log 256 (the change of variables from [0, 256) to [0, 1));
* ``"discrete"`` -- a probability mass on the 256 grey levels k / 255: bits/dim directly.

Built in (``--likelihood``): ``bernoulli``, ``cbernoulli`` (continuous Bernoulli),
``gaussian`` (fixed scale), ``gaussian-learned``, ``laplace``, ``beta``, ``logistic256``
(discretized logistic). A user's own likelihood is any module with this interface.

**The Gaussian with fixed scale is the "MSE loss".** log N(x; mu, s^2 I) =
-||x - mu||^2 / (2 s^2) - D log s - (D/2) log(2 pi): minimizing the mean squared
error is maximizing this log-likelihood up to the factor 1/(2 s^2) and the dropped
constant D log s + (D/2) log 2 pi (for s = 1 and D = 784: 720.4 nats). Here the
constant is kept, so the numbers are true log-densities.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn import functional as F

from .errors import InvalidDataError

NUM_LEVELS = 256


def _check_range(x: torch.Tensor, low: float, high: float, name: str, hint: str, open_interval: bool = False) -> None:
    inside = (x > low) & (x < high) if open_interval else (x >= low) & (x <= high)
    if not torch.all(inside):
        brackets = "()" if open_interval else "[]"
        raise InvalidDataError(
            f"the {name} likelihood needs data in {brackets[0]}{low:g}, {high:g}{brackets[1]}, but got values in "
            f"[{x.min().item():g}, {x.max().item():g}]. {hint}"
        )


class Likelihood(nn.Module):
    """Base of the built-in likelihoods: takes (and ignores) the options other pieces use."""

    params_per_dim = 1
    data_kind = "continuous"

    def __init__(self, **_):
        super().__init__()

    def check_data(self, x: torch.Tensor) -> None:
        if not torch.all(torch.isfinite(x)):
            raise InvalidDataError("the data contain NaN or infinite values")


class BernoulliLikelihood(Likelihood):
    """p(x | z) = prod_d Bernoulli(x_d; sigmoid(logits_d)), for binary data."""

    params_per_dim = 1
    data_kind = "binary"

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        if not torch.all((x == 0) | (x == 1)):
            low, high = x.min().item(), x.max().item()
            raise InvalidDataError(
                f"the Bernoulli likelihood needs binary data (0 or 1), but got values in [{low:g}, {high:g}]. "
                "Binarize the images (--binarize dynamic or static) or choose a likelihood for grey levels."
            )


class ContinuousBernoulliLikelihood(Likelihood):
    """p(x | z) = prod_d CB(x_d; sigmoid(logits_d)), a normalized density on [0, 1] (Loaiza-Ganem & Cunningham 2019)."""

    params_per_dim = 1
    data_kind = "continuous"

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=logits, validate_args=False).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        _check_range(x, 0.0, 1.0, "continuous Bernoulli", "Use grey levels scaled to [0, 1].")


class GaussianLikelihood(Likelihood):
    """p(x | z) = N(x; sigmoid(out), s^2 I) with a fixed scale s (the "MSE loss"; see the module docstring)."""

    params_per_dim = 1
    data_kind = "continuous"

    def __init__(self, obs_scale: float = 0.1, **_):
        super().__init__()
        if not obs_scale > 0:
            raise InvalidDataError(f"the Gaussian likelihood's scale must be positive, got {obs_scale}")
        self.obs_scale = obs_scale

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc = torch.sigmoid(out)
        return dist.Normal(loc, torch.full_like(loc, self.obs_scale), validate_args=False).to_event(1)


class LearnedScaleGaussianLikelihood(GaussianLikelihood):
    """p(x | z) = N(x; sigmoid(out_1), diag(softplus(out_2)^2)): the decoder also outputs the scale."""

    params_per_dim = 2

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = out.chunk(2, dim=-1)
        return dist.Normal(torch.sigmoid(loc), F.softplus(raw_scale) + 1e-3, validate_args=False).to_event(1)


class LaplaceLikelihood(GaussianLikelihood):
    """p(x | z) = prod_d Laplace(x_d; sigmoid(out_1), softplus(out_2)): an L1 reconstruction with learned scale."""

    params_per_dim = 2

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = out.chunk(2, dim=-1)
        return dist.Laplace(torch.sigmoid(loc), F.softplus(raw_scale) + 1e-3, validate_args=False).to_event(1)


class BetaLikelihood(Likelihood):
    """p(x | z) = prod_d Beta(x_d; softplus(out_1), softplus(out_2)), a density on the open interval (0, 1)."""

    params_per_dim = 2
    data_kind = "continuous"

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        a, b = out.chunk(2, dim=-1)
        return dist.Beta(F.softplus(a) + 1e-3, F.softplus(b) + 1e-3, validate_args=False).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        _check_range(x, 0.0, 1.0, "Beta", "Its density is 0 or infinite at exactly 0 and 1: dequantize the "
                     "grey levels (--binarize none dequantizes for continuous likelihoods).", open_interval=True)


def _log_sigmoid_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(a) - sigmoid(b)) for a > b, without cancellation in either tail.

    sigmoid(a) - sigmoid(b) = sigmoid(-b) - sigmoid(-a): evaluate on the side where the
    sigmoids are small, then log(s_a - s_b) = log s_a + log(1 - exp(log s_b - log s_a)).
    """
    flip = (a + b) > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_a, log_b = F.logsigmoid(a), F.logsigmoid(b)
    return log_a + torch.log(-torch.expm1(log_b - log_a))


class DiscretizedLogistic(dist.TorchDistribution):
    r"""A logistic distribution discretized to the 256 grey levels k/255, k = 0..255 (Salimans et al. 2017).

    P(k) = F((k + 1/2)/255) - F((k - 1/2)/255) with F the logistic CDF of (loc, scale), the
    first and last bins extended to -inf and +inf so the 256 masses sum to 1. Written by
    hand because neither torch nor Pyro ships it.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return DiscretizedLogistic(self.loc.expand(batch_shape), self.scale.expand(batch_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        half_bin = 0.5 / (NUM_LEVELS - 1)
        upper = (value - self.loc + half_bin) / self.scale
        lower = (value - self.loc - half_bin) / self.scale
        first, last = value < half_bin, value > 1 - half_bin
        middle = _log_sigmoid_difference(upper, lower)
        return torch.where(first, F.logsigmoid(upper), torch.where(last, F.logsigmoid(-lower), middle))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            logistic = self.loc.expand(shape) + self.scale.expand(shape) * (torch.log(u) - torch.log1p(-u))
            return (logistic.clamp(0, 1) * (NUM_LEVELS - 1)).round() / (NUM_LEVELS - 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.clamp(0, 1)


class DiscretizedLogisticLikelihood(Likelihood):
    """p(x | z) = prod_d DiscretizedLogistic(x_d; sigmoid(out_1), softplus(out_2)) on the levels k/255."""

    params_per_dim = 2
    data_kind = "discrete"

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = out.chunk(2, dim=-1)
        return DiscretizedLogistic(torch.sigmoid(loc), F.softplus(raw_scale) + 1e-4).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        levels = x * (NUM_LEVELS - 1)
        if not torch.all((levels - levels.round()).abs() < 1e-3) or x.min() < 0 or x.max() > 1:
            raise InvalidDataError(
                "the discretized logistic likelihood needs 8-bit grey levels k/255 (k = 0..255), not binarized or "
                "dequantized data: use --binarize none"
            )


LIKELIHOODS: dict[str, type[nn.Module]] = {
    "bernoulli": BernoulliLikelihood,
    "cbernoulli": ContinuousBernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian-learned": LearnedScaleGaussianLikelihood,
    "laplace": LaplaceLikelihood,
    "beta": BetaLikelihood,
    "logistic256": DiscretizedLogisticLikelihood,
}

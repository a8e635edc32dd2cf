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
(discretized logistic), ``logistic-mixture`` (a mixture of discretized logistics per value, as in
PixelCNN++). A user's own likelihood is any module with this interface.

The decoder's output holds ``params_per_dim`` blocks of D values (parameter p of data value d
at index p D + d, :mod:`ppl_vae.networks`), which the likelihoods split with ``chunk``.
Every value is one channel of one pixel: colour images are D = C H W independent values
given z, on the same scales (nats, bits/dim) as grey ones.

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
    label = "discretized logistic"

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = out.chunk(2, dim=-1)
        return DiscretizedLogistic(torch.sigmoid(loc), F.softplus(raw_scale) + 1e-4).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        levels = x * (NUM_LEVELS - 1)
        if not torch.all((levels - levels.round()).abs() < 1e-3) or x.min() < 0 or x.max() > 1:
            raise InvalidDataError(
                f"the {self.label} likelihood needs 8-bit grey levels k/255 (k = 0..255), not binarized or "
                "dequantized data: use --binarize none"
            )


class DiscretizedLogisticMixture(dist.TorchDistribution):
    r"""A mixture of K discretized logistics on the 256 levels k/255 (Salimans et al. 2017, PixelCNN++).

    P(k) = sum_j pi_j P_j(k), with P_j the :class:`DiscretizedLogistic` of (loc_j, scale_j)
    and pi = softmax(logits): each component sums to 1 over the 256 levels, so the mixture
    does too. The components sit on the last dimension of ``logits``, ``loc`` and ``scale``
    ([..., K]); the batch shape is what remains. log P(k) is a ``logsumexp`` over the
    components, stable in both tails. Unlike PixelCNN++, the channels of a pixel are
    independent given z (no autoregressive coupling between them): the decoder already
    sees the whole image through z. With K = 1 it is the discretized logistic.
    """

    arg_constraints = {"logits": constraints.real, "loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.logits, self.loc, self.scale = torch.broadcast_tensors(logits, loc, scale)
        super().__init__(self.loc.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.loc.shape[-1:]
        return DiscretizedLogisticMixture(self.logits.expand(shape), self.loc.expand(shape), self.scale.expand(shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        components = DiscretizedLogistic(self.loc, self.scale).log_prob(value.unsqueeze(-1))
        return torch.logsumexp(components + self.logits.log_softmax(-1), dim=-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            index = dist.Categorical(logits=self.logits).sample(sample_shape).unsqueeze(-1)
            shape = index.shape[:-1] + self.loc.shape[-1:]
            loc = self.loc.expand(shape).gather(-1, index).squeeze(-1)
            scale = self.scale.expand(shape).gather(-1, index).squeeze(-1)
            return DiscretizedLogistic(loc, scale).sample()

    @property
    def mean(self) -> torch.Tensor:
        # The mixture of the components' means (each a clamped location, as for DiscretizedLogistic).
        return (self.logits.softmax(-1) * self.loc.clamp(0, 1)).sum(-1)


class DiscretizedLogisticMixtureLikelihood(DiscretizedLogisticLikelihood):
    """p(x | z) = prod_d sum_j pi_dj DiscretizedLogistic(x_d; sigmoid(m_dj), softplus(s_dj)) on the levels k/255.

    The decoder gives 3 K numbers per value (``likelihood_components`` = K): K mixture logits,
    then K raw locations, then K raw scales, each a block of K D outputs (component j of
    value d at j D + d). Locations and scales go through the same sigmoid and softplus as
    ``logistic256``, so with K = 1 the two likelihoods give the same probabilities.
    """

    data_kind = "discrete"
    label = "logistic mixture"

    def __init__(self, likelihood_components: int = 5, **_):
        super().__init__()
        if likelihood_components < 1:
            raise InvalidDataError(f"the logistic mixture needs at least one component, got {likelihood_components}")
        self.num_components = likelihood_components
        self.params_per_dim = 3 * likelihood_components

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        k = self.num_components
        # [..., 3 K D] -> [..., D, 3 K]: the mixture's components on the last dimension.
        params = out.reshape(*out.shape[:-1], 3 * k, -1).transpose(-1, -2)
        logits, loc, raw_scale = params.split(k, dim=-1)
        return DiscretizedLogisticMixture(logits, torch.sigmoid(loc), F.softplus(raw_scale) + 1e-4).to_event(1)


LIKELIHOODS: dict[str, type[nn.Module]] = {
    "bernoulli": BernoulliLikelihood,
    "cbernoulli": ContinuousBernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian-learned": LearnedScaleGaussianLikelihood,
    "laplace": LaplaceLikelihood,
    "beta": BetaLikelihood,
    "logistic256": DiscretizedLogisticLikelihood,
    "logistic-mixture": DiscretizedLogisticMixtureLikelihood,
}

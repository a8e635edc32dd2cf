"""The VAE as a pair of Pyro programs, assembled from a prior, a decoder, a likelihood and a guide.

Generative model (``VAE.model``), for each datapoint n in the data plate::

    z_n ~ p(z)                       # site "z"
    x_n ~ p_theta(x | z_n)           # site "x", observed

Guide (``VAE.guide``)::

    z_n ~ q_phi(z | x_n)             # site "z"

These two programs are the single source of truth: training (SVI with
``Trace_ELBO``) and every evaluation in :mod:`ppl_vae.evaluate` read them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import pyro
from pyro.infer.util import is_validation_enabled
import torch
from torch import nn

from .errors import InvalidDataError, PplVaeError
from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .networks import NETWORKS, decoder_net
from .priors import PRIORS


@dataclass
class VAEConfig:
    """Architecture of a VAE, as plain data (saved as JSON in every run directory)."""

    data_dim: int = 784
    latent_dim: int = 50
    hidden_sizes: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    prior: str = "standard"
    likelihood: str = "bernoulli"
    guide: str = "diagonal"
    prior_components: int = 10  # K for the mixture prior and the VampPrior (Tomczak & Welling used 500)
    num_flows: int = 2  # flow steps of the flow prior and the IAF guide
    obs_scale: float = 0.1  # the fixed scale of the "gaussian" likelihood
    # (C, H, W) of one image; training fills it in from the dataset. With it, data_dim is C H W.
    image_shape: tuple[int, ...] | None = None
    network: str = "mlp"  # mlp, or conv: strided convolutions (encoder) and transposed convolutions (decoder)
    conv_channels: tuple[int, ...] = (32, 64)  # widths of the convolutions of the conv networks, each halving H and W
    likelihood_components: int = 5  # mixture components of the logistic-mixture likelihood

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        if self.image_shape is not None:
            self.image_shape = tuple(int(n) for n in self.image_shape)
            if len(self.image_shape) != 3 or min(self.image_shape) < 1:
                raise PplVaeError(f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}")
            # data_dim follows the image shape; a data_dim set to something else is a contradiction.
            if self.data_dim not in (VAEConfig.data_dim, math.prod(self.image_shape)):
                raise PplVaeError(f"data_dim {self.data_dim} contradicts image_shape {self.image_shape} "
                                  f"({math.prod(self.image_shape)} values per image)")
            self.data_dim = math.prod(self.image_shape)
        if self.network not in NETWORKS:
            raise PplVaeError(f"unknown network {self.network!r}: choose one of {', '.join(NETWORKS)}")
        if min(self.conv_channels, default=0) < 1 or self.likelihood_components < 1:
            raise PplVaeError("conv_channels need at least one width, all positive, and likelihood_components >= 1")
        for kind, value, choices in (
            ("prior", self.prior, PRIORS),
            ("likelihood", self.likelihood, LIKELIHOODS),
            ("guide", self.guide, GUIDES),
        ):
            if value not in choices:
                raise PplVaeError(f"unknown {kind} {value!r}: choose one of {', '.join(choices)}")
        if self.prior == "vamp" and self.guide == "iaf":
            raise PplVaeError(
                "the VampPrior with the IAF guide is not supported: Pyro's conditional flows do not broadcast "
                "over the mixture's components. Use the VampPrior with the diagonal or fullcov guide."
            )
        if min(self.latent_dim, self.data_dim, self.prior_components, self.num_flows) < 1:
            raise PplVaeError("latent_dim, data_dim, prior_components and num_flows must be positive integers")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        hidden = "-".join(str(h) for h in self.hidden_sizes)
        prior = f"{self.prior}({self.prior_components})" if self.prior in ("mixture", "vamp") else self.prior
        prior = f"flow({self.num_flows})" if self.prior == "flow" else prior
        guide = f"iaf({self.num_flows})" if self.guide == "iaf" else self.guide
        likelihood = (f"{self.likelihood}({self.likelihood_components})" if self.likelihood == "logistic-mixture"
                      else self.likelihood)
        if self.network == "conv":
            shape = "x".join(str(n) for n in self.image_shape) if self.image_shape else "image"
            channels = "-".join(str(c) for c in self.conv_channels)
            network = f"{shape} conv({channels})-{hidden}-{self.latent_dim} {self.activation}"
        else:
            network = f"{self.data_dim}-{hidden}-{self.latent_dim} {self.activation} MLP"
        return f"{network}, {prior} prior, {likelihood} likelihood, {guide} guide"

    def network_options(self) -> dict[str, Any]:
        """What the guides and the decoder need to build a network of :mod:`ppl_vae.networks`."""
        return dict(network=self.network, image_shape=self.image_shape, conv_channels=self.conv_channels)


class VAE(nn.Module):
    """A VAE whose ``model`` and ``guide`` methods are Pyro programs over a batch ``x`` of shape [N, data_dim].

    The pieces come from ``config`` by name, or are passed in: ``prior``,
    ``likelihood`` and ``guide_net`` may be any modules with the interfaces of
    :mod:`ppl_vae.priors`, :mod:`ppl_vae.likelihoods` and :mod:`ppl_vae.guides`.
    The programs are unscaled: a KL weight (beta) is applied by the trainer to any program,
    this one included, by wrapping it in :class:`ppl_vae.programs.Weighted` (the SVI objective
    then becomes E_q[log p(x|z)] - beta KL); evaluation reads the unwrapped programs.

    Images [N, C, H, W] (or [N, H, W] for grey ones) are flattened at the observed site;
    with ``config.image_shape`` set, their shape must be that one (a channels-last batch
    is refused). The convolutional networks view the flat values as images again
    (:mod:`ppl_vae.networks`). All parameters live in this module: save and load it with
    ``state_dict``.
    """

    def __init__(
        self,
        config: VAEConfig | None = None,
        prior: nn.Module | None = None,
        likelihood: nn.Module | None = None,
        guide_net: nn.Module | None = None,
    ):
        super().__init__()
        self.config = config or VAEConfig()
        c = self.config
        options = dict(num_components=c.prior_components, num_flows=c.num_flows, obs_scale=c.obs_scale,
                       likelihood_components=c.likelihood_components)
        self.guide_net = guide_net or GUIDES[c.guide](c.data_dim, c.latent_dim, c.hidden_sizes, c.activation,
                                                      **options, **c.network_options())
        self.likelihood = likelihood or LIKELIHOODS[c.likelihood](**options)
        self.prior = prior or PRIORS[c.prior](c.latent_dim, guide_net=self.guide_net, data_dim=c.data_dim, **options)
        self.decoder = decoder_net(c.latent_dim, c.data_dim, self.likelihood.params_per_dim, c.hidden_sizes, c.activation,
                                   **c.network_options())
        # Pyro's SVI finds parameters through param sites, so the programs register the modules with
        # pyro.module. A loss used as a torch module (Trace_ELBO()(model, guide)) takes the parameters
        # from this nn.Module instead; it turns this off and saves that per-step work.
        self.register_params = True

    @property
    def kl_weight(self) -> float:
        """1: the VAE's programs are unscaled (the KL weight is :class:`ppl_vae.programs.Weighted`'s)."""
        return 1.0

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        # Earlier versions scaled the latent site here; a weight set here now would silently do nothing.
        raise PplVaeError(f"VAE.kl_weight = {value!r}: the KL weight is applied by wrapping the program, for any "
                          "program: use ppl_vae.programs.Weighted(vae, kl_weight=beta) and its model and guide")

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """Check the batch and return it as [N, data_dim]; a clear error for anything else."""
        if not isinstance(x, torch.Tensor):
            raise InvalidDataError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InvalidDataError(f"x must be a floating-point tensor (e.g. x.float()), got dtype {x.dtype}")
        d = self.config.data_dim
        if x.dim() < 2 or x.shape[0] == 0 or math.prod(x.shape[1:]) != d:
            raise InvalidDataError(
                f"x must be a non-empty batch of shape [N, {d}] (or [N, ...] with {d} values per item), "
                f"got shape {list(x.shape)}"
            )
        shape = self.config.image_shape
        if shape is not None and x.dim() == 4 and tuple(x.shape[1:]) != shape:
            raise InvalidDataError(f"x must be images [N, {', '.join(map(str, shape))}] (channels first), "
                                   f"got shape {list(x.shape)}")
        return x.reshape(x.shape[0], d)

    def model(self, x: torch.Tensor) -> torch.Tensor:
        """p(z) p_theta(x | z), with x observed at site "x"; returns z."""
        x = self.flatten(x)
        if is_validation_enabled():
            self.likelihood.check_data(x)
        if self.register_params:
            pyro.module("prior", self.prior)
            pyro.module("decoder", self.decoder)
            pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
        return z

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """q_phi(z | x) at site "z"; returns z."""
        x = self.flatten(x)
        if self.register_params:
            pyro.module("guide", self.guide_net)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.guide_net(x))

    @torch.no_grad()
    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z] under the likelihood, for plots and reconstructions."""
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def sample_prior(self, num_samples: int) -> torch.Tensor:
        """z ~ p(z), then E[x | z]: ``num_samples`` images as [num_samples, data_dim]."""
        z = self.prior().sample((num_samples,))
        return self.decode_mean(z)


def build_vae(config: VAEConfig | dict | None = None) -> VAE:
    """A :class:`VAE` from a config object or a plain dict of its fields."""
    if isinstance(config, dict):
        config = VAEConfig(**config)
    return VAE(config)

r"""Plain torch networks: the encoder and decoder, as MLPs (``--network mlp``) or convolutional (``conv``).

The default is the one-stochastic-layer architecture of the IWAE paper (Burda,
Grosse & Salakhutdinov 2015): 784-200-200-50 with tanh for the encoder (which
outputs a location and a scale per latent dimension) and 50-200-200-784 for the
decoder. Widths, depth and activation are configurable.

The convolutional networks (:class:`ConvEncoder`, :class:`ConvDecoder`) are for images
[C, H, W] with any number of channels C (28x28 and 32x32 are tested): the encoder is a
stack of strided 4x4 convolutions with widths ``conv_channels`` (each halves H and W,
rounding down) followed by an MLP with ``hidden_sizes``; the decoder mirrors it with an
MLP and 4x4 transposed convolutions of stride 2, back to exactly H x W.

Interface shared by both kinds, which is what lets every prior, guide, likelihood and
objective use either: an encoder maps [..., D] to [..., out_features] and a decoder maps
z [..., latent_dim] to [..., P D] (P decoder outputs per data value), with D = C H W and any
number of leading batch dimensions (Pyro's vectorized particles add one to z). The Pyro
programs keep x flat at the observed site (the likelihood's event is D values); the
convolutional networks view those D values as the image [C, H, W] (``x.reshape(-1, C, H,
W)``, the same order in which images are flattened), and the decoder's P C output channels,
flattened, are P blocks of D values: parameter p of value d sits at index p D + d, the
layout the likelihoods split with ``chunk(P, dim=-1)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .errors import PplVaeError

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def as_flat(x: torch.Tensor, data_dim: int) -> torch.Tensor:
    """x [..., D], or images [..., H, W] / [..., C, H, W] with D values each, as [..., D].

    Lets a guide take a batch straight from the data pipeline ([N, C, H, W]) as well as the
    flat batch the Pyro programs pass.
    """
    if x.shape[-1] == data_dim:
        return x
    for k in (2, 3):
        if x.dim() > k and math.prod(x.shape[-k:]) == data_dim:
            return x.reshape(*x.shape[:-k], data_dim)
    return x  # not this network's size: let the first layer say so


def mlp(in_features: int, hidden_sizes: Sequence[int], out_features: int, activation: str = "tanh") -> nn.Sequential:
    """A multilayer perceptron: Linear layers with ``activation`` between them, none after the last.

    Works on any number of leading batch dimensions, which is what lets Pyro's
    vectorized particles (an extra leading dimension on ``z``) pass through.
    """
    if activation not in ACTIVATIONS:
        raise PplVaeError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    sizes = [in_features, *hidden_sizes, out_features]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian over z; the scale is a softplus, so always > 0."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_sizes: Sequence[int], activation: str = "tanh",
                 **network_options):
        super().__init__()
        self.latent_dim, self.data_dim = latent_dim, data_dim
        self.net = encoder_net(data_dim, hidden_sizes, 2 * latent_dim, activation, **network_options)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.net(as_flat(x, self.data_dim)).split(self.latent_dim, dim=-1)
        # The small floor keeps log q finite if a unit's scale is driven to zero.
        return loc, nn.functional.softplus(raw_scale) + 1e-6


NETWORKS = ("mlp", "conv")
KERNEL, STRIDE, PADDING = 4, 2, 1  # each strided convolution maps a side of n pixels to floor(n / 2)


def _check_image_shape(image_shape: Sequence[int] | None, conv_channels: Sequence[int]) -> tuple[int, int, int]:
    if image_shape is None or len(image_shape) != 3:
        raise PplVaeError(f"the convolutional networks need the image shape (C, H, W), got {image_shape}: set "
                          "VAEConfig(image_shape=...); training fills it in from the dataset")
    if not conv_channels:
        raise PplVaeError("the convolutional networks need at least one convolution width (--conv-channels)")
    c, h, w = (int(n) for n in image_shape)
    if min(h, w) < 2 ** len(conv_channels):
        raise PplVaeError(f"{len(conv_channels)} strided convolutions halve {h}x{w} images {len(conv_channels)} times, "
                          f"below one pixel: use fewer --conv-channels")
    return c, h, w


def _sides(h: int, w: int, layers: int) -> list[tuple[int, int]]:
    """(H, W) before each strided convolution and after the last one."""
    sides = [(h, w)]
    for _ in range(layers):
        h, w = (h + 2 * PADDING - KERNEL) // STRIDE + 1, (w + 2 * PADDING - KERNEL) // STRIDE + 1
        sides.append((h, w))
    return sides


class ConvEncoder(nn.Module):
    """[..., C H W] -> [..., out_features]: strided convolutions over the image, then an MLP."""

    def __init__(self, image_shape: Sequence[int], conv_channels: Sequence[int], hidden_sizes: Sequence[int],
                 out_features: int, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise PplVaeError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        self.image_shape = _check_image_shape(image_shape, conv_channels)
        layers: list[nn.Module] = []
        widths = [self.image_shape[0], *conv_channels]
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(n_in, n_out, KERNEL, STRIDE, PADDING), ACTIVATIONS[activation]()]
        self.convs = nn.Sequential(*layers)
        h, w = _sides(*self.image_shape[1:], len(conv_channels))[-1]
        self.head = mlp(conv_channels[-1] * h * w, hidden_sizes, out_features, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - 1] if x.shape[-1] == math.prod(self.image_shape) else x.shape[: x.dim() - 3]
        features = self.convs(x.reshape(-1, *self.image_shape)).flatten(1)
        return self.head(features).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """z [..., latent_dim] -> [..., P C H W]: an MLP, then transposed convolutions back to the image size.

    The last layer has P C output channels (no activation after it): P parameters of each of
    the C channels, ordered parameter-major so that flattening gives the layout of the module
    docstring.
    """

    def __init__(self, latent_dim: int, image_shape: Sequence[int], conv_channels: Sequence[int],
                 hidden_sizes: Sequence[int], params_per_dim: int, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise PplVaeError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        c, h, w = self.image_shape = _check_image_shape(image_shape, conv_channels)
        sides = _sides(h, w, len(conv_channels))
        self.start_shape = (conv_channels[-1], *sides[-1])
        self.head = nn.Sequential(
            mlp(latent_dim, list(reversed(hidden_sizes)), math.prod(self.start_shape), activation),
            ACTIVATIONS[activation](),
        )
        widths = [*reversed(conv_channels), params_per_dim * c]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            (h_in, w_in), (h_out, w_out) = sides[-1 - i], sides[-2 - i]
            # A transposed convolution doubles a side; output_padding adds the pixel that rounding down took away.
            extra = (h_out - STRIDE * h_in, w_out - STRIDE * w_in)
            layers.append(nn.ConvTranspose2d(n_in, n_out, KERNEL, STRIDE, PADDING, output_padding=extra))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        out = self.deconvs(self.head(z).reshape(-1, *self.start_shape))
        return out.reshape(*lead, -1)


def encoder_net(data_dim: int, hidden_sizes: Sequence[int], out_features: int, activation: str = "tanh",
                network: str = "mlp", image_shape: Sequence[int] | None = None,
                conv_channels: Sequence[int] = (32, 64), **_) -> nn.Module:
    """The trunk of a guide, [..., D] -> [..., out_features]: an MLP, or a :class:`ConvEncoder` for ``network="conv"``."""
    if network == "mlp":
        return mlp(data_dim, hidden_sizes, out_features, activation)
    if network == "conv":
        return ConvEncoder(image_shape, conv_channels, hidden_sizes, out_features, activation)
    raise PplVaeError(f"unknown network {network!r}: choose one of {', '.join(NETWORKS)}")


def decoder_net(latent_dim: int, data_dim: int, params_per_dim: int, hidden_sizes: Sequence[int],
                activation: str = "tanh", network: str = "mlp", image_shape: Sequence[int] | None = None,
                conv_channels: Sequence[int] = (32, 64), **_) -> nn.Module:
    """The decoder, z [..., latent_dim] -> [..., params_per_dim D]: an MLP or a :class:`ConvDecoder`."""
    if network == "mlp":
        return mlp(latent_dim, hidden_sizes, data_dim * params_per_dim, activation)
    if network == "conv":
        return ConvDecoder(latent_dim, image_shape, conv_channels, hidden_sizes, params_per_dim, activation)
    raise PplVaeError(f"unknown network {network!r}: choose one of {', '.join(NETWORKS)}")

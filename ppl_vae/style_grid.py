r"""The style/class grid of Kingma et al. (2014, Fig. 1): one style z per row, one class y per column.

For a program with a class label y and a continuous "style" z (the semi-supervised M2: p(y) p(z) p(x | y, z),
q(y | x) q(z | x, y); or a conditional VAE given the labels), row r of the grid takes a test image x_r, infers its
style as the mean of the guide's q(z | x_r, y_r) (y_r its label, or the classifier's most probable class where the
data has no labels), and decodes that one z with every class c:

.. math:: \text{grid}[r, c] = E[x \mid z_r, y = c], \qquad z_r = E_{q(z | x_r, y_r)}[z].

Column 0 shows x_r itself. With ``prior=True`` each row's z is drawn from the model's prior instead (the
model's own draw of the style site given y_r), with no source column.

Nothing here is specific to M2: the guide is run as ``guide(x, y)`` (the labels as its second argument, as every
program with the ``model(x, y=None)`` convention takes them) and must then draw exactly one latent site (the
style); the decoder is the model itself, replayed with that site held at z_r
(``poutine.condition``) and y = c, and E[x | z, y] is the mean of its one observed image site. A program that does
not fit is one :class:`~ppl_vae.errors.ModelStructureError` line saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn

from .errors import ModelStructureError
from .semisupervised import label_distribution


@dataclass
class StyleGrid:
    """A style/class grid: ``images`` [R, 1 + C, D] in [0, 1] (column 0 the source image; [R, C, D] for prior rows),
    ``styles`` [R, ...] (the z of each row), ``labels`` [R] (the class each row's z was inferred or drawn with),
    ``style_site`` (the style site's name)."""

    images: torch.Tensor
    styles: torch.Tensor
    labels: torch.Tensor
    style_site: str


def _latent_sites(trace: Any, skip: str) -> dict[str, Any]:
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site) and name != skip}


def _style_site(program_fn: Any, role: str, x: torch.Tensor, labels: torch.Tensor, label_site: str
                ) -> tuple[str, dict[str, Any]]:
    """The one latent site ``program_fn(x, labels)`` draws besides the label: the style z (else one line)."""
    sites = _latent_sites(poutine.trace(program_fn).get_trace(x, labels), label_site)
    if len(sites) != 1:
        raise ModelStructureError(f"given x and y the {role} draws the latent sites {sorted(sites)}; the style/class "
                                  "grid needs exactly one (the style z of each image)")
    return next(iter(sites.items()))


def infer_styles(program: nn.Module, x: torch.Tensor, labels: torch.Tensor, label_site: str = "y"
                 ) -> tuple[str, torch.Tensor]:
    """(the style site's name, E_q[z | x, y] [N, ...]) from ``program.guide(x, labels)``: its one latent site's mean."""
    name, site = _style_site(program.guide, "guide", x, labels, label_site)
    try:
        mean = site["fn"].mean
    except NotImplementedError:
        raise ModelStructureError(f"the guide's style site {name!r} ({type(site['fn']).__name__}) has no mean to "
                                  "take as the image's style") from None
    return name, mean


def prior_styles(program: nn.Module, x: torch.Tensor, labels: torch.Tensor, label_site: str = "y"
                 ) -> tuple[str, torch.Tensor]:
    """(the style site's name, z ~ p(z | y) [N, ...]): the model's own draw of its one latent site given the labels."""
    name, site = _style_site(program.model, "model", x, labels, label_site)
    return name, site["value"]


def decode_classes(program: nn.Module, styles: torch.Tensor, style_site: str, num_classes: int,
                   like: torch.Tensor, label_site: str = "y") -> torch.Tensor:
    """E[x | z_r, y = c] for every row's style z_r and every class c: [R, C, D] (the model replayed at z = z_r).

    All R * C decodings are one model call: z_r repeated C times (so every class of a row decodes the same z),
    y = 0, ..., C - 1 for each row. ``like[0]`` is the observed image the model is given (unused by E[x]).
    """
    rows = styles.shape[0]
    z = styles.repeat_interleave(num_classes, 0)  # row r's z for each of its C columns
    y = torch.arange(num_classes, device=styles.device).repeat(rows)
    x = like[:1].expand(rows * num_classes, *like.shape[1:])
    trace = poutine.trace(poutine.condition(program.model, data={style_site: z})).get_trace(x, y)
    mean = image_mean(trace, (label_site, style_site))
    return mean.reshape(rows, num_classes, -1).clamp(0, 1)


def image_mean(trace: Any, skip: tuple[str, ...] = ()) -> torch.Tensor:
    """E[x | the trace's latents]: the mean of the model trace's one observed site not in ``skip`` (the image)."""
    images = [name for name, site in trace.nodes.items()
              if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site) and name not in skip]
    if len(images) != 1:
        raise ModelStructureError(f"the model observes the sites {images}{' besides ' + ', '.join(skip) if skip else ''};"
                                  " the figure decodes one observed image site")
    try:
        return trace.nodes[images[0]]["fn"].mean
    except NotImplementedError:
        raise ModelStructureError(f"the model's image site {images[0]!r} has no mean E[x | latents] to draw") from None


def number_of_classes(program: nn.Module, x: torch.Tensor, label_site: str = "y") -> int:
    """C: the support size of the guide's label site q(y | x), else the program's ``num_classes`` attribute."""
    try:
        q = label_distribution(program.guide, (x[:1],), label_site)
    except (ModelStructureError, TypeError):  # no label site on x alone: a program given the labels as data
        q = None
    if q is not None and getattr(q, "has_enumerate_support", False):
        return int(q.enumerate_support(expand=False).shape[0])
    classes = getattr(program, "num_classes", None)
    if not isinstance(classes, int) or classes < 1:
        raise ModelStructureError(f"the guide draws no discrete label site {label_site!r} on x alone and the program "
                                  "has no num_classes attribute: the style/class grid needs the classes")
    return classes


@torch.no_grad()
def style_grid(program: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None, label_site: str = "y",
               prior: bool = False) -> StyleGrid:
    """The style/class grid of the test images ``x`` [R, ...] (module docstring); ``labels`` [R] int64 are the
    classes their styles are inferred with (None: the most probable class under q(y | x)).

    ``prior``: each row's z drawn from the model's prior p(z | y) given the row's label instead (p(z) for M2),
    and no source column: ``images`` [R, C, D].
    """
    classes = number_of_classes(program, x, label_site)
    if labels is None:
        q = label_distribution(program.guide, (x,), label_site)
        labels = q.probs.argmax(-1) if hasattr(q, "probs") else q.mean.round().long()
    styles_of = prior_styles if prior else infer_styles
    name, styles = styles_of(program, x, labels, label_site)
    decoded = decode_classes(program, styles, name, classes, x, label_site)
    if prior:
        return StyleGrid(decoded, styles, labels, name)
    images = torch.cat([x.reshape(x.shape[0], 1, -1).to(decoded.dtype), decoded], 1)
    return StyleGrid(images, styles, labels, name)


@torch.no_grad()
def model_samples(program: nn.Module, num_samples: int, like: torch.Tensor, cond: tuple[torch.Tensor, ...] = ()
                  ) -> torch.Tensor:
    r"""Samples of any program's model without a ``sample_prior``: every latent site drawn from the model's prior
    (the model run on its own, e.g. for M2 y ~ p(y), z ~ p(z)) and the image's mean given them,
    :math:`E[x \mid y, z]`: [num_samples, D] in [0, 1]. ``like[:1]`` is the image the model is given as observed
    (its shape only: a generative model draws its latents before it meets x). ``cond``: the data a conditional
    model takes after x (``--cond``), one row per sample, given as in training: samples of :math:`p(x \mid c)`,
    :math:`E[x \mid z, c]` with z from its prior given c."""
    x = like[:1].expand(num_samples, *like.shape[1:])
    trace = poutine.trace(program.model).get_trace(x, *cond)
    return image_mean(trace).reshape(num_samples, -1).clamp(0, 1)


@torch.no_grad()
def class_reconstructions(program: nn.Module, x: torch.Tensor, label_site: str = "y") -> torch.Tensor:
    r"""Reconstructions through the label: :math:`E[x \mid z, \hat y]` with :math:`\hat y = \arg\max_y q(y | x)`
    (the classifier) and :math:`z = E_{q(z | x, \hat y)}[z]` (the guide given that class), for a program with a
    discrete label site on x alone (M2 and any program of its convention): [R, D] in [0, 1]."""
    q = label_distribution(program.guide, (x,), label_site)
    labels = q.probs.argmax(-1) if hasattr(q, "probs") else q.mean.round().long()
    name, styles = infer_styles(program, x, labels, label_site)
    trace = poutine.trace(poutine.condition(program.model, data={name: styles})).get_trace(x, labels)
    return image_mean(trace, (label_site, name)).reshape(x.shape[0], -1).clamp(0, 1)

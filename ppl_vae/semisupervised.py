r"""Semi-supervised training and evaluation for programs with a discrete label site (Kingma et al. 2014, M2).

A program with the convention ``model(x, y=None)`` / ``guide(x, y=None)`` observes the label y in the model
when given it (a *labelled* batch: the bound L(x, y) on log p(x, y)) and has a guide site for y otherwise
(an *unlabelled* batch: y enumerated, the bound U(x) on log p(x)). Neither bound trains the classifier
q(y | x) on the labelled data, so Kingma et al. add a classification term:

.. math:: \mathcal{J}^\alpha = \sum_{(x, y) \in \text{labelled}} L(x, y) + \sum_{x \in \text{unlabelled}} U(x)
          + \alpha \, E_{\text{labelled}}[\log q(y | x)],

alpha = 0.1 N by default (N the number of training images), E_labelled the mean over the N_l labelled images.
With every image visited once per epoch (:func:`ppl_vae.data.labelled.semi_supervised_batches`), the term is
``weight = alpha / N_l`` times sum log q(y_i | x_i) over each labelled batch (:func:`classifier_weight`).

How it enters the objective (:class:`SemiSupervised`): on a labelled batch the trainer's model also has an
observed site ``_ppl_vae_classifier`` ~ q(y | x) at the labels, under ``poutine.scale(weight)``, as Pyro's
``ss_vae`` example does -- but q(y | x) is read from the program's *own guide* (run on x alone and stopped at
its label site, :func:`label_distribution`), so any program with the convention trains with it, and no
auxiliary site or classifier method has to be written into the program. The site lives only in the
training wrapper: the program the run saves, and every evaluation, are the unscaled M2 (the evidence is of
log p(x), or log p(x, y) on labelled data, never including the classifier term).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.runtime import NonlocalExit
from torch import nn

from .errors import InvalidDataError, ModelStructureError
from .modes import evaluation_mode

CLASSIFIER_SITE = "_ppl_vae_classifier"
DEFAULT_ALPHA_FACTOR = 0.1  # Kingma et al. (2014): alpha = 0.1 * N


def label_distribution(guide: Callable, data: tuple[torch.Tensor, ...], label_site: str = "y") -> Any:
    """q(y | x): the distribution of the guide's ``label_site`` when the guide runs on ``data`` (x alone).

    The guide stops at that site (``poutine.escape``), before drawing anything, and the run is hidden from
    every handler outside (``poutine.block``), so this can be called inside a model that is being traced.
    The distribution's batch shape is that of the guide's data plate, e.g. [N] for Categorical logits [N, C].
    """
    try:
        with poutine.block():
            poutine.escape(guide, escape_fn=lambda msg: msg["type"] == "sample" and msg["name"] == label_site)(*data)
    except NonlocalExit as exit_:
        # Not exit_.reset_stack(): that resets every handler down to a hiding block, and the block has already
        # exited here, so it would clear the caller's own trace. The handlers the exception left did pop themselves.
        return exit_.site["fn"]
    raise ModelStructureError(
        f"the guide has no sample site {label_site!r} when run on x alone: the label site (--label-site) must be a "
        f"discrete site the guide draws for unlabelled data, guide(x) with y=None"
    )


def classifier_weight(num_labelled: int, num_train: int, alpha: float | None = None) -> float:
    """The weight of sum log q(y_i | x_i) over a labelled batch: alpha / N_l, alpha = 0.1 N unless given."""
    if num_labelled < 1:
        raise InvalidDataError(f"the number of labelled images must be positive, got {num_labelled}")
    alpha = DEFAULT_ALPHA_FACTOR * num_train if alpha is None else float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise InvalidDataError(f"--alpha (the classifier term's weight) must be a finite number >= 0, got {alpha}")
    return alpha / num_labelled


class SemiSupervised(nn.Module):
    """The program the trainer optimizes for semi-supervised data: ``program`` plus the classifier term.

    ``model(x)`` / ``guide(x)``: the program's, unchanged (y enumerated where the guide marks it).
    ``model(x, y)`` / ``guide(x, y)``: the program's, plus (model only) ``weight * log q(y | x)`` as the observed
    site :data:`CLASSIFIER_SITE`, q(y | x) from the guide's ``label_site`` (:func:`label_distribution`). The
    site is a vector event over the batch (``to_event``), so it needs no plate of its own and the particle
    plate, when there is one, counts it once per particle, as every other site.

    ``labelled_scale`` multiplies every term of a labelled batch (model, guide and the classifier site): below 1
    when the batches cycle through the labelled set more than once per epoch
    (:func:`ppl_vae.data.labelled.labelled_scale`), so the epoch's objective still counts each labelled image once.
    """

    def __init__(self, program: nn.Module, weight: float, label_site: str = "y", labelled_scale: float = 1.0):
        super().__init__()
        self.program, self.weight, self.label_site = program, float(weight), label_site
        self.labelled_scale = float(labelled_scale)
        if hasattr(program, "register_params"):
            self.register_params = False

    def model(self, x: torch.Tensor, *labels: torch.Tensor) -> Any:
        if not labels:
            return self.program.model(x)
        with poutine.scale(scale=self.labelled_scale):
            result = self.program.model(x, *labels)
            if self.weight > 0:
                q = label_distribution(self.program.guide, (x,), self.label_site)
                with poutine.scale(scale=self.weight):
                    pyro.sample(CLASSIFIER_SITE, q.to_event(len(q.batch_shape)), obs=labels[-1])
        return result

    def guide(self, x: torch.Tensor, *labels: torch.Tensor) -> Any:
        if not labels:
            return self.program.guide(x)
        with poutine.scale(scale=self.labelled_scale):
            return self.program.guide(x, *labels)


def classification_error(
    program: nn.Module, x: torch.Tensor, labels: torch.Tensor, label_site: str = "y", batch_size: int = 1000,
) -> tuple[float, float]:
    """The classifier's test error from q(y | x) and its standard error: (e, sqrt(e (1 - e) / N)), fractions.

    The prediction is the most probable value of the guide's ``label_site`` under q(y | x) (its enumerated support,
    so any discrete site: Categorical, Bernoulli, ...). Runs in eval mode without gradients, in batches.
    """
    if labels.shape[:1] != x.shape[:1]:
        raise InvalidDataError(f"{labels.shape[0]} labels for {x.shape[0]} images: give one label per image")
    wrong = 0
    with torch.no_grad(), evaluation_mode(program):
        for start in range(0, x.shape[0], batch_size):
            q = label_distribution(program.guide, (x[start:start + batch_size],), label_site)
            if not getattr(q, "has_enumerate_support", False):
                raise ModelStructureError(f"the guide's label site {label_site!r} is {type(q).__name__}, not a "
                                          "discrete distribution: there is no class to predict")
            support = q.enumerate_support(expand=False)  # [C, 1, ..., 1]: the C values, broadcast over the batch
            predicted = support.reshape(support.shape[0])[q.log_prob(support).argmax(0)]
            wrong += int((predicted.to(labels.device).long() != labels[start:start + batch_size].long()).sum())
    error = wrong / x.shape[0]
    return error, math.sqrt(error * (1 - error) / x.shape[0])


def label_error_summary(program: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
                        label_site: str = "y") -> dict[str, Any]:
    """The classifier's error on ``x`` as the entries of an evaluation result (test.json, evaluation.json):
    ``classification_error`` and its standard error (fractions, :func:`classification_error`) and the label site."""
    if labels is None:
        raise InvalidDataError(f"the classifier's error needs the split's labels, and the data have none (label site "
                               f"{label_site!r})")
    error, stderr = classification_error(program, x, labels, label_site)
    return {"classification_error": error, "classification_error_stderr": stderr, "label_site": label_site}

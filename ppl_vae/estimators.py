r"""Evidence bounds and estimates, per datapoint, for any Pyro model/guide pair.

Both programs take the batch ``x`` and put its leading dimension in a vectorized
``pyro.plate`` (the *data plate*; :mod:`ppl_vae.inspection` finds it and the sites). Every
density comes from the distributions the programs themselves sample from. All values are in
nats, per datapoint. Each estimator's math is in its docstring: :func:`elbo_decomposition`
(the ELBO, its reconstruction term and one KL term per latent site) and
:func:`evidence_estimate` (the importance-sampled log p(x), the IWAE bound). Both stream over
chunks of particles and of data (:mod:`ppl_vae.chunking`).

Every estimate runs the programs in eval mode without gradients (:mod:`ppl_vae.modes`: Dropout
off, BatchNorm on its running statistics, which the evaluation leaves untouched), whatever mode
the module was in, and restores that mode afterwards.

Scale factors from ``poutine.scale`` (a KL weight beta, subsampling scales) are
ignored here on purpose: these functions report the unscaled model, which is
what log p(x) means. Masks (``poutine.mask``) are respected.

The computations are written here rather than taken from
``pyro.infer.importance.Importance``, because that class keeps every trace in
memory and returns one evidence value for the whole batch, not one per
datapoint; the per-site bookkeeping of ``Trace_ELBO`` is likewise summed over
the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .chunking import EvaluationPlan, iter_chunk_terms, plan_evaluation
from .errors import ModelStructureError
from .inspection import ProgramStructure


def elbo_decomposition(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int = 10,
    kl: str = "auto",
    chunk_size: int | None = None,
    particles_per_chunk: int | None = None,
    data_plate: str | None = None,
    progress: bool | str = False,
) -> dict:
    r"""Per-datapoint ELBO, reconstruction term and KL term per latent site, averaged over ``num_samples`` draws.

    With z ~ q(z | x) and latent sites i (parents pa_i),

    .. math::

        \mathrm{ELBO}(x) = \underbrace{E_q[\log p(x | z)]}_{\text{reconstruction}}
                           - \sum_i \underbrace{E_q[\log q(z_i | \cdot) - \log p(z_i | pa_i)]}_{\mathrm{KL}_i}

    where the reconstruction term sums every observed site (and is also given per observed site). Each KL_i is
    computed analytically with ``torch.distributions.kl_divergence`` when a rule is registered for the pair of
    distributions and the parents pa_i stay fixed while z_i varies (:func:`ppl_vae.inspection.inspect_program`;
    the expectation over the parents stays Monte Carlo), and by Monte Carlo otherwise; the result says which.
    The ELBO is defined as reconstruction minus the KL terms, so the decomposition sums to it.

    ``model(x, *cond)`` and ``guide(x, *cond)``: every positional tensor after the guide
    is per-datapoint data (one row per datapoint of x, e.g. labels y of a conditional
    VAE), passed to both programs; options are keyword-only.

    Returns a dict of float64 CPU tensors of shape [N], in nats:

    * ``"elbo"`` -- reconstruction minus the sum of the KL terms;
    * ``"reconstruction"`` -- E_q[log p(x | z)], summed over every observed site;
    * ``"reconstruction_by_site"`` -- a dict from each observed site's name to its term (they sum to the above);
    * ``"observed_data"`` -- a dict from each observed site's name to the data argument it observes;
    * ``"quantity"`` -- what the evidence of these programs is of, e.g. ``"log p(x | y)"``
      (:func:`~ppl_vae.inspection.evidence_quantity`);
    * ``"kl"`` -- a dict from each latent site's name to its KL(q || p) term;
    * ``"kl_method"`` -- a dict from each latent site's name to ``"analytic"`` or ``"monte carlo"``;
    * ``"kl_reason"`` -- for each Monte Carlo site, why (no rule registered, parents drawn
      after it in the guide, or ``kl="mc"``);
    * ``"num_samples"`` -- the number of draws from the guide per datapoint;
    * ``"enumerated"`` -- the guide sites marked for enumeration (site -> mark): their expectation is taken
      exactly, a sum over their values weighted by q, not drawn (:mod:`ppl_vae.enumerated`), here and in
      :func:`evidence_estimate`, whose log p̂(x) is then log sum_y p̂(x, y).

    ``kl="mc"`` forces Monte Carlo KL everywhere; then the ELBO is exactly the
    mean log importance weight, the quantity ``Trace_ELBO`` estimates.
    """
    plan = plan_evaluation(
        model, guide, x, *cond, num_samples=num_samples, chunk_size=chunk_size,
        particles_per_chunk=particles_per_chunk, data_plate=data_plate, kl=kl,
    )
    totals = _summed_terms(model, guide, (x, *cond), plan, progress)
    return _decomposition(totals, plan.structure, plan.num_samples)


@dataclass
class _TermTotals:
    """Each term of the ELBO summed over the particles, per datapoint (float64 CPU tensors of shape [N])."""

    reconstruction: torch.Tensor
    by_site: dict[str, torch.Tensor]
    kl: dict[str, torch.Tensor]


def _summed_terms(
    model: Callable, guide: Callable, data: tuple[torch.Tensor, ...], plan: EvaluationPlan, progress: bool | str,
) -> _TermTotals:
    """Stream the chunks of ``plan`` and add each chunk's terms, summed over its particles, into its rows.

    Sums are kept in float64 on the CPU whatever the programs' dtype and device, so the chunk sizes do not change
    the result beyond float64 rounding.
    """
    n = data[0].shape[0]
    structure = plan.structure
    totals = _TermTotals(
        reconstruction=torch.zeros(n, dtype=torch.float64),
        by_site={name: torch.zeros(n, dtype=torch.float64) for name in structure.observed_sites},
        kl={name: torch.zeros(n, dtype=torch.float64) for name in structure.latent_sites},
    )
    for rows, terms in iter_chunk_terms(model, guide, data, plan, progress):
        totals.reconstruction[rows] += terms.reconstruction.double().sum(0).cpu()
        for name, value in terms.reconstruction_by_site.items():
            totals.by_site[name][rows] += value.double().sum(0).cpu()
        for name, value in terms.kl.items():
            totals.kl[name][rows] += value.double().sum(0).cpu()
    return totals


def _decomposition(totals: _TermTotals, structure: ProgramStructure, num_samples: int) -> dict:
    """The result of :func:`elbo_decomposition`: the particle means, the ELBO they make, and what the program is.

    ELBO = reconstruction - sum_i KL_i, from the means, so the returned decomposition sums to the returned ELBO.
    """
    reconstruction = totals.reconstruction / num_samples
    kl_terms = {name: total / num_samples for name, total in totals.kl.items()}
    return {
        "elbo": reconstruction - sum(kl_terms.values()),
        "reconstruction": reconstruction,
        "reconstruction_by_site": {name: total / num_samples for name, total in totals.by_site.items()},
        "observed_data": dict(structure.observed_data),
        "quantity": structure.quantity,
        "kl": kl_terms,
        "kl_method": dict(structure.kl_methods),
        "kl_reason": dict(structure.kl_reasons),
        "num_samples": num_samples,
        "enumerated": dict(structure.enumerated),
    }


@dataclass
class EvidenceEstimate:
    """Per-datapoint importance-sampling results (float64 CPU tensors of shape [N]).

    * ``log_evidence`` -- log p̂(x) = log mean_k w_k, in nats;
    * ``stderr`` -- its delta-method standard error, sqrt(Var(w) / K) / mean(w), in nats;
    * ``ess`` -- the effective sample size (sum w)^2 / sum w^2 of the K weights.
    """

    log_evidence: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    num_samples: int


def evidence_estimate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    particles_per_chunk: int | None = None,
    data_plate: str | None = None,
    progress: bool | str = False,
) -> EvidenceEstimate:
    r"""Importance-sampled log p(x) per datapoint, with its standard error and effective sample size.

    With K = ``num_samples`` draws z_k ~ q(z | x),

    .. math::

        \log \hat p(x) = \log \frac{1}{K} \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k | x)},

    the IWAE bound of Burda et al. (2015): E[log p̂(x)] <= log p(x), it increases with K and tends to log p(x).
    The log-sum-exp is accumulated in float64 over chunks of particles and of data
    (:func:`ppl_vae.chunking.iter_chunk_terms`), so memory stays bounded whatever K is.

    Positional tensors after x are per-datapoint conditioning data, as in
    :func:`elbo_decomposition`; with them the estimate is of log p(x | y) where they are only
    inputs, and of log p(x, y) where a site observes them (:func:`~ppl_vae.inspection.evidence_quantity`).
    Streams over chunks: it keeps log sum_k w_k and log sum_k w_k^2 in float64.
    """
    plan = plan_evaluation(
        model, guide, x, *cond, num_samples=num_samples, chunk_size=chunk_size,
        particles_per_chunk=particles_per_chunk, data_plate=data_plate, kl="mc",
    )
    log_sum_w = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
    log_sum_w2 = log_sum_w.clone()
    for rows, terms in iter_chunk_terms(model, guide, (x, *cond), plan, progress):
        log_w = terms.log_weight.double().cpu()
        log_sum_w[rows] = torch.logaddexp(log_sum_w[rows], torch.logsumexp(log_w, 0))
        log_sum_w2[rows] = torch.logaddexp(log_sum_w2[rows], torch.logsumexp(2 * log_w, 0))
    return evidence_from_weight_sums(log_sum_w, log_sum_w2, plan.num_samples)


def evidence_from_weight_sums(log_sum_w: torch.Tensor, log_sum_w2: torch.Tensor, num_samples: int) -> EvidenceEstimate:
    """log p̂(x), its delta-method standard error and the ESS from log sum_k w_k and log sum_k w_k^2 per datapoint."""
    log_evidence = log_sum_w - math.log(num_samples)
    # Var(w)/mean(w)^2 = K * sum w^2 / (sum w)^2 - 1; the standard error of the mean weight,
    # relative to the mean, is the square root of that over K (delta method for the log).
    # With K = 1 the spread of the weights is unknown: the standard error is undefined (NaN), not 0.
    ratio = torch.exp(log_sum_w2 - 2 * log_sum_w)
    stderr = torch.sqrt(torch.clamp(ratio - 1.0 / num_samples, min=0.0))
    if num_samples == 1:
        stderr = torch.full_like(stderr, math.nan)
    ess = 1.0 / ratio
    bad = ~torch.isfinite(log_evidence)
    if bad.any():
        raise ModelStructureError(
            f"{int(bad.sum())} datapoint(s) got a non-finite evidence estimate (first at index "
            f"{int(bad.nonzero()[0])}): every importance weight was 0 or NaN; check the data lies in the "
            "likelihood's support and the networks give finite outputs"
        )
    return EvidenceEstimate(log_evidence, stderr, ess, num_samples)


def log_evidence(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    particles_per_chunk: int | None = None,
    data_plate: str | None = None,
    progress: bool | str = False,
) -> torch.Tensor:
    """log p̂(x) = log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x): a float64 CPU tensor [N], in nats.

    The IWAE bound with K = ``num_samples``; see :func:`evidence_estimate` for its
    standard error and effective sample size, and for conditioning data after x.
    """
    return evidence_estimate(
        model, guide, x, *cond, num_samples=num_samples, chunk_size=chunk_size,
        particles_per_chunk=particles_per_chunk, data_plate=data_plate, progress=progress,
    ).log_evidence

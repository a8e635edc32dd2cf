"""Dataset summaries of per-datapoint results: means with standard errors, bits per dimension, the evaluation table.

:func:`evaluation_summary` runs (or reuses) the two estimators of :mod:`ppl_vae.estimators` and
reports every quantity as its mean over the datapoints with the standard error of that mean
(:func:`mean_and_stderr`); :func:`bits_per_dim` puts log-likelihoods of 8-bit data on one scale.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .errors import InvalidDataError
from .estimators import EvidenceEstimate, elbo_decomposition, evidence_estimate


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """The mean of per-datapoint values and the standard error of that mean (sample std / sqrt(N))."""
    values = values.double()
    n = values.numel()
    if n == 0:
        raise InvalidDataError("cannot average an empty set of values")
    stderr = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), stderr


DEQUANTIZED_LEVELS = 256


def bits_per_dim(log_likelihood: torch.Tensor, num_dims: int, dequantized: bool) -> torch.Tensor:
    """Convert per-datapoint log-likelihoods in nats to bits per dimension of 8-bit data.

    For a probability mass on the 256 levels: -log P(x) / (D ln 2). For a density on
    [0, 1]^D evaluated at uniformly dequantized data y = (k + u)/256 (``dequantized``):
    log P(k) >= log p(y) - D log 256 in expectation over u, so the bits/dim are
    -(log p(y) - D log 256) / (D ln 2), an upper bound on the discrete model's.
    """
    offset = num_dims * math.log(DEQUANTIZED_LEVELS) if dequantized else 0.0
    return -(log_likelihood - offset) / (num_dims * math.log(2))


def _summary(values: torch.Tensor) -> dict[str, float]:
    mean, stderr = mean_and_stderr(values)
    return {"mean": mean, "stderr": stderr}


def evaluation_summary(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int = 5000,
    elbo_samples: int = 10,
    chunk_size: int | None = None,
    data_plate: str | None = None,
    progress: bool = False,
    levels: str | None = None,
    evidence: EvidenceEstimate | None = None,
    decomposition: dict | None = None,
) -> dict[str, Any]:
    """Dataset means, with standard errors over datapoints, of every per-datapoint quantity (nats/datapoint).

    Positional tensors after x are per-datapoint conditioning data, as in
    :func:`~ppl_vae.estimators.elbo_decomposition`. Returns a JSON-ready dict: ``quantity`` (what the evidence is
    of, e.g. ``"log p(x | y)"``), ``observed_sites`` (the data argument each observed site
    observes), ``elbo``, ``reconstruction`` (and ``reconstruction_by_site``),
    ``kl`` (``total`` and per ``sites``, each with its method, and for Monte Carlo sites the
    reason), ``log_evidence`` (with K and the mean
    per-datapoint Monte Carlo standard error) and ``gap`` = log p̂(x) - ELBO, each
    as ``{"mean": ..., "stderr": ...}``. The standard error is that of the
    dataset mean: sample std over datapoints / sqrt(N).

    ``levels`` says what the data are when they are 8-bit images: ``"discrete"``
    (a mass on the 256 levels) or ``"dequantized"`` (a density at dequantized
    levels); then ``bits_per_dim`` holds the ELBO and log p̂(x) on that one scale.
    ``evidence`` reuses an :class:`~ppl_vae.estimators.EvidenceEstimate` already computed for ``x``
    (e.g. by :func:`ppl_vae.diagnostics.evidence_with_psis`) instead of drawing anew, and
    ``decomposition`` reuses a result of :func:`~ppl_vae.estimators.elbo_decomposition` on ``x`` (e.g. gathered
    from several processes by :func:`ppl_vae.distributed.evaluate_per_datapoint`); then
    ``elbo_samples`` is taken from it.
    """
    if levels not in (None, "discrete", "dequantized"):
        raise InvalidDataError(f"levels must be None, 'discrete' or 'dequantized', got {levels!r}")
    if decomposition is None:
        decomposition = elbo_decomposition(
            model, guide, x, *cond, num_samples=elbo_samples, chunk_size=chunk_size, data_plate=data_plate,
            progress="ELBO" if progress else False,
        )
    elbo_samples = decomposition["num_samples"]
    if evidence is None:
        evidence = evidence_estimate(
            model, guide, x, *cond, num_samples=num_samples, chunk_size=chunk_size, data_plate=data_plate,
            progress=f"log p(x), K={num_samples}" if progress else False,
        )
    num_samples = evidence.num_samples
    result = {
        "units": "nats per datapoint",
        # What log_evidence estimates (and the ELBO bounds): "log p(x)", "log p(x | y)", "log p(x, y)".
        "quantity": decomposition["quantity"],
        "observed_sites": dict(decomposition["observed_data"]),
        "num_datapoints": int(x.shape[0]),
        "elbo_samples": elbo_samples,
        "elbo": _summary(decomposition["elbo"]),
        "reconstruction": _summary(decomposition["reconstruction"]),
        "reconstruction_by_site": {name: _summary(value) for name, value in decomposition["reconstruction_by_site"].items()},
        "kl": _kl_summary(decomposition),
        "log_evidence": {
            **_summary(evidence.log_evidence),
            "num_samples": num_samples,
            # With K = 1 a datapoint's Monte Carlo standard error is undefined (one weight has no spread).
            "mean_mc_stderr": evidence.stderr.mean().item() if num_samples > 1 else None,
            "mean_ess": evidence.ess.mean().item(),
        },
        "gap": _summary(evidence.log_evidence - decomposition["elbo"]),
    }
    if levels is not None:
        result["bits_per_dim"] = _bits_per_dim_summary(decomposition["elbo"], evidence.log_evidence, x, levels)
    return result


def _kl_summary(decomposition: dict) -> dict[str, Any]:
    """The total KL term and each site's, with its method and, for a Monte Carlo site, the reason."""
    kl_total = sum(decomposition["kl"].values())
    return {
        "total": _summary(kl_total),
        "sites": {
            name: {
                **_summary(value), "method": decomposition["kl_method"][name],
                **({"reason": decomposition["kl_reason"][name]} if name in decomposition.get("kl_reason", {}) else {}),
                # An enumerated site's expectation is an exact sum over its values (ppl_vae.enumerated), not drawn.
                **({"enumerated": True} if name in decomposition.get("enumerated", {}) else {}),
            }
            for name, value in decomposition["kl"].items()
        },
    }


def _bits_per_dim_summary(
    elbo: torch.Tensor, log_evidence: torch.Tensor, x: torch.Tensor, levels: str
) -> dict[str, Any]:
    """The ELBO and log p̂(x) in bits per dimension of x's 8-bit data (``levels``: discrete or dequantized)."""
    num_dims = math.prod(x.shape[1:])
    dequantized = levels == "dequantized"
    return {
        "elbo": _summary(bits_per_dim(elbo, num_dims, dequantized)),
        "log_evidence": _summary(bits_per_dim(log_evidence, num_dims, dequantized)),
        "method": "density at uniformly dequantized levels, minus D log 256" if dequantized
        else "probability of the 256 discrete levels",
    }

r"""Per-datapoint evaluation that gives the same numbers on any number of processes.

The datapoints are cut into fixed blocks of consecutive indices (:data:`EVALUATION_BLOCK_SIZE`); block b
is evaluated with Pyro's random streams seeded from (seed, b) alone, the blocks are dealt round-robin to
the processes of the process group (:mod:`ppl_vae.process_group`; one process outside one), and the
per-datapoint results are all-gathered and put back in datapoint order. The result therefore does not
depend on the number of processes (exactly, on the CPU). Training's learning curve, ``ppl-vae evaluate``
and the experiments use it; it imports nothing from training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import PplVaeError
from .evaluate import (
    AisSettings,
    EvidenceEstimate,
    ais_log_evidence,
    check_data,
    elbo_decomposition,
    evidence_estimate,
)
from .process_group import all_gather_objects, derive_seed, rank_and_size, seeded

# Datapoints per evaluation block: the unit of seeding and of work sharing (see evaluate_per_datapoint).
EVALUATION_BLOCK_SIZE = 100


@dataclass
class PerDatapointEvaluation:
    """Per-datapoint results over all of ``x``, in datapoint order (float64 CPU tensors [N]).

    * ``decomposition`` -- as :func:`ppl_vae.evaluate.elbo_decomposition` returns (None when not asked for);
    * ``evidence`` -- an :class:`~ppl_vae.evaluate.EvidenceEstimate` (None when not asked for);
    * ``psis`` -- as the second value of :func:`ppl_vae.diagnostics.evidence_with_psis` (None unless asked for).
    """

    decomposition: dict | None
    evidence: EvidenceEstimate | None
    psis: dict | None
    acceptance: torch.Tensor | None = None  # AIS's mean HMC acceptance probability per datapoint (``ais`` only)


PSIS_PER_DATAPOINT = ("khat", "unreliable", "ess", "log_evidence", "psis_log_evidence")


def evaluate_per_datapoint(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int | None = None,
    elbo_samples: int | None = None,
    seed: int = 0,
    psis: bool = False,
    chunk_size: int | None = None,
    block_size: int = EVALUATION_BLOCK_SIZE,
    progress: bool = False,
    ais: AisSettings | dict[str, Any] | None = None,
) -> PerDatapointEvaluation:
    """Importance-sampled log p(x) with ``num_samples`` draws and the ELBO decomposition with ``elbo_samples``, per datapoint.

    Positional tensors after x are per-datapoint conditioning data (as in
    :func:`ppl_vae.evaluate.elbo_decomposition`), cut into the same blocks as x.
    The datapoints are cut into blocks of ``block_size`` consecutive indices (the last may
    be smaller). Block b is evaluated on its own with Pyro's random streams seeded by
    ``derive_seed(seed, "block", b)``: first the evidence (with PSIS diagnostics when
    ``psis``), then the decomposition. Its draws therefore depend on (seed, b) alone, never
    on the process evaluating it. In a process group (:func:`ppl_vae.distributed.initialize`) block b goes to
    rank b mod W, and the results are all-gathered and put back in datapoint order, so
    every process returns the same tensors as a single process would, exactly on the CPU
    (on GPUs, up to the determinism of CUDA kernels). The caller's random streams are
    restored afterwards. An error in any block (say, a non-finite evidence estimate) is
    raised on every process.

    ``ais``: an :class:`ppl_vae.ais.AisSettings` (or a dict of its fields); given, the evidence of
    each block is AIS's (its chains as ``num_samples``, its acceptance in ``acceptance``) instead of importance
    sampling's, seeded per block the same way, and ``num_samples`` and ``psis`` must not be given.
    """
    if num_samples is None and elbo_samples is None and ais is None:
        raise PplVaeError("evaluate_per_datapoint needs num_samples (log p(x)) or elbo_samples (the ELBO), or both")
    if ais is not None and (num_samples is not None or psis):
        raise PplVaeError("evaluate_per_datapoint: ais replaces importance sampling; give no num_samples and no psis")
    if not isinstance(block_size, int) or block_size < 1:
        raise PplVaeError(f"block_size must be a positive integer, got {block_size!r}")
    data = check_data(x, cond)
    rank, world_size = rank_and_size()
    n = x.shape[0]
    mine = range(rank, math.ceil(n / block_size), world_size)
    bar = _progress_bar(progress, sum(min(block_size, n - block * block_size) for block in mine))
    done: list[tuple[int, dict[str, Any]]] = []
    for block in mine:
        rows = slice(block * block_size, min(n, (block + 1) * block_size))
        block_data = tuple(value[rows] for value in data)
        try:
            with seeded(derive_seed(seed, "block", block)):
                result = _evaluate_block(model, guide, block_data, num_samples, elbo_samples, psis, chunk_size, ais,
                                         progress and f"AIS, images {rows.start}-{rows.stop - 1}")
        except PplVaeError as error:
            done.append((block, {"error": type(error)(f"{error} (in datapoints {rows.start} to {rows.stop - 1} of x)")}))
            break
        done.append((block, result))
        if bar is not None:
            bar.update(rows.stop - rows.start)
    if bar is not None:
        bar.close()
    blocks = sorted((item for items in all_gather_objects(done) for item in items), key=lambda item: item[0])
    for _, result in blocks:
        if "error" in result:
            raise result["error"]
    parts = [result for _, result in blocks]
    return PerDatapointEvaluation(
        decomposition=_join_decompositions([p["decomposition"] for p in parts]) if elbo_samples is not None else None,
        evidence=_join_evidence([p["evidence"] for p in parts]) if num_samples is not None or ais is not None else None,
        psis=_join_psis([p["psis"] for p in parts]) if num_samples is not None and psis else None,
        acceptance=torch.cat([p["acceptance"] for p in parts]) if ais is not None else None,
    )


def _evaluate_block(model: Callable, guide: Callable, block_data: tuple[torch.Tensor, ...], num_samples: int | None,
                    elbo_samples: int | None, psis: bool, chunk_size: int | None, ais: dict[str, Any] | None,
                    ais_label: str | bool) -> dict[str, Any]:
    """One block's evidence (AIS's, or importance sampling's with PSIS when asked), then its ELBO decomposition,
    in that order, under the caller's seeded random streams."""
    from .diagnostics import evidence_with_psis

    result: dict[str, Any] = {}
    if ais is not None:
        result["evidence"], result["acceptance"] = _ais_block(model, guide, block_data, ais, chunk_size, ais_label)
    elif num_samples is not None and psis:
        result["evidence"], result["psis"] = evidence_with_psis(
            model, guide, *block_data, num_samples=num_samples, chunk_size=chunk_size)
    elif num_samples is not None:
        result["evidence"] = evidence_estimate(model, guide, *block_data, num_samples=num_samples, chunk_size=chunk_size)
    if elbo_samples is not None:
        result["decomposition"] = elbo_decomposition(
            model, guide, *block_data, num_samples=elbo_samples, chunk_size=chunk_size)
    return result


def _ais_block(model: Callable, guide: Callable, block_data: tuple, ais: AisSettings | dict[str, Any],
               chunk_size: int | None, progress: bool | str) -> tuple[EvidenceEstimate, torch.Tensor]:
    """One block's AIS log p(x) as an :class:`EvidenceEstimate` (chains as its K), and its acceptance per datapoint."""
    settings = ais if isinstance(ais, AisSettings) else AisSettings(**ais)
    estimate = ais_log_evidence(model, guide, *block_data, chunk_size=chunk_size, progress=progress, settings=settings)
    evidence = EvidenceEstimate(estimate.log_evidence, estimate.stderr, estimate.ess, estimate.settings["chains"])
    return evidence, estimate.acceptance


def _progress_bar(progress: bool, total: int):
    """A bar over this process's share of the datapoints."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluating", unit="image", leave=False)


def _join_decompositions(parts: list[dict]) -> dict:
    first = parts[0]
    return {
        "elbo": torch.cat([p["elbo"] for p in parts]),
        "reconstruction": torch.cat([p["reconstruction"] for p in parts]),
        "reconstruction_by_site": {name: torch.cat([p["reconstruction_by_site"][name] for p in parts])
                                   for name in first["reconstruction_by_site"]},
        "observed_data": dict(first["observed_data"]),
        "quantity": first["quantity"],
        "kl": {name: torch.cat([p["kl"][name] for p in parts]) for name in first["kl"]},
        "kl_method": dict(first["kl_method"]),
        "kl_reason": dict(first.get("kl_reason", {})),
        "num_samples": first["num_samples"],
        "enumerated": dict(first.get("enumerated", {})),  # sites summed out exactly: the summary says so per site
    }


def _join_evidence(parts: list[EvidenceEstimate]) -> EvidenceEstimate:
    return EvidenceEstimate(
        torch.cat([p.log_evidence for p in parts]), torch.cat([p.stderr for p in parts]),
        torch.cat([p.ess for p in parts]), parts[0].num_samples,
    )


def _join_psis(parts: list[dict]) -> dict:
    joined: dict[str, Any] = {key: torch.cat([p[key] for p in parts]) for key in PSIS_PER_DATAPOINT}
    joined.update(
        unreliable_share=joined["unreliable"].double().mean().item(), khat_threshold=parts[0]["khat_threshold"],
        num_samples=parts[0]["num_samples"],
    )
    return joined

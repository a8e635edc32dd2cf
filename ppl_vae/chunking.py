r"""An evaluation run chunk by chunk: planning the chunks, the terms of one chunk, the retry when memory runs out.

:func:`plan_evaluation` checks the inputs, traces the programs once
(:func:`ppl_vae.inspection.inspect_program`) and sizes the chunks of particles and of datapoints
from a memory budget (:func:`chunk_element_budget`). :func:`iter_chunk_terms` then yields, chunk
by chunk, the per-particle, per-datapoint terms of :func:`chunk_terms` (log-weights, the
reconstruction per observed site, the KL term per latent site), from which the estimators of
:mod:`ppl_vae.estimators` accumulate their sums, so memory stays bounded whatever K is. A chunk
that runs out of (GPU) memory is retried with half the particles, then half the datapoints, with
a warning (:func:`iter_chunk_terms`).

Observed Bernoulli sites are scored by :mod:`ppl_vae.fused` where its conditions hold (checked
on every chunk; the same log-density to float tolerance, about twice as fast on the CPU), and
by their own ``log_prob`` elsewhere; ``ProgramStructure.log_density`` says which, and why.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.distributions import kl_divergence

from . import fused
from .enumerated import enumerated_chunk_terms
from .errors import EvaluationMemoryWarning, ModelStructureError, PplVaeError
from .inspection import (
    KL_ANALYTIC,
    OUT_OF_MEMORY_ERRORS,
    Data,
    ProgramStructure,
    as_data,
    check_count,
    check_data,
    check_observed_support,
    inspect_program,
    sample_sites,
    site_log_prob,
    slice_rows,
    trace_pair,
)
from .modes import evaluation_mode

# Default size of the largest per-chunk tensor, in elements of one data item times
# particles times datapoints: 2**24 float32 values is 64 MiB. On a GPU the budget grows with
# the free memory (chunk_element_budget), since each chunk pays Pyro's per-call overhead once.
DEFAULT_CHUNK_ELEMENTS = 2**24
# On the CPU, half that (32 MiB): smaller chunks stay closer to the caches. Measured (1 thread, AMD EPYC, default
# VAE, K=1000 x 200 images, medians of 3 interleaved repeats): 2.52-2.57 s at 53 particles per chunk (2**23)
# against 2.71 s at 106 (2**24), and 2.67 s at 13; the plain-PyTorch reference was fastest at 6-13 (3.65 s).
CPU_CHUNK_ELEMENTS = 2**23
MAX_GPU_CHUNK_ELEMENTS = 2**28  # 1 GiB per float32 tensor
# Free bytes per element of the largest tensor: a chunk keeps several tensors of its size alive
# (logits, probabilities, per-pixel log-densities and their temporaries) in float32.
GPU_BYTES_PER_CHUNK_ELEMENT = 64


def per_datapoint(value: torch.Tensor, mask, structure: ProgramStructure, k: int, n: int) -> torch.Tensor:
    """Sum a site's log-density (or KL) over every plate but the particle and data plates: [k, n]."""
    if mask is not None and not (isinstance(mask, bool) and mask):
        value = torch.where(torch.as_tensor(mask, device=value.device), value, value.new_zeros(()))
    ndim = structure.max_plate_nesting + 1
    if value.dim() > ndim:
        raise ModelStructureError(
            f"a site's log-density has batch shape {list(value.shape)} with dims outside every plate: "
            "declare data dimensions as event dimensions with .to_event(), or put them in a plate"
        )
    value = value.reshape((1,) * (ndim - value.dim()) + tuple(value.shape))
    keep = (0, ndim + structure.data_dim)
    other = [d for d in range(ndim) if d not in keep]
    if other:
        value = value.sum(other)
    return value.expand(k, n)


def _observed_log_prob(site: dict) -> torch.Tensor:
    """An observed site's log-density, after its support check: fused where :mod:`ppl_vae.fused` applies."""
    value = fused.fused_log_prob(site["fn"], site["value"])
    return site_log_prob(site) if value is None else value


@dataclass
class ChunkTerms:
    """Per-particle, per-datapoint terms of one chunk, each [k, n] in nats."""

    log_weight: torch.Tensor
    reconstruction: torch.Tensor  # the sum of reconstruction_by_site
    kl: dict[str, torch.Tensor]
    reconstruction_by_site: dict[str, torch.Tensor] = field(default_factory=dict)  # log p(obs | ...) per observed site


def chunk_terms(
    model: Callable, guide: Callable, data: torch.Tensor | Data, k: int, structure: ProgramStructure
) -> ChunkTerms:
    """One vectorized pass of ``k`` particles over the batch ``data`` (x or (x, *cond)): per-particle, per-datapoint terms."""
    data = as_data(data)
    if structure.enumerated:  # discrete guide sites summed out exactly (ppl_vae.enumerated), not drawn
        log_weight, by_site, kl = enumerated_chunk_terms(model, guide, data, k, structure)
        return ChunkTerms(log_weight, sum(by_site.values()), kl, by_site)
    n = data[0].shape[0]
    model_trace, guide_trace = trace_pair(model, guide, data, k, structure.max_plate_nesting)
    model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)
    check_observed_support({name: model_sites[name] for name in structure.observed_sites})

    def reduce(value, site):
        return per_datapoint(value, site["mask"], structure, k, n)

    by_site = {name: reduce(_observed_log_prob(model_sites[name]), model_sites[name]) for name in structure.observed_sites}
    reconstruction = sum(by_site.values())
    log_weight = reconstruction
    kl = {}
    for name in structure.latent_sites:
        p_site, q_site = model_sites[name], guide_sites[name]
        log_p, log_q = reduce(site_log_prob(p_site), p_site), reduce(site_log_prob(q_site), q_site)
        log_weight = log_weight + log_p - log_q
        if structure.kl_methods[name] == KL_ANALYTIC:
            kl[name] = reduce(kl_divergence(q_site["fn"], p_site["fn"]), q_site)
        else:
            kl[name] = log_q - log_p
    return ChunkTerms(log_weight, reconstruction, kl, by_site)


def chunk_element_budget(device: torch.device, free_bytes: int | None = None) -> int:
    """Elements (data item x particles x datapoints) of the largest tensor of one evaluation chunk.

    On the CPU, :data:`CPU_CHUNK_ELEMENTS`. On a GPU, the free memory (``free_bytes``, or
    what ``torch.cuda.mem_get_info`` reports free plus what PyTorch's caching allocator holds
    unused, e.g. after training) divided by
    :data:`GPU_BYTES_PER_CHUNK_ELEMENT`, between that default and
    :data:`MAX_GPU_CHUNK_ELEMENTS`: fewer, larger chunks keep the GPU busy. A chunk that
    still runs out of memory is retried smaller (:func:`iter_chunk_terms`).
    """
    if device.type != "cuda":
        return CPU_CHUNK_ELEMENTS
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
        # Cached blocks count as used for the driver but are free to this process.
        free_bytes += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(min(MAX_GPU_CHUNK_ELEMENTS, max(DEFAULT_CHUNK_ELEMENTS, free_bytes // GPU_BYTES_PER_CHUNK_ELEMENT)))


def _chunk_sizes(x: torch.Tensor, num_samples: int, chunk_size: int | None, particles_per_chunk: int | None):
    item_numel = max(1, math.prod(x.shape[1:]))
    n = chunk_size or max(1, min(x.shape[0], 500))
    budget = chunk_element_budget(x.device) if particles_per_chunk is None else 0
    k = particles_per_chunk or max(1, min(num_samples, budget // (n * item_numel)))
    return n, min(k, num_samples)


@dataclass
class EvaluationPlan:
    """The structure of a model/guide pair and the chunking of one evaluation over its data."""

    structure: ProgramStructure
    chunk_size: int  # datapoints per chunk
    particles_per_chunk: int
    num_samples: int


def plan_evaluation(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int,
    chunk_size: int | None = None,
    particles_per_chunk: int | None = None,
    data_plate: str | None = None,
    kl: str = "auto",
) -> EvaluationPlan:
    """Check the inputs, trace the pair once, and size the chunks (from a memory budget unless given)."""
    data = check_data(x, cond)
    check_count(num_samples, "num_samples")
    for name, value in (("chunk_size", chunk_size), ("particles_per_chunk", particles_per_chunk)):
        if value is not None:
            check_count(value, name)
    n, k = _chunk_sizes(x, int(num_samples), chunk_size and int(chunk_size), particles_per_chunk and int(particles_per_chunk))
    with torch.no_grad():
        structure = inspect_program(model, guide, slice_rows(data, slice(0, n)), data_plate=data_plate, kl=kl)
    if structure.enumerated and particles_per_chunk is None:  # each particle holds every enumerated value at once
        k = max(1, k // structure.enumeration_size)
    return EvaluationPlan(structure, n, k, int(num_samples))


def iter_chunk_terms(
    model: Callable, guide: Callable, data: torch.Tensor | Data, plan: EvaluationPlan, progress: bool | str = False
) -> Iterator[tuple[slice, ChunkTerms]]:
    """Yield ``(rows, terms)`` for every (data chunk, particle chunk) of ``plan``.

    ``data`` is x, or the tuple (x, *cond) of per-datapoint tensors, all sliced with the same rows.
    ``rows`` is the slice of ``x`` the chunk covers; ``terms`` holds [k, n] tensors.
    This is the engine behind every public estimate, and a hook for diagnostics
    that need the raw log-weights. The particle chunks of one data chunk come one
    after another with the same ``rows``, and cover exactly ``plan.num_samples`` draws.

    Out of memory: a chunk that raises ``torch.OutOfMemoryError`` is retried with
    half as many particles, and once that is 1, with half as many datapoints (only
    before the first particle chunk of a data chunk, so the guarantee above holds);
    the smaller sizes are kept for the remaining chunks, the CUDA cache is emptied,
    and an :class:`~ppl_vae.errors.EvaluationMemoryWarning` says what changed. The
    retried chunk draws afresh, so after a retry the Monte Carlo draws differ from
    those of an evaluation that fit in memory: the same estimator and distribution
    of results, not the same digits. When one datapoint with one particle does not
    fit, a :class:`~ppl_vae.errors.PplVaeError` says so.

    Every chunk runs the programs in eval mode (:func:`ppl_vae.modes.evaluation_mode`: Dropout off,
    BatchNorm on its running statistics, which stay as they were), the modules' modes restored after it.
    """
    data = as_data(data)
    num_rows, num_samples = data[0].shape[0], plan.num_samples
    sizes = _ChunkSizes(plan.chunk_size, plan.particles_per_chunk)
    bar = _progress_bar(num_rows * num_samples, progress)
    with torch.no_grad():
        start = 0
        while start < num_rows:
            rows = slice(start, min(start + sizes.rows, num_rows))
            done = 0
            while done < num_samples:
                k = min(sizes.particles, num_samples - done)
                with evaluation_mode(model, guide):  # restored before each yield: the caller may train between chunks
                    terms = _chunk_terms_or_shrink(model, guide, data, rows, k, done, plan.structure, sizes)
                if terms is None:  # out of memory: sizes shrank, try again
                    rows = slice(start, min(start + sizes.rows, num_rows))
                    continue
                yield rows, terms
                done += k
                if bar is not None:
                    bar.update((rows.stop - rows.start) * k)
            start = rows.stop
    if bar is not None:
        bar.close()


@dataclass
class _ChunkSizes:
    """The chunk sizes of one evaluation; they shrink when a chunk runs out of memory."""

    rows: int  # datapoints per chunk
    particles: int  # particles per chunk


def _chunk_terms_or_shrink(
    model: Callable, guide: Callable, data: Data, rows: slice, k: int, done: int,
    structure: ProgramStructure, sizes: _ChunkSizes,
) -> ChunkTerms | None:
    """:func:`chunk_terms` of one chunk, or None after an out-of-memory error has shrunk ``sizes`` (with a warning)."""
    try:
        return chunk_terms(model, guide, slice_rows(data, rows), k, structure)
    except OUT_OF_MEMORY_ERRORS as error:
        message = _shrink_chunk_sizes(sizes, rows.stop - rows.start, k, done, error)
    # Outside the except clause: the failed chunk's tensors are no longer referenced by the traceback.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    warnings.warn(message, EvaluationMemoryWarning, stacklevel=4)
    return None


def _shrink_chunk_sizes(sizes: _ChunkSizes, num_rows: int, k: int, done: int, error: BaseException) -> str:
    """Halve the particles per chunk, else (before a data chunk's first draw) the datapoints; say what changed."""
    if k > 1:
        sizes.particles = k // 2
        change = f"{_count(sizes.particles, 'particle')} per chunk"
    elif done == 0 and num_rows > 1:
        sizes.rows = num_rows // 2
        change = f"{_count(sizes.rows, 'datapoint')} per chunk"
    elif done:
        raise PplVaeError(
            f"out of memory evaluating {_count(num_rows, 'datapoint')} with 1 particle after earlier chunks of them "
            f"fit ({type(error).__name__}): free memory on the device, pass a smaller chunk_size (--chunk-size), "
            "or evaluate on the CPU (--device cpu)"
        ) from error
    else:
        raise PplVaeError(
            f"out of memory evaluating a single datapoint with a single particle ({type(error).__name__}): the "
            "programs do not fit on this device; evaluate on the CPU (--device cpu) or free memory on the device"
        ) from error
    return (
        f"out of memory evaluating {_count(num_rows, 'datapoint')} x {_count(k, 'particle')} at once; retrying "
        f"with {change} (the Monte Carlo draws differ from an evaluation that fits in memory; the estimator is the same)"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _progress_bar(total: int, progress: bool | str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    # Counted in draws (datapoints x particles), which stays right when chunks shrink after running out of memory.
    desc = progress if isinstance(progress, str) else "evaluating"
    return tqdm(total=total, desc=desc, unit="draw", unit_scale=True, leave=False)

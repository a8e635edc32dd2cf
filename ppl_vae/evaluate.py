r"""Evidence bounds and estimates, per datapoint, for any Pyro model/guide pair.

Both programs take the batch ``x`` and put its leading dimension in a vectorized
``pyro.plate`` (the *data plate*). Any site names and any number of latent sample
sites are allowed; observed sites are found from the trace (``is_observed``),
and every density comes from the distributions the programs themselves sample
from. All values are in nats, per datapoint.

**ELBO and its decomposition** (:func:`elbo_decomposition`). With z ~ q(z | x)
and latent sites i (parents pa_i),

.. math::

    \mathrm{ELBO}(x) = \underbrace{E_q[\log p(x | z)]}_{\text{reconstruction}}
                       - \sum_i \underbrace{E_q[\log q(z_i | \cdot) - \log p(z_i | pa_i)]}_{\mathrm{KL}_i}

where the reconstruction term sums every observed site (and is also given per observed site). Each KL_i is computed
analytically with ``torch.distributions.kl_divergence`` when a rule is
registered for the pair of distributions (the expectation over the parents stays
Monte Carlo), and by Monte Carlo otherwise; the result says which. The ELBO is
defined as reconstruction minus the KL terms, so the decomposition sums to it.

**Importance-sampled log evidence** (:func:`log_evidence`, :func:`evidence_estimate`).
With K draws z_k ~ q(z | x),

.. math::

    \log \hat p(x) = \log \frac{1}{K} \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k | x)},

the IWAE bound of Burda et al. (2015): E[log p̂(x)] <= log p(x), it increases
with K and tends to log p(x). The log-sum-exp is accumulated in float64 over
chunks of particles and of data, so memory stays bounded whatever K is. A chunk
that runs out of (GPU) memory is retried with half the particles, then half the
datapoints, with a warning (:func:`iter_chunk_terms`).

Observed Bernoulli sites are scored by :mod:`ppl_vae.fused` where its conditions hold (checked
on every chunk; the same log-density to float tolerance, about twice as fast on the CPU), and
by their own ``log_prob`` elsewhere; ``ProgramStructure.log_density`` says which, and why.

**What the evidence is of** (:func:`evidence_quantity`). The programs take the data arguments
(x, *cond); each observed site observes one of them. Those observed are the quantity's
variables and the others its conditioning inputs: ``log p(x)`` for a program given x alone,
``log p(x | y)`` for one given labels y only as an input (a conditional VAE), ``log p(x, y)``
for one that also observes them (``pyro.sample("digit", ..., obs=y)``: then the
"reconstruction" includes log p(y | z) and the estimate is of the joint). An observed site
observes a conditioning argument when its value is that tensor (in any shape or dtype) or its
one-hot encoding; every other observed site counts as observing x (the data, perhaps transformed).

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
import numbers
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyro
import torch
from pyro import poutine
from pyro.infer.inspect import get_dependencies
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import constraints, kl_divergence

from . import fused
from .errors import EvaluationMemoryWarning, InvalidDataError, ModelStructureError, PplVaeError
from .modes import evaluates, evaluation_mode

PARTICLE_PLATE = "_ppl_vae_particles"
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
KL_ANALYTIC = "analytic"
KL_MONTE_CARLO = "monte carlo"
# What running out of accelerator memory raises (torch.OutOfMemoryError since torch 2.5;
# torch.cuda.OutOfMemoryError, the same class there, before).
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = tuple(
    {torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)}
)
# Failures of the accelerator itself (out of memory; a CUDA error, torch.AcceleratorError since torch 2.8):
# never a sign of wrong input or of the program's structure, so they are never reworded or swallowed.
DEVICE_ERRORS: tuple[type[BaseException], ...] = OUT_OF_MEMORY_ERRORS + tuple(
    error for error in (getattr(torch, "AcceleratorError", None),) if error is not None
)
# Errors that running the user's programs on a wrong x typically raises deep inside torch or Pyro.
_PROGRAM_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


Data = tuple  # (x, *cond): the per-datapoint tensors passed, in this order, to both programs


@dataclass
class ProgramStructure:
    """What one trace of a model/guide pair says about its sites, plates and dependencies.

    ``model_parents[s]`` and ``guide_parents[s]`` are the latent sites whose values the
    density of latent site ``s`` depends on directly, in the model and in the guide;
    ``dependencies`` says how they were found: ``"provenance"`` (Pyro's
    ``get_dependencies``, which follows values through the programs' tensor operations) or
    ``"site order"`` (every earlier latent site counts as a parent: a safe over-approximation,
    used where provenance tracking fails on a program). ``kl_reasons[s]`` says why the KL
    term of ``s`` is Monte Carlo (absent when it is analytic).
    """

    max_plate_nesting: int
    data_plate: str
    data_dim: int  # the data plate's (negative) dim
    observed_sites: list[str]
    latent_sites: list[str]
    kl_methods: dict[str, str] = field(default_factory=dict)
    kl_reasons: dict[str, str] = field(default_factory=dict)
    model_parents: dict[str, set[str]] = field(default_factory=dict)
    guide_parents: dict[str, set[str]] = field(default_factory=dict)
    dependencies: str = "provenance"
    # Latent sites whose model parents are drawn after them in the guide, and depend on them there:
    # their KL(q || p) at fixed parents is not their term of the ELBO (site -> those parents).
    order_conflicts: dict[str, list[str]] = field(default_factory=dict)
    # How each observed site's log-density is computed (ppl_vae.fused): the fused path, or the site's own
    # log_prob and why. Found on the inspection trace; every chunk checks the fused path's conditions again.
    log_density: dict[str, str] = field(default_factory=dict)
    # Which data argument each observed site observes ("x", or "y"/"y1", "y2"... for the conditioning
    # tensors), and the quantity the evidence is then of, e.g. "log p(x | y)" (evidence_quantity).
    observed_data: dict[str, str] = field(default_factory=dict)
    quantity: str = "log p(x)"
    # Guide sites whose draws have no reparameterized sampler (fn.has_rsample False: Categorical, Bernoulli, ...),
    # site -> the distribution: their gradients need a score-function term (Trace_ELBO has one).
    non_reparameterized: dict[str, str] = field(default_factory=dict)
    # Guide sites marked for enumeration (infer={"enumerate": ...}, config_enumerate), site -> the mark.
    enumerated: dict[str, str] = field(default_factory=dict)


def check_count(value: Any, name: str) -> int:
    """A positive integer option (a Python or NumPy integer; not a bool), as an int; else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidDataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_data(x: Any, cond: tuple = ()) -> Data:
    """``(x, *cond)`` checked: tensors with the datapoints on dim 0, one leading size N, no NaN or infinity.

    Every positional argument after the guide is per-datapoint data, passed to both
    programs in order and sliced with x into every chunk; options are keyword-only, so
    a number here is most likely an option given by position, and the message says so.
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidDataError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise InvalidDataError(f"x must be a non-empty batch with the datapoints on dim 0, got shape {list(x.shape)}")
    n = x.shape[0]
    for position, value in enumerate(cond, start=2):
        if not isinstance(value, torch.Tensor):
            raise InvalidDataError(
                f"data argument {position} (after the guide) is a {type(value).__name__}, not a tensor: every positional "
                "argument after the guide is per-datapoint data for the programs, and options are keyword-only "
                f"(e.g. num_samples={value!r})"
            )
        if value.dim() == 0 or value.shape[0] != n:
            raise InvalidDataError(
                f"data argument {position} (after the guide) has shape {list(value.shape)}, but x has {n} datapoints: "
                "every tensor after the guide holds one row per datapoint of x, on dim 0"
            )
    for position, value in enumerate((x, *cond), start=1):
        _check_finite(value, "x" if position == 1 else f"data argument {position}")
    return (x, *cond)


def _check_finite(value: torch.Tensor, name: str) -> None:
    if not (value.is_floating_point() or value.is_complex()):
        return
    bad = ~torch.isfinite(value)
    if bad.any():
        rows = bad.reshape(value.shape[0], -1).any(1)
        kinds = " and ".join(k for k, found in (("NaN", torch.isnan(value).any()), ("infinite", torch.isinf(value).any())) if found)
        raise InvalidDataError(
            f"{name} holds {kinds} values: {int(bad.sum())} entries in {int(rows.sum())} datapoint(s), the first at "
            f"index {int(rows.nonzero()[0])} of dim 0; remove or impute them, or mask them with poutine.mask in the model"
        )


def _slice(data: Data, rows: slice) -> Data:
    return tuple(value[rows] for value in data)


def _as_data(data: torch.Tensor | Data) -> Data:
    return (data,) if isinstance(data, torch.Tensor) else tuple(data)


def sample_sites(trace: poutine.Trace) -> dict[str, dict]:
    trace = prune_subsample_sites(trace)
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["infer"].get("_deterministic", False)
    }


def _in_particle_plate(fn: Callable, num_particles: int, dim: int) -> Callable:
    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return wrapped


def trace_pair(
    model: Callable, guide: Callable, data: torch.Tensor | Data, num_particles: int | None, max_plate_nesting: int
):
    """Guide trace and model trace replayed on it; vectorized over particles unless ``num_particles`` is None.

    ``data`` is x or the tuple (x, *cond) passed to both programs. The particle plate
    sits at dim -(max_plate_nesting + 1), left of every plate of the programs.
    """
    data = _as_data(data)
    if num_particles is not None:
        dim = -(max_plate_nesting + 1)
        model, guide = (_in_particle_plate(fn, num_particles, dim) for fn in (model, guide))
    guide_trace = poutine.trace(guide).get_trace(*data)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*data)
    return model_trace, guide_trace


def _analytic_kl_available(q_fn, p_fn) -> bool:
    try:
        kl_divergence(q_fn, p_fn)
    except NotImplementedError:
        return False
    return True


@evaluates
def inspect_program(
    model: Callable, guide: Callable, data: torch.Tensor | Data, data_plate: str | None = None, kl: str = "auto"
) -> ProgramStructure:
    """Trace the pair once on ``data`` (x or (x, *cond)) and find its data plate, sites and dependencies.

    ``data_plate`` names the plate over the datapoints; by default it is the one
    vectorized plate of size ``len(x)`` that holds every observed site.
    ``kl`` is ``"auto"`` (analytic where valid) or ``"mc"`` (Monte Carlo for every site).

    The KL term of latent site i, E_q[log q(z_i | ·) - log p(z_i | pa_i)], equals the
    expectation of the analytic KL(q(z_i | ·) || p(z_i | pa_i)) only when the model
    parents pa_i are fixed while z_i varies: none of them may be drawn after z_i in the
    guide from a value that depends on z_i (the condition ``TraceMeanField_ELBO`` states).
    A bottom-up guide q(z1 | x) q(z2 | z1) of the model p(z2) p(z1 | z2) p(x | z1) breaks
    it at z1. Such a site gets Monte Carlo KL, and ``kl_reasons`` says why.

    The programs run in eval mode, without gradients (:func:`ppl_vae.modes.evaluation_mode`): inspecting
    a program moves none of its running statistics (BatchNorm).
    """
    if kl not in ("auto", "mc"):
        raise InvalidDataError(f"kl must be 'auto' or 'mc', got {kl!r}")
    data = _as_data(data)
    x = data[0]
    # The inspection trace must not move the caller's random stream: with a fixed seed, an
    # estimate (or an IWAE loss) then draws exactly what a plain Trace_ELBO would.
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _explain_program_errors(data):
        model_trace, guide_trace = trace_pair(model, guide, data, None, 0)
    model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)
    with _explain_program_errors(data):  # shape and dtype mismatches surface when densities are computed
        _check_observed_support(model_sites)
        for site in [*model_sites.values(), *guide_sites.values()]:
            _log_prob(site)
    observed = [name for name, site in model_sites.items() if site["is_observed"]]
    latent = [name for name, site in model_sites.items() if not site["is_observed"]]
    if not observed:
        raise ModelStructureError(
            "the model has no observed sample site: condition on the data with pyro.sample(name, dist, obs=x)"
        )
    missing = [name for name in latent if name not in guide_sites]
    summed_out = [name for name in missing if model_sites[name]["infer"].get("enumerate")]
    if summed_out:
        raise ModelStructureError(
            f"the model's site {summed_out[0]!r} is marked for enumeration (summed out, no guide site), and ppl_vae "
            "does not yet train or evaluate enumerated programs (TraceEnum_ELBO): give it a guide site, e.g. "
            f"pyro.sample({summed_out[0]!r}, dist.Categorical(logits=...)), without the mark"
        )
    if missing:
        raise ModelStructureError(
            f"the guide has no sample site for the model's latent site(s) {missing}: "
            "every latent site of the model needs a site of the same name in the guide"
        )
    extra = [name for name in guide_sites if name not in latent]
    if extra:
        raise ModelStructureError(
            f"the guide samples site(s) {extra} that are not latent sites of the model; "
            "auxiliary guide sites and observed sites in the guide are not supported"
        )
    sites = [*model_sites.values(), *guide_sites.values()]
    frames = [frame for site in sites for frame in site["cond_indep_stack"]]
    if any(frame.vectorized and frame.dim is None for frame in frames) or any(not f.vectorized for f in frames):
        raise ModelStructureError("sequential plates (pyro.plate used as an iterator) are not supported")
    max_plate_nesting = max((-frame.dim for frame in frames), default=0)
    data_frame = find_data_plate(model_sites, observed, x.shape[0], data_plate)
    for name, site in [*((n, model_sites[n]) for n in latent), *((n, model_sites[n]) for n in observed)]:
        if data_frame.name not in {f.name for f in site["cond_indep_stack"]}:
            raise ModelStructureError(
                f"site {name!r} is not inside the data plate {data_frame.name!r}: per-datapoint "
                "evidence needs every latent and observed site to be local to a datapoint"
            )
    _check_guide_data_plate(guide_sites, latent, data_frame)
    guide_order = list(guide_sites)
    model_parents, guide_parents, dependencies = latent_parents(model, guide, data, latent, guide_order)
    observed_data = {name: observed_argument(model_sites[name]["value"], data) for name in observed}
    structure = ProgramStructure(
        max_plate_nesting, data_frame.name, data_frame.dim, observed, latent,
        model_parents=model_parents, guide_parents=guide_parents, dependencies=dependencies,
        log_density={name: fused.describe(model_sites[name]["fn"], model_sites[name]["value"]) for name in observed},
        observed_data=observed_data, quantity=evidence_quantity(observed_data.values(), len(data)),
        non_reparameterized={name: describe_distribution(site["fn"]) for name, site in guide_sites.items()
                             if not getattr(site["fn"], "has_rsample", False)},
        enumerated={name: str(site["infer"]["enumerate"]) for name, site in guide_sites.items()
                    if site["infer"].get("enumerate")},
    )
    for name in latent:
        conflicts = sorted(model_parents[name] & guide_descendants(guide_parents, name))
        if conflicts:
            structure.order_conflicts[name] = conflicts
        q_fn, p_fn = guide_sites[name]["fn"], model_sites[name]["fn"]
        if kl == "mc":
            reason = "Monte Carlo requested (kl='mc')"
        elif conflicts:
            drawn = "drawn after it in the guide" + (", from its value" if dependencies == "provenance" else "")
            reason = (f"its model parent(s) {conflicts} are {drawn}: KL(q || p) at fixed parents is not its ELBO term "
                      f"(dependencies by {dependencies})")
        elif not _analytic_kl_available(q_fn, p_fn):
            reason = f"torch has no analytic KL rule for {describe_distribution(q_fn)} against {describe_distribution(p_fn)}"
        else:
            reason = None
        structure.kl_methods[name] = KL_MONTE_CARLO if reason else KL_ANALYTIC
        if reason:
            structure.kl_reasons[name] = reason
    return structure


def data_argument_names(count: int) -> list[str]:
    """The names of the data arguments (x, *cond) in quantities: x, then y (one) or y1, y2, ... (several)."""
    return ["x"] + (["y"] if count == 2 else [f"y{i}" for i in range(1, count)])


def observed_argument(value: Any, data: Data) -> str:
    """The data argument an observed site's ``value`` observes: a conditioning tensor it equals, else ``"x"``.

    A value equals a conditioning tensor when it holds the same numbers in the same order (any
    shape or dtype: ``obs=y`` or ``obs=y.float()``), or is its one-hot encoding
    (``OneHotCategorical``, ``obs=one_hot(y)``). Any other observed value counts as observing x,
    the data, perhaps transformed: a program given x alone can observe nothing else.
    """
    names = data_argument_names(len(data))
    if isinstance(value, torch.Tensor) and value.numel():
        for name, argument in zip(names[1:], data[1:]):
            if _same_values(value, argument) or _one_hot_of(value, argument):
                return name
    return "x"


def _same_values(value: torch.Tensor, argument: torch.Tensor) -> bool:
    if value.numel() != argument.numel() or value.is_complex() or argument.is_complex():
        return False
    return bool(torch.equal(value.reshape(-1).double(), argument.reshape(-1).to(value.device).double()))


def _one_hot_of(value: torch.Tensor, argument: torch.Tensor) -> bool:
    if argument.is_floating_point() or argument.is_complex() or value.dim() == 0 or value.shape[-1] < 2:
        return False
    if value.numel() // value.shape[-1] != argument.numel():
        return False
    flat = value.reshape(-1, value.shape[-1]).double()
    one_hot = bool(((flat == 0) | (flat == 1)).all()) and bool((flat.sum(-1) == 1).all())
    return one_hot and bool(torch.equal(flat.argmax(-1), argument.reshape(-1).to(value.device).long()))


def evidence_quantity(observed: Any, num_arguments: int) -> str:
    """The quantity the evidence estimates, from the data arguments the observed sites observe.

    ``observed`` holds argument names (:func:`data_argument_names`); those observed are the
    joint variables and the rest conditioning inputs, in argument order: ``"log p(x)"``,
    ``"log p(x | y)"`` (y only an input), ``"log p(x, y)"`` (y observed too).
    """
    names = data_argument_names(num_arguments)
    seen = set(observed)
    variables = [name for name in names if name in seen]
    inputs = [name for name in names if name not in seen]
    return f"log p({', '.join(variables)}{' | ' + ', '.join(inputs) if inputs else ''})"


def describe_distribution(fn) -> str:
    """A distribution's class, with the one inside Independent or an expansion, e.g. ``Independent(Normal)``."""
    inner = fn
    while hasattr(inner, "base_dist"):
        inner = inner.base_dist
    return type(fn).__name__ if inner is fn else f"{type(fn).__name__}({type(inner).__name__})"


def latent_parents(
    model: Callable, guide: Callable, data: Data, latent: list[str], guide_order: list[str]
) -> tuple[dict[str, set[str]], dict[str, set[str]], str]:
    """The direct latent parents of every latent site in the model and in the guide, and how they were found.

    Pyro's ``get_dependencies`` runs each program once with provenance-tracking tensors
    and reads which sites' values each density depends on. Where that fails on a program
    (an operation provenance tracking does not support), every earlier latent site counts
    as a parent: the order of the sites, a safe over-approximation.
    """
    try:
        with torch.no_grad():
            model_deps = get_dependencies(model, data)["prior_dependencies"]
            guide_deps = get_dependencies(guide, data)["prior_dependencies"]
        latent_set = set(latent)
        model_parents = {name: set(model_deps.get(name, ())) & latent_set - {name} for name in latent}
        guide_parents = {name: set(guide_deps.get(name, ())) & latent_set - {name} for name in latent}
        return model_parents, guide_parents, "provenance"
    except DEVICE_ERRORS:
        raise
    except Exception:  # noqa: BLE001 -- any failure of the tracking falls back to the safe order rule
        model_parents = {name: set(latent[:i]) for i, name in enumerate(latent)}
        guide_latent = [name for name in guide_order if name in latent]
        guide_parents = {name: set(guide_latent[: guide_latent.index(name)]) for name in latent}
        return model_parents, guide_parents, "site order"


def guide_descendants(guide_parents: dict[str, set[str]], site: str) -> set[str]:
    """Latent sites whose guide values depend on ``site``'s, directly or through other sites."""
    found: set[str] = set()
    frontier = {site}
    while frontier:
        frontier = {child for child, parents in guide_parents.items() if parents & frontier} - found
        found |= frontier
    return found - {site}


@contextmanager
def _explain_program_errors(data: Data) -> Iterator[None]:
    """Turn an error raised while running the programs on ``data`` into an :class:`InvalidDataError` that says so.

    Running a model on data of the wrong shape, dtype or device fails deep inside torch
    or Pyro; the message names x's shape, dtype and device, and the original error stays
    attached as the cause. Errors of ppl_vae itself and of the device (out of memory, CUDA errors) pass unchanged.
    """
    try:
        yield
    except (PplVaeError, *DEVICE_ERRORS):
        raise
    except _PROGRAM_ERRORS as error:
        from .user_code import describe_user_error, raised_by_user_code

        if raised_by_user_code(error):  # a raise statement of the program itself: its message, not the data's shape
            raise InvalidDataError(f"the program raised {describe_user_error(error)}") from error
        first_line = (str(error).strip().splitlines() or [""])[0]
        described = ", ".join(
            f"{'x' if i == 0 else f'data argument {i + 1}'} (shape {list(v.shape)}, dtype {v.dtype}, device {v.device})"
            for i, v in enumerate(data)
        )
        raise InvalidDataError(
            f"running the model and guide on {described} failed with {type(error).__name__}: {first_line} -- check "
            "that the data have the shape, dtype and device the programs expect, with the datapoints on dim 0"
        ) from error


def _check_observed_support(model_sites: dict[str, dict]) -> None:
    """Refuse observed values outside the support of their distribution (NaN included), where not masked out.

    Without this, a log-density at such values is an error deep in torch when Pyro's
    validation is on, and a silently meaningless number when it is off.
    """
    for name, site in model_sites.items():
        if not site["is_observed"]:
            continue
        try:
            support = site["fn"].support
        except NotImplementedError:
            continue
        if constraints.is_dependent(support):
            continue
        mask = site["mask"]
        if mask is False:
            continue
        bad = ~support.check(site["value"])
        if isinstance(mask, torch.Tensor):
            bad = bad & mask
        if bad.any():
            fn, base_support = site["fn"], support
            while hasattr(fn, "base_dist"):  # Independent, expanded or masked: name the distribution inside
                fn = fn.base_dist
            while isinstance(base_support, constraints.independent):
                base_support = base_support.base_constraint
            raise InvalidDataError(
                f"the observed site {name!r} holds values outside the support {base_support} of its distribution "
                f"{type(fn).__name__} (in {int(bad.sum())} of {bad.numel()} batch elements; NaN counts as "
                "outside): give data the likelihood can score, e.g. 0/1 values for a Bernoulli and finite numbers "
                "for a Normal, or mask the missing entries with poutine.mask"
            )


def _check_guide_data_plate(guide_sites: dict[str, dict], latent: list[str], data_frame) -> None:
    """Every latent site of the guide must sit in the data plate at the model's dim, or log q(z|x) is not per datapoint."""
    for name in latent:
        frames = {frame.name: frame for frame in guide_sites[name]["cond_indep_stack"]}
        frame = frames.get(data_frame.name)
        if frame is None or frame.dim != data_frame.dim:
            where = "outside it" if frame is None else f"at dim {frame.dim} instead of the model's {data_frame.dim}"
            raise ModelStructureError(
                f"the guide samples the latent site {name!r} {where}: the data plate {data_frame.name!r} must hold "
                "every latent site in the guide too, at the same dim, for q(z | x) to factor over datapoints"
            )


def find_data_plate(model_sites: dict, observed: list[str], n: int, name: str | None):
    candidates = {}
    for site_name in observed:
        for frame in model_sites[site_name]["cond_indep_stack"]:
            if frame.vectorized and frame.size == n and (name is None or frame.name == name):
                candidates[frame.name] = frame
    if name is not None and name not in candidates:
        raise ModelStructureError(f"no plate named {name!r} of size len(x)={n} holds the observed sites")
    if not candidates:
        raise ModelStructureError(
            f"no vectorized plate of size len(x)={n} holds the observed sites: put the datapoints "
            "in a plate over the leading dimension of x, e.g. `with pyro.plate('data', x.shape[0]):`"
        )
    if len(candidates) > 1:
        raise ModelStructureError(
            f"several plates of size len(x)={n} hold the observed sites ({sorted(candidates)}), e.g. nested plates "
            "of the same size: the evaluation needs one data plate over dim 0 of x; name it with data_plate=..."
        )
    return next(iter(candidates.values()))


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


def _log_prob(site: dict) -> torch.Tensor:
    return site["fn"].log_prob(site["value"])


def _observed_log_prob(site: dict) -> torch.Tensor:
    """An observed site's log-density, after its support check: fused where :mod:`ppl_vae.fused` applies."""
    value = fused.fused_log_prob(site["fn"], site["value"])
    return _log_prob(site) if value is None else value


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
    data = _as_data(data)
    n = data[0].shape[0]
    model_trace, guide_trace = trace_pair(model, guide, data, k, structure.max_plate_nesting)
    model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)
    _check_observed_support({name: model_sites[name] for name in structure.observed_sites})

    def reduce(value, site):
        return per_datapoint(value, site["mask"], structure, k, n)

    by_site = {name: reduce(_observed_log_prob(model_sites[name]), model_sites[name]) for name in structure.observed_sites}
    reconstruction = sum(by_site.values())
    log_weight = reconstruction
    kl = {}
    for name in structure.latent_sites:
        p_site, q_site = model_sites[name], guide_sites[name]
        log_p, log_q = reduce(_log_prob(p_site), p_site), reduce(_log_prob(q_site), q_site)
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
        structure = inspect_program(model, guide, _slice(data, slice(0, n)), data_plate=data_plate, kl=kl)
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
    data = _as_data(data)
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
        return chunk_terms(model, guide, _slice(data, rows), k, structure)
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
    """Per-datapoint ELBO, reconstruction term and KL term per latent site, averaged over ``num_samples`` draws.

    ``model(x, *cond)`` and ``guide(x, *cond)``: every positional tensor after the guide
    is per-datapoint data (one row per datapoint of x, e.g. labels y of a conditional
    VAE), passed to both programs; options are keyword-only.

    Returns a dict of float64 CPU tensors of shape [N], in nats:

    * ``"elbo"`` -- reconstruction minus the sum of the KL terms;
    * ``"reconstruction"`` -- E_q[log p(x | z)], summed over every observed site;
    * ``"reconstruction_by_site"`` -- a dict from each observed site's name to its term (they sum to the above);
    * ``"observed_data"`` -- a dict from each observed site's name to the data argument it observes;
    * ``"quantity"`` -- what the evidence of these programs is of, e.g. ``"log p(x | y)"`` (:func:`evidence_quantity`);
    * ``"kl"`` -- a dict from each latent site's name to its KL(q || p) term;
    * ``"kl_method"`` -- a dict from each latent site's name to ``"analytic"`` or ``"monte carlo"``;
    * ``"kl_reason"`` -- for each Monte Carlo site, why (no rule registered, parents drawn
      after it in the guide, or ``kl="mc"``);
    * ``"num_samples"`` -- the number of draws from the guide per datapoint.

    ``kl="mc"`` forces Monte Carlo KL everywhere; then the ELBO is exactly the
    mean log importance weight, the quantity ``Trace_ELBO`` estimates.
    """
    plan = plan_evaluation(
        model, guide, x, *cond, num_samples=num_samples, chunk_size=chunk_size,
        particles_per_chunk=particles_per_chunk, data_plate=data_plate, kl=kl,
    )
    num_samples = plan.num_samples
    structure = plan.structure
    reconstruction = torch.zeros(x.shape[0], dtype=torch.float64)
    by_site = {name: torch.zeros(x.shape[0], dtype=torch.float64) for name in structure.observed_sites}
    kl_terms = {name: torch.zeros(x.shape[0], dtype=torch.float64) for name in structure.latent_sites}
    for rows, terms in iter_chunk_terms(model, guide, (x, *cond), plan, progress):
        reconstruction[rows] += terms.reconstruction.double().sum(0).cpu()
        for name, value in terms.reconstruction_by_site.items():
            by_site[name][rows] += value.double().sum(0).cpu()
        for name, value in terms.kl.items():
            kl_terms[name][rows] += value.double().sum(0).cpu()
    reconstruction /= num_samples
    by_site = {name: total / num_samples for name, total in by_site.items()}
    kl_terms = {name: total / num_samples for name, total in kl_terms.items()}
    elbo = reconstruction - sum(kl_terms.values())
    return {
        "elbo": elbo,
        "reconstruction": reconstruction,
        "reconstruction_by_site": by_site,
        "observed_data": dict(structure.observed_data),
        "quantity": structure.quantity,
        "kl": kl_terms,
        "kl_method": dict(structure.kl_methods),
        "kl_reason": dict(structure.kl_reasons),
        "num_samples": num_samples,
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
    """Importance-sampled log p(x) per datapoint, with its standard error and effective sample size.

    Positional tensors after x are per-datapoint conditioning data, as in
    :func:`elbo_decomposition`; with them the estimate is of log p(x | y) where they are only
    inputs, and of log p(x, y) where a site observes them (:func:`evidence_quantity`).
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
    :func:`elbo_decomposition`. Returns a JSON-ready dict: ``quantity`` (what the evidence is
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
    ``evidence`` reuses an :class:`EvidenceEstimate` already computed for ``x``
    (e.g. by :func:`ppl_vae.diagnostics.evidence_with_psis`) instead of drawing anew, and
    ``decomposition`` reuses a result of :func:`elbo_decomposition` on ``x`` (e.g. gathered
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
    kl_total = sum(decomposition["kl"].values())
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
        "kl": {
            "total": _summary(kl_total),
            "sites": {
                name: {
                    **_summary(value), "method": decomposition["kl_method"][name],
                    **({"reason": decomposition["kl_reason"][name]} if name in decomposition.get("kl_reason", {}) else {}),
                }
                for name, value in decomposition["kl"].items()
            },
        },
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
        num_dims = math.prod(x.shape[1:])
        dequantized = levels == "dequantized"
        result["bits_per_dim"] = {
            "elbo": _summary(bits_per_dim(decomposition["elbo"], num_dims, dequantized)),
            "log_evidence": _summary(bits_per_dim(evidence.log_evidence, num_dims, dequantized)),
            "method": "density at uniformly dequantized levels, minus D log 256" if dequantized
            else "probability of the 256 discrete levels",
        }
    return result

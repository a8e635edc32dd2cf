r"""Checks of the data, and inspection of a model/guide pair: what one trace says about its sites and plates.

Both programs take the batch ``x`` and put its leading dimension in a vectorized
``pyro.plate`` (the *data plate*). Any site names and any number of latent sample
sites are allowed; observed sites are found from the trace (``is_observed``).
:func:`inspect_program` traces the pair once and returns a :class:`ProgramStructure`: the data
plate, the observed and latent sites, each latent site's parents in the model and the guide
(:func:`latent_parents`), how each KL term will be computed and why, and what the evidence is of.
:func:`check_data` and :func:`check_count` check the inputs of every estimate first.

**What the evidence is of** (:func:`evidence_quantity`). The programs take the data arguments
(x, *cond); each observed site observes one of them. Those observed are the quantity's
variables and the others its conditioning inputs: ``log p(x)`` for a program given x alone,
``log p(x | y)`` for one given labels y only as an input (a conditional VAE), ``log p(x, y)``
for one that also observes them (``pyro.sample("digit", ..., obs=y)``: then the
"reconstruction" includes log p(y | z) and the estimate is of the joint). An observed site
observes a conditioning argument when its value is that tensor (in any shape or dtype) or its
one-hot encoding; every other observed site counts as observing x (the data, perhaps transformed).
"""

from __future__ import annotations

import numbers
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
from .errors import InvalidDataError, ModelStructureError, PplVaeError
from .modes import evaluates

PARTICLE_PLATE = "_ppl_vae_particles"
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
    ``get_dependencies``, which follows values through the programs' tensor operations),
    ``"one latent site"`` (no other latent site to depend on: nothing to track) or
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
    # Guide sites marked for enumeration (infer={"enumerate": ...}, config_enumerate), site -> the mark; the
    # evaluation sums them exactly (ppl_vae.enumerated). enumeration_size: the product of their numbers of values.
    enumerated: dict[str, str] = field(default_factory=dict)
    enumeration_size: int = 1


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


def slice_rows(data: Data, rows: slice) -> Data:
    """The same ``rows`` (a slice of dim 0) of every data argument."""
    return tuple(value[rows] for value in data)


def as_data(data: torch.Tensor | Data) -> Data:
    """x alone or (x, *cond), as the tuple of data arguments."""
    return (data,) if isinstance(data, torch.Tensor) else tuple(data)


def sample_sites(trace: poutine.Trace) -> dict[str, dict]:
    """The trace's sample sites by name, without subsample and deterministic sites."""
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
    data = as_data(data)
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
    data = as_data(data)
    x = data[0]
    # The inspection trace must not move the caller's random stream: with a fixed seed, an
    # estimate (or an IWAE loss) then draws exactly what a plain Trace_ELBO would.
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _explain_program_errors(data):
        model_trace, guide_trace = trace_pair(model, guide, data, None, 0)
    model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)
    with _explain_program_errors(data):  # shape and dtype mismatches surface when densities are computed
        check_observed_support(model_sites)
        for site in [*model_sites.values(), *guide_sites.values()]:
            site_log_prob(site)
    observed = [name for name, site in model_sites.items() if site["is_observed"]]
    latent = [name for name, site in model_sites.items() if not site["is_observed"]]
    _check_site_names(model_sites, guide_sites, observed, latent)
    max_plate_nesting, data_frame = _data_plate_frame(
        model_sites, guide_sites, observed, latent, x.shape[0], data_plate
    )
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
    for name in structure.enumerated:
        structure.enumeration_size *= _enumeration_size(guide_sites[name]["fn"], name)
    _choose_kl_methods(structure, model_sites, guide_sites, kl)
    return structure


def _enumeration_size(fn: Any, name: str) -> int:
    """How many values a guide site marked for enumeration takes; a one-line error for a distribution without a
    finite support (a Normal marked for enumeration)."""
    if not getattr(fn, "has_enumerate_support", False):
        raise ModelStructureError(
            f"guide site {name!r} is marked for enumeration, but its distribution {describe_distribution(fn)} has no "
            "finite support to sum over: mark only discrete sites (Categorical, Bernoulli, ...)"
        )
    return int(fn.enumerate_support(expand=False).shape[0])


def _check_site_names(model_sites: dict, guide_sites: dict, observed: list[str], latent: list[str]) -> None:
    """The model observes something, and the guide samples exactly the model's latent sites."""
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


def _data_plate_frame(
    model_sites: dict, guide_sites: dict, observed: list[str], latent: list[str], num_datapoints: int,
    data_plate: str | None,
) -> tuple[int, Any]:
    """The programs' plate nesting and the frame of the data plate, which must hold every site in both programs."""
    sites = [*model_sites.values(), *guide_sites.values()]
    frames = [frame for site in sites for frame in site["cond_indep_stack"]]
    if any(frame.vectorized and frame.dim is None for frame in frames) or any(not f.vectorized for f in frames):
        raise ModelStructureError("sequential plates (pyro.plate used as an iterator) are not supported")
    max_plate_nesting = max((-frame.dim for frame in frames), default=0)
    data_frame = find_data_plate(model_sites, observed, num_datapoints, data_plate)
    for name, site in [*((n, model_sites[n]) for n in latent), *((n, model_sites[n]) for n in observed)]:
        if data_frame.name not in {f.name for f in site["cond_indep_stack"]}:
            raise ModelStructureError(
                f"site {name!r} is not inside the data plate {data_frame.name!r}: per-datapoint "
                "evidence needs every latent and observed site to be local to a datapoint"
            )
    _check_guide_data_plate(guide_sites, latent, data_frame)
    return max_plate_nesting, data_frame


def _choose_kl_methods(structure: ProgramStructure, model_sites: dict, guide_sites: dict, kl: str) -> None:
    """Set each latent site's KL method (analytic where valid, unless ``kl="mc"``), its reason and order conflicts."""
    latent, dependencies = structure.latent_sites, structure.dependencies
    model_parents, guide_parents = structure.model_parents, structure.guide_parents
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
            reason = (f"torch has no analytic KL rule for {describe_distribution(q_fn)} against "
                      f"{describe_distribution(p_fn)}")
        else:
            reason = None
        structure.kl_methods[name] = KL_MONTE_CARLO if reason else KL_ANALYTIC
        if reason:
            structure.kl_reasons[name] = reason


def data_argument_names(count: int, names: Any = None) -> list[str]:
    """The names of the data arguments (x, *cond) in quantities: x, then ``names`` where the caller knows them
    (a run's ``--cond`` arrays), else y (one) or y1, y2, ... (several)."""
    if names is not None:
        return ["x", *names]
    return ["x"] + (["y"] if count == 2 else [f"y{i}" for i in range(1, count)])


def name_data_arguments(result: dict[str, Any], names: Any) -> dict[str, Any]:
    """``result`` (an evaluation summary) with the data arguments after x called ``names``, in its ``"quantity"``
    and ``"observed_sites"``: a run given a covariate c estimates log p(x | c), not log p(x | y), so its evidence
    is never paired with a labelled run's (``ppl-vae compare`` pairs equal quantities only). Labels stay y."""
    names = tuple(names)
    if not names or "observed_sites" not in result:
        return result
    mapping = dict(zip(data_argument_names(len(names) + 1), data_argument_names(len(names) + 1, names)))
    observed = {site: mapping.get(argument, argument) for site, argument in result["observed_sites"].items()}
    return {**result, "observed_sites": observed,
            "quantity": evidence_quantity(observed.values(), len(names) + 1, names)}


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


def evidence_quantity(observed: Any, num_arguments: int, names: Any = None) -> str:
    """The quantity the evidence estimates, from the data arguments the observed sites observe.

    ``observed`` holds argument names (:func:`data_argument_names`); those observed are the
    joint variables and the rest conditioning inputs, in argument order: ``"log p(x)"``,
    ``"log p(x | y)"`` (y only an input), ``"log p(x, y)"`` (y observed too). ``names``: of the arguments after
    x (:func:`data_argument_names`).
    """
    names = data_argument_names(num_arguments, names)
    seen = set(observed)
    variables = [name for name in names if name in seen]
    inputs = [name for name in names if name not in seen]
    return f"log p({', '.join(variables)}{' | ' + ', '.join(inputs) if inputs else ''})"


def describe_distribution(fn: Any) -> str:
    """A distribution's class, with the one inside Independent or an expansion, e.g. ``Independent(Normal)``."""
    inner = fn
    while hasattr(inner, "base_dist"):
        inner = inner.base_dist
    return type(fn).__name__ if inner is fn else f"{type(fn).__name__}({type(inner).__name__})"


ONE_LATENT_SITE = "one latent site"  # ProgramStructure.dependencies when there is nothing to track


def latent_parents(
    model: Callable, guide: Callable, data: Data, latent: list[str], guide_order: list[str]
) -> tuple[dict[str, set[str]], dict[str, set[str]], str]:
    """The direct latent parents of every latent site in the model and in the guide, and how they were found.

    Pyro's ``get_dependencies`` runs each program once with provenance-tracking tensors
    and reads which sites' values each density depends on. Where that fails on a program
    (an operation provenance tracking does not support), every earlier latent site counts
    as a parent: the order of the sites, a safe over-approximation. With one latent site (or none)
    there is no other latent site to be a parent, and the programs are not run again.
    """
    if len(latent) <= 1:
        return {name: set() for name in latent}, {name: set() for name in latent}, ONE_LATENT_SITE
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


def check_observed_support(model_sites: dict[str, dict]) -> None:
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


def find_data_plate(model_sites: dict, observed: list[str], n: int, name: str | None) -> Any:
    """The frame of the one vectorized plate of size ``n`` (named ``name``, if given) holding the observed sites."""
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


def site_log_prob(site: dict) -> torch.Tensor:
    """The log-density of a traced sample site at its value."""
    return site["fn"].log_prob(site["value"])

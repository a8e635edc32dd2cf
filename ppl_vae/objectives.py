r"""Training objectives: what SVI maximizes, all of them Pyro's own ELBO classes.

* ``elbo`` -- ``Trace_ELBO``: E_q[log p(x, z) - log q(z | x)] estimated with ``particles``
  draws per datapoint (vectorized when more than one);
* ``meanfield`` -- ``TraceMeanField_ELBO``: the same bound with the KL term analytic where a
  rule is registered (lower variance, same expectation);
* ``iwae`` -- the importance-weighted bound of Burda et al. (2015), per datapoint:

  .. math:: \mathcal{L}_K(x) = E_{z_{1..K} \sim q}\Big[\log \frac{1}{K} \sum_k \frac{p(x, z_k)}{q(z_k | x)}\Big]

  With K = 1 it is the ELBO; it tightens as K grows. This is ``RenyiELBO(alpha=0)``:
  Pyro sums the log-weights only over *dependent* plate dimensions, so with local latents
  inside the data plate the log-mean-exp is taken per datapoint
  (``tests/test_variants.py`` checks it against the per-datapoint bound computed by
  :mod:`ppl_vae.evaluate` from the same draws).

Which objective applies to which guide sites (:func:`check_objective_sites`, run by the trainer before
anything is written): ``elbo`` to every reparameterized and non-reparameterized site (score-function
gradients for the latter); ``meanfield`` and ``iwae`` to reparameterized sites only (for a Categorical
or Bernoulli guide site, meanfield has no score-function term and iwae multiplies it by 0); only
``elbo`` to a program with guide sites marked for enumeration, as ``TraceEnum_ELBO``.

**Enumeration.** A guide site marked ``infer={"enumerate": "parallel"}`` (or by ``config_enumerate``;
:func:`enumerate_discrete_sites` marks every discrete guide site, ``--enumerate``) is summed out exactly:
``--objective elbo`` is then ``TraceEnum_ELBO`` (:func:`make_objective` with ``enumerated=True``), which
for a discrete y ~ q(y | x) and the rest z ~ q(z | x, y) computes

.. math:: \mathcal{L}(x) = \sum_y q(y | x) \, E_{q(z | x, y)}\big[\log p(x, y, z) - \log q(z | x, y) - \log q(y | x)\big]

with the sum over y exact (every value at once, in a tensor dimension left of the plates: the programs'
``max_plate_nesting`` must be known) and gradients through q(y | x) exact too, no score-function term.
``JitTraceEnum_ELBO`` compiles it where :func:`compiled_loss_problem` (``enumerated=True``) finds it
equal to ``TraceEnum_ELBO`` on the first batch.
``experiments/objective_gradients.py`` measures the classifier's gradient of an M2 program under each.

The KL weight beta (with its warm-up schedule) is not an objective: it is a scale on every
latent site of the model and guide, applied by the trainer to any program
(:class:`ppl_vae.programs.Weighted`, for the built-in VAE too: the one KL-weight mechanism).

The same objectives as torch modules (for a torch optimizer, ``DistributedDataParallel``
and the compiled fast path): :class:`ProgramLoss` is Pyro's ``ELBOModule``
(``Trace_ELBO()(model, guide)``) for a program (the VAE, or any module with ``model`` and
``guide`` methods; with the KL weight, the :class:`ppl_vae.programs.Weighted` wrapping it), and :class:`CompiledProgramLoss` the same loss
with Pyro's ``JitTrace_ELBO``, which traces the model and guide once with
``torch.jit.trace`` and replays the graph, skipping Pyro's per-step Python work. Either
way the loss is computed from the VAE's Pyro programs; nothing is rewritten by hand.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import os
import warnings
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pyro
import torch
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from pyro.infer.elbo import ELBOModule

from .errors import ModelStructureError, PplVaeError

OBJECTIVES = ("elbo", "meanfield", "iwae")
# The VAE's programs have one plate, over the data; the particle plate goes left of it.
MAX_PLATE_NESTING = 1


def make_objective(name: str = "elbo", particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING,
                   enumerated: bool = False) -> ELBO:
    """The loss for ``SVI(model, guide, optim, loss)`` by name (see the module docstring).

    ``enumerated``: the program's guide marks sites for enumeration (``ProgramStructure.enumerated`` not empty);
    ``elbo`` is then ``TraceEnum_ELBO`` with the program's ``max_plate_nesting``, and the others are refused.
    """
    check_objective(name, particles)
    options = _elbo_options(particles, max_plate_nesting)
    if enumerated:
        check_enumerated_objective(name)
        # strict_enumeration_warning off: a labelled batch of a semi-supervised program observes y, so nothing is
        # enumerated on it, and that is expected (the unlabelled batches enumerate).
        return TraceEnum_ELBO(strict_enumeration_warning=False, **options)
    if name == "iwae":
        return RenyiELBO(alpha=0.0, **options)
    return (Trace_ELBO if name == "elbo" else TraceMeanField_ELBO)(**options)


def check_objective(name: str, particles: int = 1, compiled: bool = False) -> None:
    """Refuse an unknown objective, fewer than one particle, or (``compiled``) an objective Pyro cannot compile."""
    if name not in OBJECTIVES:
        raise PplVaeError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    if particles < 1:
        raise PplVaeError(f"particles must be at least 1, got {particles}")
    if compiled and name not in COMPILED_OBJECTIVES:
        raise PplVaeError(
            f"--engine jit compiles --objective {' or '.join(COMPILED_OBJECTIVES)} only, not {name} (Pyro 1.9 has no "
            f"working compiled version of it): train --objective {name} with --engine svi"
        )


def check_meanfield(model, guide, x: torch.Tensor, *cond: torch.Tensor) -> None:
    """Refuse ``TraceMeanField_ELBO`` for a program where it would optimize the wrong objective.

    ``TraceMeanField_ELBO`` takes every latent site's KL analytically, KL(q(z_i | ·) || p(z_i | pa_i)),
    which is that site's ELBO term only when none of its model parents pa_i is drawn after it in
    the guide from a value that depends on it (Pyro only warns). The dependencies are read from the
    programs, on ``x`` (and ``cond``), by :func:`ppl_vae.inspection.inspect_program`.
    """
    from .inspection import check_data, inspect_program

    structure = inspect_program(model, guide, check_data(x, cond))
    if structure.order_conflicts:
        sites = "; ".join(f"site {name!r}: model parent(s) {parents}"
                          for name, parents in structure.order_conflicts.items())
        raise ModelStructureError(
            f"--objective meanfield (TraceMeanField_ELBO) needs every latent site's model parents drawn before it in "
            f"the guide, and this program's guide draws them after ({sites}; dependencies by "
            f"{structure.dependencies}): its analytic KL terms would not add up to the ELBO. Train it with "
            "--objective elbo (the same bound, Monte Carlo KL) or reorder the guide"
        )


ENUMERATING_OBJECTIVES = ("elbo",)


def check_enumerated_objective(name: str, site: str | None = None) -> None:
    """Refuse an objective that cannot sum out enumerated guide sites, naming the one that can."""
    if name in ENUMERATING_OBJECTIVES:
        return
    where = f"guide site {site!r} is" if site else "guide sites are"
    raise ModelStructureError(
        f"{where} marked for enumeration, and --objective {name} cannot sum it out ("
        f"{'RenyiELBO' if name == 'iwae' else 'TraceMeanField_ELBO'} has no enumerated version; it would draw the site "
        "instead): train it with --objective elbo, which is TraceEnum_ELBO for such a program"
    )


def enumerate_discrete_sites(program: torch.nn.Module) -> torch.nn.Module:
    """Mark every discrete guide site of ``program`` for parallel enumeration (``--enumerate``), in place.

    The guide becomes ``config_enumerate(program.guide)``: every sample site whose distribution has enumerate
    support (Categorical, Bernoulli, OneHotCategorical, ...) is summed out by ``TraceEnum_ELBO`` and by the
    evaluation instead of drawn; continuous sites are unchanged. An instance attribute, so the module's
    parameters and ``state_dict`` are untouched. Returns ``program``. Whether anything was marked is read from
    the program's structure afterwards (:func:`check_enumerate_found`).
    """
    if not getattr(program, "_ppl_vae_enumerated", False):
        program.guide = config_enumerate(program.guide, default="parallel")
        program._ppl_vae_enumerated = True
    return program


def check_enumerate_found(structure) -> None:
    """Refuse ``--enumerate`` for a program whose guide has no discrete site (nothing would be summed out)."""
    if not structure.enumerated:
        raise ModelStructureError(
            "--enumerate: the program's guide has no discrete sample site (none with enumerate support, e.g. "
            "Categorical or Bernoulli) to sum out: train it without --enumerate"
        )


def check_objective_sites(name: str, structure, trains_enumerated: bool = False) -> None:
    """Refuse an objective whose gradient estimator this program's guide sites break (before anything is written).

    ``structure`` is the program's :class:`ppl_vae.inspection.ProgramStructure` (its guide sites: reparameterized or
    not, marked for enumeration or not). Pyro's estimators, per non-reparameterized guide site y ~ q(y | x):

    * ``elbo`` (``Trace_ELBO``): the score-function term log q(y | x) * (downstream cost), detached; unbiased.
    * ``iwae`` (``RenyiELBO(alpha=0)``): that term is multiplied by alpha / (1 - alpha) = 0, so q(y | x) gets
      exactly zero gradient: refused.
    * ``meanfield`` (``TraceMeanField_ELBO``): no score-function term at all, a biased gradient (Pyro refuses it
      only with validation on): refused.

    A guide site marked for enumeration: ``elbo`` trains it as ``TraceEnum_ELBO`` where the caller does
    (``trains_enumerated``: it builds the loss with ``make_objective(..., enumerated=True)``); ``iwae`` and
    ``meanfield`` are refused naming ``elbo`` (:func:`check_enumerated_objective`). Non-reparameterized sites that
    are not enumerated keep the rules above. A caller that does not pass ``trains_enumerated`` would draw the
    site silently, so the mark is refused then.
    """
    if structure.enumerated:
        site, mark = next(iter(structure.enumerated.items()))
        if trains_enumerated:
            check_enumerated_objective(name, site)
            return  # elbo: TraceEnum_ELBO sums the marked sites and gives the others score-function terms
        raise ModelStructureError(
            f"guide site {site!r} is marked for enumeration (infer={{'enumerate': {mark!r}}}), and ppl_vae does not yet "
            "train enumerated programs (TraceEnum_ELBO): remove the mark (or config_enumerate) and train with "
            "--objective elbo, which draws the site and gives it score-function gradients"
        )
    if not structure.non_reparameterized or name == "elbo":
        return
    site, distribution = next(iter(structure.non_reparameterized.items()))
    why = {
        "iwae": "--objective iwae (RenyiELBO, alpha=0) multiplies its score-function term by alpha/(1-alpha) = 0, so "
                "q gets no gradient from it",
        "meanfield": "--objective meanfield (TraceMeanField_ELBO) has no score-function term for it, so its gradient "
                     "is biased",
    }[name]
    raise ModelStructureError(
        f"guide site {site!r} ({distribution}) is not reparameterized: {why}. Train it with --objective elbo "
        "(Trace_ELBO: score-function gradients for such sites)"
    )


def _elbo_options(particles: int, max_plate_nesting: int) -> dict:
    return dict(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=max_plate_nesting)


class ProgramLoss(ELBOModule):
    """Pyro's ``ELBOModule`` for a VAE: ``forward(x)`` is the objective's ``differentiable_loss`` of its programs.

    ``Trace_ELBO()(model, guide)`` returns an ``ELBOModule`` whose parameters are those of
    ``model`` and ``guide`` as modules; the VAE's programs are methods of one module, so
    that module is registered here and its parameters are this module's. The loss is the
    negative objective summed over the datapoints of ``x`` (with beta, the beta-weighted
    objective), as ``SVI`` minimizes it; ``vae.register_params`` is turned off, since the
    torch optimizer gets the parameters from the module, not from Pyro's param store.
    """

    def __init__(self, vae: torch.nn.Module, elbo: ELBO):
        if not callable(getattr(elbo, "differentiable_loss", None)):
            raise PplVaeError(f"{type(elbo).__name__} has no differentiable_loss: it cannot be used as a torch module")
        super().__init__(vae.model, vae.guide, elbo)
        self.vae = vae
        vae.register_params = False


# What CompiledProgramLoss compiles. Not meanfield: Pyro 1.9's JitTraceMeanField_ELBO checks a cache attribute it
# never sets, so it traces again on every call (measured 2.7 times slower than not compiling), and
# TraceMeanField_ELBO.differentiable_loss wrapped in pyro.ops.jit.trace returned wrong loss values (right
# gradients) on batches other than the traced one. Not iwae: RenyiELBO has no JIT version.
COMPILED_OBJECTIVES = ("elbo",)


# The graph takes its parameters from Pyro's param store by name; pyro.module keeps a tensor already stored
# under a name, so the VAE's own parameters are then not inputs and torch.jit.trace refuses them.
_FOREIGN_PARAMETERS = (
    "the compiled loss cannot take this VAE's parameters as inputs: Pyro's param store holds other tensors under "
    "their names (another model built in this process?), or the programs use a tensor that requires grad without "
    "registering it with pyro.module or pyro.param. Call pyro.clear_param_store() before building the compiled loss"
)


class CompiledProgramLoss(torch.nn.Module):
    """The loss of :class:`ProgramLoss` with ``Trace_ELBO``, compiled by Pyro's ``JitTrace_ELBO``.

    ``forward(x)`` is the negative ELBO summed over ``x`` (nats), differentiable, as
    ``ProgramLoss`` returns it. ``JitTrace_ELBO`` traces the VAE's programs once with
    ``torch.jit.trace`` and replays the graph, skipping Pyro's per-step Python work. Its
    ``loss_and_surrogate_loss`` is used, not its ``differentiable_loss``: in Pyro 1.9 that
    returns ``loss + (surrogate - surrogate.detach())`` with ``loss`` not detached, which
    doubles the gradient of every reparameterized site (``tests/test_compiled.py``).

    A trace holds everything that was a Python value when it was taken, so one graph is
    compiled per *compile key*: the batch's shape, dtype and device, and the KL weight
    ``kl_weight`` of the program (:class:`ppl_vae.programs.Weighted`; a Python float the trace bakes in). Pyro's own cache is keyed by
    the number of arguments only, which would replay a graph traced for one batch size
    on another and keep the first beta of a warm-up; the key is passed to it as keyword
    arguments, which it does hash. A KL warm-up therefore compiles one graph per epoch.

    Compiling runs the programs (three times, inside Pyro) and would consume random
    draws; it runs with the random streams forked, so the draws of the steps do not
    depend on when graphs were compiled (a resumed run continues exactly). The traced
    graph draws its noise with ``torch.normal``, so from the same seed it uses other
    draws than ``Trace_ELBO``: the same estimator, other Monte Carlo noise.

    The compiled function finds the parameters through Pyro's param store, so the VAE
    keeps registering them with ``pyro.module``; they are the VAE's own tensors, which a
    torch optimizer over ``vae.parameters()`` updates. Pyro's validation is off inside
    the trace: check the data's support beforehand (``ppl_vae.training`` checks all the
    data once).
    """

    def __init__(self, vae: torch.nn.Module, objective: str = "elbo", particles: int = 1,
                 max_plate_nesting: int = MAX_PLATE_NESTING, trace_warnings: bool = False, enumerated: bool = False):
        super().__init__()
        check_objective(objective, particles, compiled=True)
        self.vae = vae
        vae.register_params = True
        # trace_warnings: let tracing's TracerWarnings through (compiled_loss_problem reads them); training hides them.
        options = dict(ignore_jit_warnings=not trace_warnings, **_elbo_options(particles, max_plate_nesting))
        # enumerated: JitTraceEnum_ELBO, TraceEnum_ELBO compiled (its differentiable_loss is the dice ELBO, whose
        # gradient is right: no separate surrogate to combine).
        self.enumerated = enumerated
        self.elbo = JitTraceEnum_ELBO(strict_enumeration_warning=False, **options) if enumerated \
            else JitTrace_ELBO(**options)

        # Programs that accept (and ignore) the compile key, which JitTrace_ELBO passes on to them;
        # defined once, since Pyro keys its cache on their id().
        def model(*data: torch.Tensor, **compile_key) -> torch.Tensor:
            return vae.model(*data)

        def guide(*data: torch.Tensor, **compile_key) -> torch.Tensor:
            return vae.guide(*data)

        self._programs = (model, guide)
        self._compiled_keys: set[tuple] = set()

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        key = {"shape": tuple(x.shape), "dtype": str(x.dtype), "device": str(x.device),
               "kl_weight": float(getattr(self.vae, "kl_weight", 1.0)),
               **({"cond": tuple((tuple(c.shape), str(c.dtype)) for c in cond)} if cond else {})}
        frozen = tuple(sorted(key.items()))
        if frozen not in self._compiled_keys:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), warnings.catch_warnings():
                # torch 2.15 marks torch.jit.trace deprecated; Pyro 1.9's JIT ELBOs are built on it (nothing to act on).
                warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=FutureWarning)
                try:
                    self._loss(x, *cond, **key)
                except RuntimeError as error:
                    if "requires grad as a constant" not in str(error):
                        raise
                    raise PplVaeError(_FOREIGN_PARAMETERS) from error
            self._compiled_keys.add(frozen)
        return self._loss(x, *cond, **key)

    def _loss(self, *data: torch.Tensor, **key) -> torch.Tensor:
        if self.enumerated:
            return self.elbo.differentiable_loss(*self._programs, *data, **key)
        loss, surrogate = self.elbo.loss_and_surrogate_loss(*self._programs, *data, **key)
        return loss.detach() + (surrogate - surrogate.detach())


def make_loss_module(
    vae: torch.nn.Module, objective: str = "elbo", particles: int = 1, compiled: bool = False,
    max_plate_nesting: int = MAX_PLATE_NESTING, enumerated: bool = False,
) -> torch.nn.Module:
    """The objective of a program's ``model`` and ``guide`` as a torch module: :class:`CompiledProgramLoss` or :class:`ProgramLoss`.

    ``enumerated``: the guide marks sites for enumeration; the loss is ``TraceEnum_ELBO`` (compiled:
    ``JitTraceEnum_ELBO``), see :func:`make_objective`."""
    if compiled:
        if enumerated:
            check_enumerated_objective(objective)
        return CompiledProgramLoss(vae, objective, particles, max_plate_nesting, enumerated=enumerated)
    return ProgramLoss(vae, make_objective(objective, particles, max_plate_nesting, enumerated))


@contextlib.contextmanager
def fixed_standard_normal() -> Iterator[None]:
    """Hold the standard-normal noise of Normal and MultivariateNormal draws fixed (a function of its shape only).

    The compiled graph draws with ``torch.normal``, ``Trace_ELBO`` with ``Tensor.normal_``, so the
    same seed gives other draws; with the noise fixed the two losses can be compared exactly.
    Compiling under this context bakes the fixed noise into the graph: compile only throw-away losses here.
    """
    def standard_normal(shape, dtype, device):
        count = torch.Size(shape).numel()
        values = torch.linspace(-1.7, 1.7, 97).repeat(count // 97 + 1)[:count]
        return values.reshape(shape).to(dtype=dtype, device=device)

    modules = (torch.distributions.normal, torch.distributions.multivariate_normal)
    saved = [module._standard_normal for module in modules]
    for module in modules:
        module._standard_normal = standard_normal
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module._standard_normal = original


class UnfaithfulTrace(str):
    """A reason the compiled loss is not a faithful stand-in for the program: ``torch.jit.trace`` recorded one path
    through its Python (a value turned into a Python bool or number, Python state the program changes, a site the
    check cannot hold fixed), so other batches or later steps may take another. ``--engine jit`` is refused with it."""


# Where TracerWarnings come from shape checks only: each compile key fixes the batch's shape, so these hold for every
# batch a graph is replayed on. A TracerWarning from any other file (the user's program) may be a data-dependent path.
_SHAPE_CHECKING_LIBRARIES = tuple(str(Path(module.__file__).parent) + os.sep for module in (torch, pyro)) + (
    str(Path(__file__).parent) + os.sep,)


def site_kind_problem(structure, enumerated: bool = False) -> UnfaithfulTrace | None:
    """Why the compiled loss cannot be checked on a program with these guide sites (None when it can).

    The check holds Normal draws fixed; a non-reparameterized site's draws (Categorical, Bernoulli) are not held.
    Enumerated sites are not drawn: with ``enumerated`` (the run trains with ``TraceEnum_ELBO``, compiled as
    ``JitTraceEnum_ELBO``) they are no problem; without it, their marks are not compiled.
    ``structure``: :class:`ppl_vae.inspection.ProgramStructure`.
    """
    if structure.enumerated and not enumerated:
        site = next(iter(structure.enumerated))
        return UnfaithfulTrace(f"guide site {site!r} is marked for enumeration, which the compiled loss does not do")
    drawn = {s: d for s, d in structure.non_reparameterized.items() if s not in structure.enumerated}
    if drawn:
        site, distribution = next(iter(drawn.items()))
        return UnfaithfulTrace(f"non-reparameterized site {site!r} ({distribution}): the compiled loss is checked only "
                               "for reparameterized sites")
    return None


def _program_state(program: torch.nn.Module) -> dict[str, Any]:
    """What running the program may change besides its parameters: the plain Python values (numbers, strings,
    None) its modules hold as public attributes, and its buffers (e.g. BatchNorm's running statistics)."""
    state: dict[str, Any] = {f"{prefix}.{name}".lstrip("."): repr(value)
                             for prefix, module in program.named_modules() for name, value in vars(module).items()
                             if not name.startswith("_") and isinstance(value, (bool, numbers.Number, str, type(None)))}
    state.update({name: buffer.detach().clone() for name, buffer in program.named_buffers()})
    # "program.": Weighted's wrapping, not a name the user wrote.
    return {name.removeprefix("program."): value for name, value in state.items()}


def _state_problem(before: dict[str, Any], after: dict[str, Any]) -> UnfaithfulTrace | None:
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
        return a == b

    changed = [name for name, value in after.items() if name not in before or not same(before[name], value)]
    if not changed:
        return None
    kind = "buffer" if isinstance(after[changed[0]], torch.Tensor) else "attribute"
    return UnfaithfulTrace(f"running the program changes its {'buffers' if kind == 'buffer' else 'Python state'} "
                           f"({kind} {changed[0]!r}), which a compiled trace would freeze")


def _user_tracer_warning(caught: list[warnings.WarningMessage]) -> str | None:
    for warning in caught:
        if issubclass(warning.category, torch.jit.TracerWarning) and \
                not warning.filename.startswith(_SHAPE_CHECKING_LIBRARIES):
            text = str(warning.message).split(". ")[0]
            return f"TracerWarning at {Path(warning.filename).name}:{warning.lineno} ({text})"
    return None


def _close_to_scale(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float = 1e-5) -> bool:
    """max |got - want| <= atol + rtol * max |want|: equal to float32 rounding at the gradient's own scale.

    Not elementwise: a gradient entry that is a sum of cancelling terms (the classifier's under enumeration,
    sum_y q(y | x) (...)) is near 0 while its rounding error is that of the terms, so an elementwise rtol
    refuses two computations that agree to 1e-6 of the tensor's scale.
    """
    return float((got - want).abs().max()) <= atol + rtol * float(want.abs().max())


def _compare(program, batch, params, reference_elbo, compiled_loss, rtol: float) -> str | None:
    """Why the compiled loss on ``batch`` is not the reference's (Trace_ELBO or TraceEnum_ELBO), with the draws held
    fixed (None when it is)."""
    reference = type(reference_elbo).__name__
    expected = reference_elbo.differentiable_loss(program.model, program.guide, *batch)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    compiled = compiled_loss(*batch)
    grads = torch.autograd.grad(compiled, params, allow_unused=True)
    if not torch.allclose(compiled.detach(), expected.detach(), rtol=rtol, atol=1e-6):
        return (f"the compiled loss {float(compiled.detach()):.6g} differs from {reference}'s "
                f"{float(expected.detach()):.6g} with the same draws")
    for param, got, want in zip(params, grads, expected_grads):
        if (got is None) != (want is None) or (got is not None and not _close_to_scale(got, want, rtol)):
            return f"the compiled loss's gradients differ from {reference}'s (a parameter of shape {list(param.shape)})"
    return None


def compiled_loss_problem(
    program: torch.nn.Module, batch: tuple[torch.Tensor, ...], particles: int = 1,
    max_plate_nesting: int = MAX_PLATE_NESTING, rtol: float = 1e-4, second_batch: tuple[torch.Tensor, ...] | None = None,
    enumerated: bool = False,
) -> str | None:
    """Why the compiled loss cannot stand in for ``Trace_ELBO`` on ``program`` (None when it can).

    On ``batch``, with the draws held fixed (:func:`fixed_standard_normal`), a throw-away
    :class:`CompiledProgramLoss` must give ``Trace_ELBO``'s loss and gradients to relative
    tolerance ``rtol``; a program whose draws the fixing does not reach (other reparameterized
    distributions) differs, and is refused too. The trace must also be faithful (an
    :class:`UnfaithfulTrace` reason otherwise): running the programs changes no plain Python
    attribute or buffer of their modules (a counter, BatchNorm's running statistics: the trace
    would freeze them), tracing raises no
    ``TracerWarning`` outside torch, Pyro and ppl_vae (their warnings are shape checks, fixed per
    compile key), and the graph traced on ``batch``, replayed on ``second_batch`` (same shape,
    other content), gives Trace_ELBO's loss and gradients there too. The random streams and the
    parameters' gradients are left as they were.

    ``enumerated`` (a program whose guide marks sites for enumeration): the same check of
    ``JitTraceEnum_ELBO`` against ``TraceEnum_ELBO``, with the program's ``max_plate_nesting``.

    The throw-away graph runs with TorchScript's graph optimizations off (``torch.jit.optimized_execution``):
    what is checked is what the trace recorded, which the optimizations must not change. With them on, its
    two runs are spent profiling and then optimizing a graph that is thrown away (the training loss's own graph
    is optimized at its first steps): the check took 0.13-0.17 s with them and 0.04-0.05 s without (784-32-4
    VAE, batch 50, one thread).
    """
    # A copy in a param store of its own: the check touches neither the program's gradients (nor hooks on
    # them) nor the names Pyro's store holds for the training run.
    program = copy.deepcopy(program)
    params = [p for p in program.parameters() if p.requires_grad]
    options = _elbo_options(particles, max_plate_nesting)
    reference_elbo = TraceEnum_ELBO(strict_enumeration_warning=False, **options) if enumerated else Trace_ELBO(**options)
    devices = [batch[0].device] if batch[0].device.type == "cuda" else []
    try:
        with pyro.get_param_store().scope(), torch.random.fork_rng(devices=devices), fixed_standard_normal(), \
                torch.jit.optimized_execution(False), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=FutureWarning)
            before = _program_state(program)
            reference_elbo.differentiable_loss(program.model, program.guide, *batch)
            if (changed := _state_problem(before, _program_state(program))) is not None:
                return changed
            compiled_loss = CompiledProgramLoss(program, "elbo", particles, max_plate_nesting, trace_warnings=True,
                                                enumerated=enumerated)
            problem = _compare(program, batch, params, reference_elbo, compiled_loss, rtol)
            if (warned := _user_tracer_warning(caught)) is not None:
                return UnfaithfulTrace(f"the trace is not faithful to the program's Python: {warned}")
            if problem is None and second_batch is not None:
                if (other := _compare(program, second_batch, params, reference_elbo, compiled_loss, rtol)) is not None:
                    return UnfaithfulTrace(f"on a second batch of other content, {other}: the trace of the first batch "
                                           "does not hold for it")
    except Exception as error:  # noqa: BLE001 -- any failure to compile or run means: do not use the compiled loss
        return f"the compiled loss failed on this program ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return problem


# The names of earlier versions (deprecated: the losses are any program's, not only the VAE's).
VAELoss = ProgramLoss
CompiledVAELoss = CompiledProgramLoss

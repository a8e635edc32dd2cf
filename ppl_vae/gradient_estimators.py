r"""Lower-variance gradient estimators for reparameterized guides: STL for the ELBO, DReG for the IWAE bound.

Both are Pyro ``ELBO`` classes (``loss``, ``loss_and_grads`` for ``SVI``, ``differentiable_loss`` for a torch
optimizer or :class:`ppl_vae.objectives.ProgramLoss`), for any program whose guide sample sites are all reparameterized.
Their loss *values* are exactly those of ``Trace_ELBO`` and ``RenyiELBO(alpha=0)`` on the same draws; only the
gradients change, and they keep the same expectation.

Notation: one draw z = z(eps, phi) ~ q_phi(z | x) (all guide sites), log w = log p_theta(x, z) - log q_phi(z | x).
A gradient of log w splits into

* the *direct* part: the derivative through the distribution parameters with the drawn values held fixed
  (d/dtheta log p(x, sg z), and the score d/dphi log q_phi(sg z), whose expectation under q is zero), and
* the *path* part: the derivative through the drawn values z(eps, phi) (``sg``: stop-gradient, ``detach``).

How the parts are separated, for any program, without knowing where the parameters live (``nn.Module``,
``PyroModule``, ``pyro.param``, closures):

* the guide is run a second time under ``poutine.replay`` of the first run's trace **with its values detached**:
  that run's log q_phi(sg z) carries exactly the score (direct) part, so log q_phi(z) - log q_phi(sg z) is the path
  part of log q. Hierarchical guides stay right: in q(z2 | z1) the dependence of q's parameters on z1(eps, phi) is
  path, and stays in the first run's graph. The guide runs once per datapoint, not per particle (its networks read x),
  so this is cheap; it must give the first run's densities, and a guide that draws other randomness (dropout in
  training mode) is refused on the first step;
* (DReG) the model is run once, under replay of the guide's values as fresh leaf tensors z' = sg(z) (requiring
  grad): backpropagating log p_theta(x, z') reaches the model's parameters directly only, and
  ``torch.autograd.grad`` with respect to z' gives the partial derivatives d log p / dz per site and draw (with the
  other sites' values fixed), which re-enter the graph through the draws as ``sg(g) * z``. The model, which runs
  K times per datapoint, is not run twice.

**STL** (sticking the landing, Roeder, Wu & Duvenaud 2017), for ``--objective elbo``: the surrogate, per draw,

.. math:: \hat{\mathcal{L}}_{STL} = \log p_\theta(x, z) - \log q_\phi(z) + \log q_\phi(\mathrm{sg}\,z)
          - \mathrm{sg}[\log q_\phi(\mathrm{sg}\,z)]

has the ELBO's value and the gradient of ``Trace_ELBO`` less the score term (zero mean): unbiased, and its variance
goes to zero as q approaches the posterior. Model parameters get Trace_ELBO's gradient unchanged.

**DReG** (doubly reparameterized, Tucker, Lawson, Gu & Maddison 2018), for ``--objective iwae`` with K draws per
datapoint and normalized weights :math:`\tilde w_k = w_k / \sum_j w_j` (held constant, ``sg``):

.. math:: \hat{\mathcal{L}}_{DReG} = \sum_k \tilde w_k \log p_\theta(x, z'_k) + \mathrm{sg}(g_k) \cdot z_k
          - \tilde w_k^2 \big[\log q_\phi(z_k) - \log q_\phi(\mathrm{sg}\,z_k)\big],
          \qquad g_k = \tilde w_k^2\, \partial \log p_\theta(x, z'_k) / \partial z'_k

(plus a constant that makes its value the IWAE bound). The first term is the standard IWAE gradient of the model's
parameters; the other two are the path gradient of log w_k weighted by the squared normalized weights, which
replaces the score terms (Tucker et al. 2018, eq. 5). Its expectation is the IWAE gradient, and the inference
network's signal-to-noise ratio grows with K instead of decaying like 1/sqrt(K) (Rainforth et al. 2018). The
log-weights are summed over the plates that are not common to all sites, exactly as ``RenyiELBO`` does, so with local
latents inside the data plate the bound (and the weights) are per datapoint.

Cost per step, measured on the CPU (one thread, the default MNIST VAE, batch 100): ``Trace_ELBO`` 33 ms, STL 40 ms;
IWAE K = 50: ``RenyiELBO`` 0.48-0.59 s, DReG 1.05 s (the model's backward runs twice: once for the partials g).
BatchNorm layers with running statistics are refused (:func:`check_gradient_program`): the guide's second run would
move them twice per step.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.util import get_dependent_plate_dims, is_validation_enabled, torch_sum
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape, warn_if_nan
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ModelStructureError, PplVaeError

GRADIENTS = ("standard", "stl", "dreg")
# Which gradient estimator applies to which objective (besides "standard", which applies to every objective).
ESTIMATOR_OBJECTIVE = {"stl": "elbo", "dreg": "iwae"}


def check_gradient(gradient: str, objective: str) -> None:
    """Refuse an unknown estimator, or one that is not an estimator of ``objective``'s gradient (one line each)."""
    if gradient not in GRADIENTS:
        raise PplVaeError(f"unknown gradient estimator {gradient!r}: choose one of {', '.join(GRADIENTS)}")
    if gradient == "standard" or ESTIMATOR_OBJECTIVE[gradient] == objective:
        return
    why = {
        ("stl", "iwae"): "STL applied to the IWAE bound is biased (Tucker et al. 2018): use --gradient dreg",
        ("dreg", "elbo"): "DReG is the IWAE estimator (with one draw it is STL): use --gradient stl",
    }.get((gradient, objective), f"--gradient {gradient} is for --objective {ESTIMATOR_OBJECTIVE[gradient]} only")
    raise PplVaeError(f"--gradient {gradient} cannot train --objective {objective}: {why}")


def check_gradient_sites(gradient: str, structure) -> None:
    """Refuse STL/DReG for a program with a non-reparameterized guide site, before anything is written.

    ``structure``: the program's :class:`ppl_vae.inspection.ProgramStructure`. Both estimators differentiate
    through the drawn values, which a Categorical or Bernoulli site does not have.
    """
    if gradient == "standard":
        return
    if getattr(structure, "enumerated", None):
        site = next(iter(structure.enumerated))
        raise ModelStructureError(f"--gradient {gradient} differentiates through the guide's draws, and guide site "
                                  f"{site!r} is enumerated (summed, not drawn): train it with --gradient standard")
    if structure.non_reparameterized:
        site, distribution = next(iter(structure.non_reparameterized.items()))
        raise ModelStructureError(_not_reparameterized(gradient, site, distribution))


def check_gradient_program(gradient: str, program: torch.nn.Module) -> None:
    """Refuse STL/DReG for a program with BatchNorm layers that keep running statistics, before training.

    Both estimators run the guide a second time per step; each run of a BatchNorm layer in training mode moves its
    running statistics, so a guide's layer would move twice per step and evaluation (which uses the statistics) would
    see other numbers than standard training gives, silently. The modules do not say which program uses them, so a
    BatchNorm layer anywhere in ``program`` (the module holding the model and guide) is refused. Dropout is caught on
    the first step instead (the second run gives other densities).
    """
    if gradient == "standard":
        return
    for name, module in program.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            raise ModelStructureError(
                f"--gradient {gradient} runs the guide twice per step, and the program's BatchNorm layer "
                f"{name.removeprefix('program.')!r} would update its running statistics twice if the guide uses it: "
                "train it with "
                "--gradient standard, or use a normalization without running statistics (LayerNorm)")


def _not_reparameterized(gradient: str, site: str, distribution: str) -> str:
    return (f"--gradient {gradient} differentiates through the guide's draws, and guide site {site!r} ({distribution}) "
            "is not reparameterized: train this program with --gradient standard")


def _detached(trace: poutine.Trace, leaves: bool = False) -> poutine.Trace:
    """A copy of ``trace`` whose sample sites hold their values detached (the sites' other entries shared); with
    ``leaves``, the floating-point latent values as new leaves that require grad (to differentiate with respect to)."""
    frozen = trace.copy()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and isinstance(site["value"], torch.Tensor):
            value = site["value"].detach()
            if leaves and value.is_floating_point() and not site["is_observed"] and torch.is_grad_enabled():
                value.requires_grad_()
            frozen.nodes[name] = {**site, "value": value}
    return frozen


class _PathwiseELBO(ELBO):
    """The traces STL and DReG need: the guide's, the model's (on the draws, or on them as leaves), and the guide's
    again on the draws detached (see the module docstring)."""

    gradient = "pathwise"  # its --gradient name, for messages
    model_on_leaves = False  # run the model on the guide's values as fresh leaves (DReG) instead of on the values

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf"),
                 vectorize_particles: bool = False):
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles)
        self._rerun_checked = False

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        # Subsample sites are kept in the replayed traces, so every run sees the same minibatch indices.
        frozen = _detached(guide_trace)
        leaves = _detached(guide_trace, leaves=True) if self.model_on_leaves else guide_trace
        model_trace = poutine.trace(poutine.replay(model, trace=leaves), graph_type="flat").get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_again = poutine.trace(poutine.replay(guide, trace=frozen)).get_trace(*args, **kwargs)
        model_trace, guide_trace, guide_again = (prune_subsample_sites(t) for t in (model_trace, guide_trace, guide_again))
        for trace in (model_trace, guide_trace, guide_again):
            trace.compute_log_prob()
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
        self._check_sites(model_trace, guide_trace)
        if not self._rerun_checked:
            self._check_rerun(guide_trace, guide_again)
            self._rerun_checked = True
        return model_trace, guide_trace, guide_again

    def _check_sites(self, model_trace: poutine.Trace, guide_trace: poutine.Trace) -> None:
        """Every guide site reparameterized, every model latent drawn by the guide (a loop over the sites)."""
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
                raise ModelStructureError(_not_reparameterized(self.gradient, name, type(site["fn"]).__name__))
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace.nodes:
                raise ModelStructureError(
                    f"--gradient {self.gradient} needs every latent site of the model drawn by the guide, and the guide "
                    f"does not draw model site {name!r}: add it to the guide or train with --gradient standard")

    def _check_rerun(self, guide_trace: poutine.Trace, guide_again: poutine.Trace) -> None:
        """The second run must reproduce the first run's densities; dropout (or other unrecorded randomness) breaks it."""
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            same = guide_again.nodes.get(name, {}).get("log_prob")
            if same is None or not torch.allclose(site["log_prob"].detach(), same.detach(), rtol=1e-4, atol=1e-4):
                raise ModelStructureError(
                    f"--gradient {self.gradient} runs the guide a second time on the same draws, and its site {name!r} "
                    "got another density: the guide uses randomness of its own (dropout in training mode?). Remove "
                    "it, or train with --gradient standard")

    @staticmethod
    def _site_sums(trace: poutine.Trace, sum_dims) -> torch.Tensor | float:
        total = 0.0
        for site in trace.nodes.values():
            if site["type"] == "sample":
                total = total + torch_sum(site["log_prob"], sum_dims)
        return total

    @staticmethod
    def _total(trace: poutine.Trace) -> torch.Tensor | float:
        return sum((site["log_prob_sum"] for site in trace.nodes.values() if site["type"] == "sample"), 0.0)

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        value = float(loss.detach())
        warn_if_nan(value, "loss")
        return value


class STLTrace_ELBO(_PathwiseELBO):
    """``Trace_ELBO`` with the sticking-the-landing gradient (see the module docstring): same value, no score term."""

    gradient = "stl"

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        elbo, surrogate = 0.0, 0.0
        for model_trace, guide_trace, guide_again in self._get_traces(model, guide, args, kwargs):
            particle = self._total(model_trace) - self._total(guide_trace)
            score = torch.as_tensor(self._total(guide_again))
            elbo = elbo + particle.detach()
            surrogate = surrogate + particle + (score - score.detach())
        # Value: Trace_ELBO's (the mean over particles); gradient: the surrogate's.
        surrogate = torch.as_tensor(surrogate)
        return -(torch.as_tensor(elbo) + surrogate - surrogate.detach()) / self.num_particles


class DReGRenyi_ELBO(_PathwiseELBO):
    """``RenyiELBO(alpha=0)`` (the IWAE bound, per datapoint) with the doubly reparameterized gradient.

    Pyro's ``RenyiELBO`` has no ``differentiable_loss``; this class has one (the same value as its ``loss``).
    """

    gradient = "dreg"
    model_on_leaves = True

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_p, log_q, direct_q, leaves, draws = [], [], [], [], []
        for model_trace, guide_trace, guide_again in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            for out, trace in zip((log_p, log_q, direct_q), (model_trace, guide_trace, guide_again)):
                out.append(torch.as_tensor(self._site_sums(trace, sum_dims)))
            for name, site in guide_trace.nodes.items():
                leaf = model_trace.nodes.get(name, {}).get("value")
                if site["type"] == "sample" and isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    leaves.append(leaf)
                    draws.append(site["value"])
        # Particles on dim 0: the vectorized trace has them there already; separate particles are stacked.
        log_p, log_q, direct_q = (torch.stack(t) if len(t) > 1 else t[0] for t in (log_p, log_q, direct_q))
        if self.num_particles == 1:
            log_p, log_q, direct_q = (t.unsqueeze(0) for t in (log_p, log_q, direct_q))
        log_w = (log_p - log_q).detach()
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)
        weights = torch.softmax(log_w, dim=0)
        surrogate = (weights * log_p).sum() - (weights.square() * (log_q - direct_q)).sum()
        if log_p.requires_grad and leaves:
            # g = w~^2 d log p / dz per draw (each draw enters only its own particle's and datapoint's log p).
            partials = torch.autograd.grad((weights.square() * log_p).sum(), leaves, retain_graph=True, allow_unused=True)
            surrogate = surrogate + sum((g.detach() * z).sum() for g, z in zip(partials, draws) if g is not None)
        return -(bound.sum() + surrogate - surrogate.detach())


def make_gradient_objective(gradient: str, objective: str, particles: int = 1, max_plate_nesting: int = 1) -> ELBO:
    """The ELBO class computing ``objective`` with the ``gradient`` estimator (``stl`` or ``dreg``; see the module)."""
    check_gradient(gradient, objective)
    if gradient == "standard":
        raise PplVaeError("make_gradient_objective builds stl or dreg; the standard estimators are "
                          "ppl_vae.objectives.make_objective's")
    cls = STLTrace_ELBO if gradient == "stl" else DReGRenyi_ELBO
    return cls(num_particles=particles, max_plate_nesting=max_plate_nesting, vectorize_particles=particles > 1)

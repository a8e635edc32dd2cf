r"""Annealed importance sampling (AIS) of log p(x) for any program with continuous latents, and BDMC.

**The path.** For one datapoint x, AIS anneals from the guide to the posterior through

.. math::

    f_\beta(z) = q(z \mid x)^{1-\beta}\, p(x, z)^{\beta}, \qquad 0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

whose normalizers are Z_0 = 1 (the guide is normalized) and Z_T = p(x). A chain starts at z_0 ~ q(z | x)
(Wu et al. 2017's encoder initialisation) and, for t = 1..T, adds to its log-weight

.. math::

    \log w \mathrel{+}= \log f_{\beta_t}(z_{t-1}) - \log f_{\beta_{t-1}}(z_{t-1})
                      = (\beta_t - \beta_{t-1}) \big[\log p(x, z_{t-1}) - \log q(z_{t-1} \mid x)\big],

then moves z_{t-1} -> z_t by an HMC transition that leaves f_{β_t} invariant (Neal 2001). Then E[w] = p(x)
exactly, and with C chains log p̂(x) = log (1/C) Σ_c w_c is a *stochastic lower bound*: E[log p̂(x)] <= log p(x)
by Jensen's inequality, and P(log p̂(x) > log p(x) + a) <= e^{-a} by Markov's. The bias shrinks as the
schedule gets finer (more steps T) and the transitions mix better (more leapfrog steps L).

**The schedule.** ``"sigmoid"`` (Grosse et al. 2015): β_t = (σ(δ(2t/T - 1)) - σ(-δ)) / (σ(δ) - σ(-δ)) with
δ = 4, dense at both ends; ``"geometric"``: β_t = 10^{-4 (1 - t/T)} for t >= 1 (β_0 = 0), dense near 0.

**The transitions.** HMC on all latent sites jointly, in unconstrained space: u = T^{-1}(z) with
T = ``biject_to(support)`` of each model site, whose density carries log |det J_T(u)| (the Jacobian is the
same for every β, so it cancels from the weights). T is fixed per site, so a support that moves with other
latent sites (z2 ~ Uniform(0, z1)) is refused in one line, found by comparing the supports under two guide
draws. The densities come from the programs' own Pyro traces (``poutine.condition`` at the chains' values), as
every other estimate of the package; nothing is rewritten per model. Chains and datapoints are vectorized (the chains in a plate left of the programs' plates); the
step size is one per datapoint (shared by all sites: no mass matrix). Observed Bernoulli sites on the CPU are
scored by :mod:`ppl_vae.fused` with its gradient from the same sigmoid pass (:class:`_BernoulliLogProb`), into
a workspace reused at every step, every other site by its own
``log_prob``; validation is off inside the trajectories, where a diverging step may reach values validation
would refuse (the Metropolis test rejects them).

**Step sizes without biasing the weights.** A transition whose step size depends on the same chains' past
leaves f_β invariant, but the weight's unbiasedness argument needs each transition's kernel to be fixed
given the state it moves, not chosen from the states' history. So the step sizes are adapted in a separate
*pilot* run (its own chains, a coarser schedule), towards ``target_accept`` from each transition's Metropolis
acceptance probability, and recorded as a function of β; the AIS run then uses that fixed table. Its kernels
depend only on randomness independent of its chains, so E[w] = p(x) holds exactly.

**BDMC** (Grosse et al. 2015): on data simulated from the model, (x, z) ~ p(x, z), z is an exact posterior
sample of its x. AIS run in reverse (β from 1 to 0) from z gives w' with E[w'] = 1 / p(x), so
-log (1/C) Σ_c w'_c is a stochastic *upper* bound. The bracket [forward, reverse] holds log p(x) (in
expectation) and its width bounds the forward AIS's bias on data like these: a certificate on simulated
data only (on real data the posterior sample is not available).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to, constraints

from . import fused
from .chunking import chunk_element_budget, per_datapoint
from .errors import InvalidDataError, ModelStructureError
from .estimators import evidence_from_weight_sums
from .inspection import (
    ProgramStructure,
    check_count,
    check_data,
    check_observed_support,
    describe_distribution,
    inspect_program,
    sample_sites,
    slice_rows,
)
from .modes import evaluation_mode

SCHEDULES = ("sigmoid", "geometric")
SIGMOID_SHARPNESS = 4.0
GEOMETRIC_START = 1e-4
CHAIN_PLATE = "_ppl_vae_ais_chains"
# Pilot adaptation: log(step size) moves by ADAPT_RATE * (acceptance probability - target) per transition.
ADAPT_RATE = 1.0
INITIAL_STEP_SIZE = 0.1


def beta_schedule(steps: int, schedule: str = "sigmoid") -> torch.Tensor:
    """β_0 = 0 < ... < β_T = 1 (float64, T + 1 values) of the ``"sigmoid"`` or ``"geometric"`` schedule."""
    steps = check_count(steps, "steps")
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    if schedule == "sigmoid":
        s = torch.sigmoid(SIGMOID_SHARPNESS * (2 * t - 1))
        betas = (s - s[0]) / (s[-1] - s[0])
    elif schedule == "geometric":
        betas = GEOMETRIC_START ** (1 - t)
        betas[0] = 0.0
    else:
        raise InvalidDataError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    betas[-1] = 1.0
    return betas


@dataclass
class AisEstimate:
    """Per-datapoint AIS results (float64 CPU tensors [N], nats), with the settings that produced them.

    * ``log_evidence`` -- log p̂(x) = log (1/C) Σ_c w_c over the C chains (a stochastic lower bound);
    * ``stderr`` -- its delta-method standard error over chains, sqrt(Var(w) / C) / mean(w);
    * ``ess`` -- the effective number of chains (Σ w)^2 / Σ w^2;
    * ``log_weights`` -- [N, C], each chain's log w;
    * ``acceptance`` -- the mean HMC acceptance probability over transitions and chains.
    """

    log_evidence: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    log_weights: torch.Tensor
    acceptance: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Layout:
    """Where a latent site's tensors keep the chains and the datapoints, and its map to unconstrained space."""

    transform: Any
    chain_axis: int
    data_axis: int
    ndim: int

    def spread(self, per_chain: torch.Tensor) -> torch.Tensor:
        """A [C, n] (or [n]) tensor viewed to broadcast against this site's unconstrained values."""
        shape = [1] * self.ndim
        if per_chain.dim() == 2:
            shape[self.chain_axis] = per_chain.shape[0]
        shape[self.data_axis] = per_chain.shape[-1]
        return per_chain.reshape(shape)

    def per_chain(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over every dim but the chains' and the datapoints': [C, n]."""
        other = [d for d in range(value.dim()) if d not in (self.chain_axis, self.data_axis)]
        return value.sum(other) if other else value


@dataclass
class _State:
    """Chains' unconstrained values and, there, log p(x, z), log q(z | x), log |det J| ([C, n]) and their gradients."""

    u: dict[str, torch.Tensor]
    log_p: torch.Tensor
    log_q: torch.Tensor
    log_j: torch.Tensor
    grad_p: dict[str, torch.Tensor]
    grad_q: dict[str, torch.Tensor]
    grad_j: dict[str, torch.Tensor]

    def log_f(self, beta: float) -> torch.Tensor:
        return beta * self.log_p + (1 - beta) * self.log_q + self.log_j

    def grad(self, beta: float) -> dict[str, torch.Tensor]:
        return {k: beta * self.grad_p[k] + (1 - beta) * self.grad_q[k] + self.grad_j[k] for k in self.u}


def _in_chains(fn: Callable, chains: int, dim: int) -> Callable:
    def wrapped(*args, **kwargs):
        with pyro.plate(CHAIN_PLATE, chains, dim=dim):
            return fn(*args, **kwargs)

    return wrapped


class _BernoulliLogProb(torch.autograd.Function):
    """:func:`ppl_vae.fused.bernoulli_log_prob` with its gradient in the logits, d/dl [x l - softplus(l)] = x - σ(l).

    torch's ``Bernoulli.log_prob`` (binary cross-entropy) forward and backward took about a third of AIS's time on
    the default VAE on the CPU; the fused forward is the same number to float tolerance (see :mod:`ppl_vae.fused`).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor, event_dims: int, workspace: dict) -> torch.Tensor:
        # The gradient x - σ(l) comes out of the forward's own σ(l) (every leapfrog step needs both): the backward
        # is then at most one multiplication, not a second sigmoid pass over [chains, n, D] (measured: about a
        # fifth of AIS's time on the default VAE on the CPU). It is written into the chunk's workspace tensor,
        # reused at every step: a fresh [chains, n, D] tensor each step cost its first touch (page faults) again.
        # Saved for backward, so a backward after the next step's forward (which rewrites it) would raise torch's
        # "modified by an inplace operation" error instead of using the wrong gradient.
        log_prob, grad = fused.bernoulli_log_prob_and_grad(logits, value, event_dims, workspace.get("grad"))
        workspace["grad"] = grad
        ctx.save_for_backward(grad)
        ctx.event_dims, ctx.logits_shape = event_dims, logits.shape
        return log_prob

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dlogits,) = ctx.saved_tensors
        grad = grad.reshape(grad.shape + (1,) * ctx.event_dims)
        if not bool(torch.all(grad == 1)):  # AIS asks for d(sum)/d logits: all ones, nothing to multiply
            dlogits = dlogits * grad
        return dlogits.sum_to_size(ctx.logits_shape), None, None, None


def _site_log_prob(site: dict, observed: bool, workspace: dict) -> torch.Tensor:
    """A site's log-density at its value; an observed Bernoulli (support-checked) through the fused path where it applies."""
    fn, value = site["fn"], site["value"]
    if observed and not value.requires_grad and fused.unfused_reason(fn, value, check_grad=False) is None:
        event_dims = 0
        while isinstance(fn, torch.distributions.Independent):
            event_dims, fn = event_dims + fn.reinterpreted_batch_ndims, fn.base_dist
        return _BernoulliLogProb.apply(fn.logits, value, event_dims, workspace.setdefault(site["name"], {}))
    return site["fn"].log_prob(value)


def _gradients(value: torch.Tensor, inputs: list[torch.Tensor], names: list[str], retain: bool) -> dict[str, torch.Tensor]:
    """d value.sum() / d input for each input (zeros where value does not depend on it)."""
    if not value.requires_grad:
        return {name: torch.zeros_like(u) for name, u in zip(names, inputs)}
    grads = torch.autograd.grad(value.sum(), inputs, retain_graph=retain, allow_unused=True)
    return {name: torch.zeros_like(u) if g is None else g for name, u, g in zip(names, inputs, grads)}


class _Target:
    """The annealing path of one chunk of datapoints, ``chains`` chains each: the log-densities and their gradients.

    log p(x, z) and log q(z | x) come from traces of the programs run in a plate of the chains with their latent
    sites conditioned on the chains' values (each site's mask respected, scales ignored, as in every estimate).
    When no guide site's distribution depends on another latent site (found by provenance), the guide's
    distributions are those of its first trace at any z, so q(z | x) is scored from them without re-running
    the guide's networks (for a VAE, the encoder runs once per chunk, not once per leapfrog step).
    """

    def __init__(self, model: Callable, guide: Callable, data: tuple, structure: ProgramStructure, chains: int):
        self.data, self.structure, self.chains, self.n = data, structure, chains, data[0].shape[0]
        dim = -(structure.max_plate_nesting + 1)
        self.model, self.guide = _in_chains(model, chains, dim), _in_chains(guide, chains, dim)
        guide_sites = sample_sites(poutine.trace(self.guide).get_trace(*data))
        latent = structure.latent_sites
        self.initial_z = {name: guide_sites[name]["value"].detach() for name in latent}
        conditioned = poutine.condition(self.model, data=self.initial_z)
        model_sites = sample_sites(poutine.trace(conditioned).get_trace(*data))
        check_observed_support({name: model_sites[name] for name in structure.observed_sites})
        for name in latent:
            _check_continuous(name, model_sites[name], guide_sites[name])
        self._check_fixed_supports(model_sites)
        self.layouts = {name: self._layout(name, model_sites[name]) for name in latent}
        # Parents found exactly (not by site order), and none in the guide: the guide's sites are independent.
        independent = structure.dependencies != "site order" and not any(structure.guide_parents[n] for n in latent)
        self.guide_fns = None
        self.workspace: dict[str, dict] = {}  # per observed site: tensors reused at every evaluation of this chunk
        if independent:  # traced again without validation, so scoring a diverged proposal later raises nothing
            with pyro.validation_enabled(False):
                again = sample_sites(poutine.trace(poutine.condition(self.guide, data=self.initial_z)).get_trace(*data))
            self.guide_fns = {name: (again[name]["fn"], again[name]["mask"]) for name in latent}

    def _check_fixed_supports(self, model_sites: dict[str, dict]) -> None:
        """Refuse a latent site whose support moves with other latent sites (e.g. z2 ~ Uniform(0, z1)).

        HMC moves each site in unconstrained space through one map, ``biject_to`` of its support on the first
        trace; if the support's bounds depend on other latents, that map is wrong once they move, and the
        weights silently wrong. Candidates are sites with latent parents (provenance) whose support holds tensors
        (an interval's bounds, say); their supports are compared with those under a second, independent draw
        of all latents from the guide, and any that changed is refused. Programs without such sites pay nothing.
        """
        candidates = [name for name in self.structure.latent_sites
                      if self.structure.model_parents.get(name) and _support_tensors(model_sites[name]["fn"].support)]
        if not candidates:
            return
        with pyro.validation_enabled(False):
            other = sample_sites(poutine.trace(self.guide).get_trace(*self.data))
            other_z = {name: other[name]["value"].detach() for name in self.structure.latent_sites}
            again = sample_sites(poutine.trace(poutine.condition(self.model, data=other_z)).get_trace(*self.data))
        for name in candidates:
            first, second = (_support_tensors(sites[name]["fn"].support) for sites in (model_sites, again))
            if len(first) != len(second) or any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, second)):
                fn = model_sites[name]["fn"]
                raise ModelStructureError(
                    f"the model's site {name!r} ({describe_distribution(fn)}) has a support, {_describe_support(fn.support)}, whose bounds "
                    f"change with the latent sites {sorted(self.structure.model_parents[name])}: AIS moves each site "
                    "through one fixed map to unconstrained space, which such a support breaks; reparameterize it "
                    "(e.g. z2 = z1 * u with u ~ Uniform(0, 1)) or use the importance-sampled estimate "
                    "(evidence_estimate, --estimator is)"
                )

    def _layout(self, name: str, model_site: dict) -> _Layout:
        fn, z = model_site["fn"], self.initial_z[name]
        if not bool(fn.support.check(z).all()):
            raise ModelStructureError(
                f"the guide's draws of site {name!r} fall outside the support {_describe_support(fn.support)} of the model's "
                f"{describe_distribution(fn)}: AIS anneals from the guide to the posterior, so both must share a support"
            )
        batch_ndim = z.dim() - len(fn.event_shape)
        try:
            transform = biject_to(_unconstrainable(fn.support))
        except NotImplementedError:
            raise ModelStructureError(
                f"the model's site {name!r} ({describe_distribution(fn)}) has the support {_describe_support(fn.support)}, which torch "
                "cannot map to unconstrained space (biject_to): AIS cannot move it; use evidence_estimate"
            ) from None
        ndim = transform.inv(z).dim()
        return _Layout(transform, batch_ndim - (self.structure.max_plate_nesting + 1),
                       batch_ndim + self.structure.data_dim, ndim)

    def initial_u(self, z: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        z = self.initial_z if z is None else z
        return {name: self.layouts[name].transform.inv(value).detach() for name, value in z.items()}

    def _reduce(self, value: torch.Tensor, mask) -> torch.Tensor:
        return per_datapoint(value, mask, self.structure, self.chains, self.n)

    def evaluate(self, u: dict[str, torch.Tensor]) -> _State:
        """The state at unconstrained values ``u``: its three log-densities [C, n] and their gradients in u."""
        names = list(u)
        with torch.enable_grad():
            leaves = [u[name].detach().requires_grad_() for name in names]
            z = {name: self.layouts[name].transform(leaf) for name, leaf in zip(names, leaves)}
            log_j = sum(self._reduce(self.layouts[name].transform.log_abs_det_jacobian(leaf, z[name]), None)
                        for name, leaf in zip(names, leaves))
            trace = poutine.trace(poutine.condition(self.model, data=z)).get_trace(*self.data)
            log_p = sum(self._reduce(_site_log_prob(site, name in self.structure.observed_sites, self.workspace),
                                     site["mask"])
                        for name, site in sample_sites(trace).items())
            if self.guide_fns is not None:
                log_q = sum(self._reduce(fn.log_prob(z[name]), mask) for name, (fn, mask) in self.guide_fns.items())
            else:
                trace = poutine.trace(poutine.condition(self.guide, data=z)).get_trace(*self.data)
                log_q = sum(self._reduce(site["fn"].log_prob(site["value"]), site["mask"])
                            for site in sample_sites(trace).values())
            grad_q = _gradients(log_q, leaves, names, retain=True)
            grad_j = _gradients(log_j, leaves, names, retain=True)
            grad_p = _gradients(log_p, leaves, names, retain=False)
        return _State(dict(zip(names, (leaf.detach() for leaf in leaves))), log_p.detach(), log_q.detach(),
                      log_j.detach(), grad_p, grad_q, grad_j)

    def kinetic(self, momentum: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.layouts[name].per_chain(r.pow(2)) for name, r in momentum.items()) / 2

    def select(self, accept: torch.Tensor, new: _State, old: _State) -> _State:
        """Per chain and datapoint, ``new`` where ``accept`` [C, n] else ``old``."""
        def pick(a: dict, b: dict) -> dict:
            return {name: torch.where(self.layouts[name].spread(accept), a[name], b[name]) for name in a}

        return _State(pick(new.u, old.u), *(torch.where(accept, getattr(new, f), getattr(old, f)) for f in ("log_p", "log_q", "log_j")),
                      pick(new.grad_p, old.grad_p), pick(new.grad_q, old.grad_q), pick(new.grad_j, old.grad_j))


def _hmc(target: _Target, state: _State, beta: float, step_size: torch.Tensor, leapfrog_steps: int):
    """One HMC transition leaving f_β invariant, for every chain and datapoint: (new state, acceptance probability [C, n]).

    The leapfrog is written here rather than taken from ``pyro.ops.integrator.velocity_verlet``: that one takes
    a scalar potential (the chains' sum) and returns only the sum, while the Metropolis test needs each chain's
    energy, and the weights need log p and log q apart at the accepted state; this way every gradient
    evaluation (one model pass forward and backward) is used, and the next transition starts from the cached
    gradients: L passes per transition.
    """
    eps = {name: target.layouts[name].spread(step_size) for name in state.u}
    momentum = {name: torch.randn_like(u) for name, u in state.u.items()}
    energy = -state.log_f(beta) + target.kinetic(momentum)
    grad = state.grad(beta)
    momentum = {k: r + 0.5 * eps[k] * grad[k] for k, r in momentum.items()}
    u, new = state.u, state
    for step in range(leapfrog_steps):
        u = {k: value + eps[k] * momentum[k] for k, value in u.items()}
        new = target.evaluate(u)
        grad = new.grad(beta)
        half = 0.5 if step == leapfrog_steps - 1 else 1.0
        momentum = {k: r + half * eps[k] * grad[k] for k, r in momentum.items()}
    log_accept = torch.clamp(energy - (-new.log_f(beta) + target.kinetic(momentum)), max=0.0)
    log_accept = torch.nan_to_num(log_accept, nan=-math.inf)  # a diverged trajectory is rejected
    accept = torch.rand_like(log_accept).log() < log_accept
    return target.select(accept, new, state), log_accept.exp()


def _anneal(target: _Target, state: _State, betas: torch.Tensor, step_size: Callable[[int], torch.Tensor],
            leapfrog_steps: int, adapt: Callable[[int, torch.Tensor], None] | None = None, bar=None):
    """Run the chains through ``betas``: their log-weights [C, n] (float64) and mean acceptance probability [n].

    At step i the log-weight gains (β_i - β_{i-1}) (log p - log q) at the current state, then (before the last
    step) an HMC transition at β_i moves it. The same loop runs forward (β up, from guide draws) and reverse
    (β down, from exact posterior samples).
    """
    log_w = torch.zeros(target.chains, target.n, dtype=torch.float64, device=target.data[0].device)
    acceptance = torch.zeros(target.n, dtype=torch.float64, device=log_w.device)
    transitions = len(betas) - 2
    for i in range(1, len(betas)):
        log_w += (betas[i] - betas[i - 1]).item() * (state.log_p - state.log_q).double()
        if i < len(betas) - 1:
            # Validation off inside the trajectories: a diverging leapfrog step may reach values (a scale of 0,
            # an infinite location) whose distributions validation would refuse; the Metropolis test rejects them.
            with pyro.validation_enabled(False):
                state, accept_prob = _hmc(target, state, betas[i].item(), step_size(i), leapfrog_steps)
            acceptance += accept_prob.double().mean(0)
            if adapt is not None:
                adapt(i, accept_prob.mean(0))
        if bar is not None:
            bar.update(1)
    return log_w, acceptance / max(1, transitions)


DEFAULT_STEPS = 200
DEFAULT_CHAINS = 8
DEFAULT_LEAPFROG_STEPS = 5
DEFAULT_TARGET_ACCEPT = 0.65


@dataclass(frozen=True)
class AisSettings:
    """The settings of an AIS run (and of BDMC's two), checked when made; one object shared by
    :func:`ais_log_evidence`, :func:`bdmc`, the audit, the CLI and ``ppl-vae bench``.

    T = ``steps`` annealing steps on the ``schedule`` (``"sigmoid"`` or ``"geometric"``), C = ``chains`` chains per
    datapoint, L = ``leapfrog_steps`` leapfrog steps per HMC transition, step sizes adapted towards the acceptance
    probability ``target_accept`` in a pilot run of ``pilot_steps`` steps (None: max(10, T // 10), at most T; it
    stays None here, so ``dataclasses.replace(settings, steps=...)`` re-derives it). A bad value is one line
    (:class:`~ppl_vae.errors.InvalidDataError`).
    """

    steps: int = DEFAULT_STEPS
    chains: int = DEFAULT_CHAINS
    leapfrog_steps: int = DEFAULT_LEAPFROG_STEPS
    schedule: str = "sigmoid"
    target_accept: float = DEFAULT_TARGET_ACCEPT
    pilot_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "chains", "leapfrog_steps"):
            object.__setattr__(self, name, check_count(getattr(self, name), name))
        if self.pilot_steps is not None:
            object.__setattr__(self, "pilot_steps", check_count(self.pilot_steps, "pilot_steps"))
        if self.schedule not in SCHEDULES:
            raise InvalidDataError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        accept = self.target_accept
        if isinstance(accept, bool) or not isinstance(accept, (int, float)) or not 0 < accept < 1:
            raise InvalidDataError(f"target_accept must be a number strictly between 0 and 1, got {accept!r}")
        object.__setattr__(self, "target_accept", float(accept))

    @classmethod
    def of(cls, settings: AisSettings | None = None, **options: Any) -> AisSettings:
        """``settings``, or settings from keyword ``options`` (those left None take the defaults); not both."""
        given = {name: value for name, value in options.items() if value is not None}
        if settings is None:
            return cls(**given)
        if not isinstance(settings, AisSettings):
            raise InvalidDataError(f"settings must be an AisSettings, got {type(settings).__name__}")
        if given:
            raise InvalidDataError(f"give AIS's settings either as settings=AisSettings(...) or as keywords, not both "
                                   f"(got settings and {', '.join(sorted(given))})")
        return settings

    @property
    def pilot(self) -> int:
        """The pilot run's number of steps: ``pilot_steps``, or max(10, T // 10), at most T."""
        return min(self.steps, max(10, self.steps // 10)) if self.pilot_steps is None else self.pilot_steps

    @property
    def model_gradients_per_datapoint(self) -> int:
        """Gradient evaluations of the model (forward + backward) per datapoint, the pilot's included."""
        return self.chains * self.leapfrog_steps * (max(0, self.steps - 1) + max(0, self.pilot - 1))

    def record(self) -> dict[str, Any]:
        """As recorded with the results (``AisEstimate.settings``, evaluation.json, audit.json)."""
        return {"estimator": "ais", "steps": self.steps, "chains": self.chains, "leapfrog_steps": self.leapfrog_steps,
                "schedule": self.schedule, "target_accept": self.target_accept, "pilot_steps": self.pilot,
                "model_gradients_per_datapoint": self.model_gradients_per_datapoint}


def ais_settings(steps: int = DEFAULT_STEPS, chains: int = DEFAULT_CHAINS, leapfrog_steps: int = DEFAULT_LEAPFROG_STEPS,
                 schedule: str = "sigmoid", target_accept: float = DEFAULT_TARGET_ACCEPT,
                 pilot_steps: int | None = None) -> dict[str, Any]:
    """The checked settings of an AIS run, as recorded with its results: ``AisSettings(...).record()``."""
    return AisSettings(steps, chains, leapfrog_steps, schedule, target_accept, pilot_steps).record()


def _step_size_table(target: _Target, settings: AisSettings) -> Callable[[float], torch.Tensor]:
    """Adapt per-datapoint step sizes in a pilot run; return the fixed map β -> step sizes [n] it recorded."""
    betas = beta_schedule(settings.pilot, settings.schedule)
    log_eps = torch.full((target.n,), math.log(INITIAL_STEP_SIZE), device=target.data[0].device)
    recorded = [log_eps.exp()]

    def adapt(i: int, accept_prob: torch.Tensor) -> None:
        nonlocal log_eps
        # Towards the target from the transition's Metropolis probability: smaller after rejections, larger after
        # acceptances; the pilot's weights are discarded, so adapting its chains from their own history is harmless.
        log_eps = log_eps + ADAPT_RATE * (accept_prob - settings.target_accept)
        recorded.append(log_eps.exp())

    _anneal(target, target.evaluate(target.initial_u()), betas, lambda i: log_eps.exp(), settings.leapfrog_steps, adapt)
    at = torch.cat([betas[:1], betas[1:len(recorded)]])  # the step size recorded after the transition at each β
    table = torch.stack(recorded)

    def step_size(beta: float) -> torch.Tensor:
        index = int(torch.searchsorted(at, torch.tensor([beta], dtype=at.dtype), right=True)) - 1
        # Below the pilot's first β the step size adapted there (not the unadapted initial one) applies.
        return table[max(min(1, len(table) - 1), min(index, len(table) - 1))]

    return step_size


def _chunk_rows(x: torch.Tensor, chains: int, chunk_size: int | None) -> int:
    """Datapoints per chunk: ``chunk_size``, or from the evaluation's memory budget for chains x one item."""
    if chunk_size is not None:
        return min(check_count(chunk_size, "chunk_size"), x.shape[0])
    item = max(1, math.prod(x.shape[1:]))
    return max(1, min(x.shape[0], 500, chunk_element_budget(x.device) // (chains * item)))


def _structure(model: Callable, guide: Callable, data: tuple, data_plate: str | None) -> ProgramStructure:
    structure = inspect_program(model, guide, data, data_plate=data_plate)
    if structure.enumerated:
        name = next(iter(structure.enumerated))
        raise ModelStructureError(
            f"the guide's site {name!r} is marked for enumeration, and AIS needs continuous latent sites "
            "(enumeration is not supported yet): use the importance-sampled estimate (evidence_estimate, --estimator is)"
        )
    return structure


def check_ais_applies(model: Callable, guide: Callable, x: torch.Tensor, *cond: torch.Tensor,
                      data_plate: str | None = None) -> ProgramStructure:
    """Refuse, before any estimation, a program AIS cannot anneal; return its structure.

    The checks :func:`ais_log_evidence` makes on its first chunk (no enumerated or discrete latent site, supports
    that ``biject_to`` maps and that do not move with other latents, the guide's draws inside the model's
    supports), run on the first two datapoints with two chains: milliseconds, so a command that would run other
    estimates first (``ppl-vae audit``: importance sampling over many images) refuses in one line up front.
    Draws from Pyro's random state, so call it before seeding the estimates.
    """
    data = check_data(x, cond)
    rows = slice_rows(data, slice(0, min(2, x.shape[0])))
    with evaluation_mode(model, guide), pyro.validation_enabled(False):
        structure = _structure(model, guide, rows, data_plate)
        _Target(model, guide, rows, structure, 2)
    return structure


def _estimate(log_w: torch.Tensor, acceptance: torch.Tensor, settings: AisSettings, sign: float = 1.0) -> AisEstimate:
    """Log-mean-exp over chains (negated for reverse AIS, whose weights estimate 1 / p(x)), with its errors."""
    log_w = log_w.cpu()
    result = evidence_from_weight_sums(torch.logsumexp(log_w, 1), torch.logsumexp(2 * log_w, 1), log_w.shape[1])
    return AisEstimate(sign * result.log_evidence, result.stderr, result.ess, log_w, acceptance.cpu(), settings.record())


def _progress(total: int, progress: bool | str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=progress if isinstance(progress, str) else "AIS", unit="step", leave=False)


def ais_log_evidence(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    steps: int | None = None,
    chains: int | None = None,
    leapfrog_steps: int | None = None,
    schedule: str | None = None,
    target_accept: float | None = None,
    pilot_steps: int | None = None,
    chunk_size: int | None = None,
    data_plate: str | None = None,
    progress: bool | str = False,
    settings: AisSettings | None = None,
) -> AisEstimate:
    r"""AIS log p(x) per datapoint (nats), a stochastic lower bound, with its standard error over chains.

    T = ``steps`` annealing steps from the guide to the posterior on the ``schedule``, C = ``chains`` chains per
    datapoint, each transition L = ``leapfrog_steps`` leapfrog steps of HMC with per-datapoint step sizes adapted
    towards ``target_accept`` in a pilot run of ``pilot_steps`` steps (module docstring: the weights, the schedule,
    why the adaptation keeps E[w] = p(x)); these come as keywords (defaults: :class:`AisSettings`'s) or as one
    ``settings=AisSettings(...)``, not both. Positional tensors after x are per-datapoint conditioning data, as in
    :func:`ppl_vae.estimators.evidence_estimate`. Cost: C L (T - 1 + pilot - 1) gradient evaluations of the model
    per datapoint; ``chunk_size`` datapoints at a time (by default from the evaluation's memory budget).
    The programs run in eval mode (:func:`ppl_vae.modes.evaluation_mode`). Discrete latent sites are refused.
    """
    settings = AisSettings.of(settings, steps=steps, chains=chains, leapfrog_steps=leapfrog_steps, schedule=schedule,
                              target_accept=target_accept, pilot_steps=pilot_steps)
    data = check_data(x, cond)
    rows_per_chunk = _chunk_rows(x, settings.chains, chunk_size)
    num_rows = x.shape[0]
    log_w = torch.empty(num_rows, settings.chains, dtype=torch.float64)
    acceptance = torch.empty(num_rows, dtype=torch.float64)
    betas = beta_schedule(settings.steps, settings.schedule)
    chunks = math.ceil(num_rows / rows_per_chunk)
    bar = _progress(chunks * (settings.steps + settings.pilot), progress)
    with evaluation_mode(model, guide):
        structure = _structure(model, guide, slice_rows(data, slice(0, rows_per_chunk)), data_plate)
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, num_rows))
            chunk = slice_rows(data, rows)
            step_size = _step_size_table(_Target(model, guide, chunk, structure, settings.chains), settings)
            if bar is not None:
                bar.update(settings.pilot)
            target = _Target(model, guide, chunk, structure, settings.chains)  # fresh guide draws, not the pilot's
            chunk_w, chunk_acc = _anneal(target, target.evaluate(target.initial_u()), betas,
                                         lambda i: step_size(betas[i].item()), settings.leapfrog_steps, bar=bar)
            log_w[rows], acceptance[rows] = chunk_w.T.cpu(), chunk_acc.cpu()
    if bar is not None:
        bar.close()
    return _estimate(log_w, acceptance, settings)


@dataclass
class BdmcResult:
    """BDMC on ``num_datapoints`` datapoints simulated from the model (float64 CPU tensors [N], nats).

    ``lower`` is forward AIS (its ``log_evidence`` a stochastic lower bound of log p(x)), ``upper`` reverse AIS
    from the exact posterior samples (its ``log_evidence`` = -log (1/C) Σ_c w'_c, a stochastic upper bound; its
    ``log_weights`` are the log w' estimating 1 / p(x)), ``gap`` = upper - lower, and ``data`` the simulated
    (x, *cond) they are of.
    """

    lower: AisEstimate
    upper: AisEstimate
    gap: torch.Tensor
    data: tuple
    settings: dict[str, Any] = field(default_factory=dict)


def simulate(model: Callable, guide: Callable, num_datapoints: int, *cond: torch.Tensor, data_like: torch.Tensor,
             data_plate: str | None = None) -> tuple[tuple, dict[str, torch.Tensor], ProgramStructure]:
    """(x, z) ~ p(x, z | cond): the data (x, *cond), the latent values (with a chain dim of size 1) and the structure.

    The model runs under ``poutine.uncondition``, so its observed site draws x instead of scoring it; the program
    must observe x at exactly one site whose value is x itself (perhaps reshaped), so that x can be handed back
    to it: the model is re-run on the simulated x and must observe exactly the simulated values, or it is refused.
    ``data_like`` gives x's shape and dtype per datapoint: one row (repeated) or ``num_datapoints`` rows of data.
    """
    n = check_count(num_datapoints, "num_datapoints")
    if not isinstance(data_like, torch.Tensor) or data_like.dim() == 0 or data_like.shape[0] not in (1, n):
        raise InvalidDataError(f"data_like must be a tensor of 1 or num_datapoints={n} rows of data (it gives x's shape)")
    placeholder = check_data(data_like.expand(n, *data_like.shape[1:]).clone(), cond)
    structure = _structure(model, guide, placeholder, data_plate)
    observed = structure.observed_sites
    if len(observed) != 1 or structure.observed_data[observed[0]] != "x":
        raise ModelStructureError(
            f"BDMC simulates x from the model and needs exactly one observed site, observing x; this model observes "
            f"{dict(structure.observed_data)} (a model that also observes y gives log p(x, y): not simulated yet)"
        )
    plated = _in_chains(model, 1, -(structure.max_plate_nesting + 1))
    sites = sample_sites(poutine.trace(poutine.uncondition(plated)).get_trace(*placeholder))
    value = sites[observed[0]]["value"].detach()
    if value.numel() != placeholder[0].numel():
        raise ModelStructureError(
            f"the observed site {observed[0]!r} holds {value.numel()} values for {n} datapoints, x has "
            f"{placeholder[0].numel()}: BDMC needs a site that observes x itself (perhaps reshaped)"
        )
    x = value.reshape(placeholder[0].shape).to(placeholder[0].dtype)
    z = {name: sites[name]["value"].detach() for name in structure.latent_sites}
    again = sample_sites(poutine.trace(poutine.condition(plated, data=z)).get_trace(x, *cond))[observed[0]]["value"]
    if not torch.equal(again.reshape(-1).to(value.dtype), value.reshape(-1)):
        raise ModelStructureError(
            f"the observed site {observed[0]!r} does not observe x as given (it transforms it): BDMC cannot hand the "
            "simulated values back to the model as x"
        )
    return (x, *cond), z, structure


def _exact_start(target: _Target, z: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The simulated latent values of ``rows``, one copy per chain, in unconstrained space."""
    start = {}
    for name, value in z.items():
        layout = target.layouts[name]
        value = value.narrow(layout.data_axis, rows.start, rows.stop - rows.start)
        start[name] = value.expand_as(target.initial_z[name])
    return target.initial_u(start)


def bdmc(
    model: Callable,
    guide: Callable,
    num_datapoints: int,
    *cond: torch.Tensor,
    data_like: torch.Tensor,
    steps: int | None = None,
    chains: int | None = None,
    leapfrog_steps: int | None = None,
    schedule: str | None = None,
    target_accept: float | None = None,
    pilot_steps: int | None = None,
    chunk_size: int | None = None,
    data_plate: str | None = None,
    progress: bool | str = False,
    settings: AisSettings | None = None,
) -> BdmcResult:
    """Bidirectional Monte Carlo: forward and reverse AIS on data simulated from the model, per datapoint.

    Simulates (x, z) ~ p(x, z) (:func:`simulate`; ``data_like`` gives x's shape), then runs forward AIS from the
    guide (a stochastic lower bound of log p(x)) and reverse AIS from z, an exact posterior sample of its x
    (a stochastic upper bound), with the same settings (keywords or ``settings=AisSettings(...)``, as in
    :func:`ais_log_evidence`) and step sizes (one pilot per chunk). All C reverse
    chains of a datapoint start from its one z: each chain's w' is still unbiased for 1 / p(x). The gap
    certifies how close forward AIS with these settings gets on data from the model (module docstring).
    """
    settings = AisSettings.of(settings, steps=steps, chains=chains, leapfrog_steps=leapfrog_steps, schedule=schedule,
                              target_accept=target_accept, pilot_steps=pilot_steps)
    chains = settings.chains
    with evaluation_mode(model, guide):
        data, z, structure = simulate(model, guide, num_datapoints, *cond, data_like=data_like, data_plate=data_plate)
        rows_per_chunk = _chunk_rows(data[0], chains, chunk_size)
        n = data[0].shape[0]
        forward = torch.empty(n, chains, dtype=torch.float64)
        reverse = torch.empty(n, chains, dtype=torch.float64)
        acc_forward, acc_reverse = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
        betas = beta_schedule(settings.steps, settings.schedule)
        bar = _progress(math.ceil(n / rows_per_chunk) * (2 * settings.steps + settings.pilot), progress)
        for start in range(0, n, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, n))
            chunk = slice_rows(data, rows)
            step_size = _step_size_table(_Target(model, guide, chunk, structure, chains), settings)
            if bar is not None:
                bar.update(settings.pilot)
            target = _Target(model, guide, chunk, structure, chains)
            log_w, acc = _anneal(target, target.evaluate(target.initial_u()), betas,
                                 lambda i: step_size(betas[i].item()), settings.leapfrog_steps, bar=bar)
            forward[rows], acc_forward[rows] = log_w.T.cpu(), acc.cpu()
            down = betas.flip(0)
            log_w, acc = _anneal(target, target.evaluate(_exact_start(target, z, rows)), down,
                                 lambda i: step_size(down[i].item()), settings.leapfrog_steps, bar=bar)
            reverse[rows], acc_reverse[rows] = log_w.T.cpu(), acc.cpu()
    if bar is not None:
        bar.close()
    lower, upper = _estimate(forward, acc_forward, settings), _estimate(reverse, acc_reverse, settings, sign=-1.0)
    return BdmcResult(lower, upper, upper.log_evidence - lower.log_evidence, tuple(t.cpu() for t in data),
                      settings.record())


def _check_continuous(name: str, model_site: dict, guide_site: dict) -> None:
    for role, site in (("model", model_site), ("guide", guide_site)):
        if site["fn"].support.is_discrete:
            raise ModelStructureError(
                f"AIS needs continuous latent sites, and the {role}'s site {name!r} is discrete "
                f"({describe_distribution(site['fn'])}): HMC cannot move it (enumerating it is not supported yet); "
                "use the importance-sampled estimate (evidence_estimate, --estimator is)"
            )


def _describe_support(support: constraints.Constraint) -> str:
    """A constraint for a one-line message: its repr, or its class where that would print tensors (an interval's
    bounds per datapoint)."""
    return type(support).__name__.lstrip("_") if _support_tensors(support) else str(support)


def _support_tensors(support: constraints.Constraint) -> list[torch.Tensor]:
    """The tensors a constraint is parameterized by (an interval's bounds...), nested constraints' included."""
    found: list[torch.Tensor] = []
    for value in vars(support).values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, constraints.Constraint):
                found.extend(_support_tensors(item))
    return found


def _unconstrainable(support: constraints.Constraint) -> constraints.Constraint:
    """The constraint ``biject_to`` maps for ``support``: a mixture of one family (MixtureSameFamily, a mixture
    prior) has its components' support, which torch's registry does not unwrap by itself."""
    while isinstance(support, constraints.MixtureSameFamilyConstraint):
        support = support.base_constraint
    return support

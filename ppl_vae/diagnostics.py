r"""Diagnostics of a fitted model/guide pair: importance-weight reliability, posterior collapse, ELBO surgery.

Every number is in nats, per datapoint, over the given batch ``x`` (datapoints on
dim 0, in the programs' data plate, as in :mod:`ppl_vae.evaluate`).

**Importance weights and PSIS** (:func:`importance_log_weights`, :func:`psis_diagnostics`).
For each datapoint, K draws z_k ~ q(z | x) give log-weights
log w_k = log p(x, z_k) - log q(z_k | x). Pareto smoothed importance sampling
(Vehtari et al. 2024) fits a generalized Pareto distribution to the largest
weights; its shape k-hat says how many moments the weight distribution has
(k < 1/2: finite variance; k > 0.7: the estimate of p(x) = E_q[w] is unreliable
for any practical K). The smoothed weights give a second, stabilized estimate of
log p(x).

**Posterior collapse** (:func:`kl_per_dimension`, :func:`active_units`,
:func:`collapse_report`), for a latent site whose guide distribution is a
diagonal Normal and whose prior is a diagonal Normal (e.g. the standard normal):
the analytic KL(q(z_d | x) || p(z_d)) per latent dimension d, and the activity
A_d = Var_x(E_q[z_d | x]) of Burda et al. (2015); unit d is active when
A_d > 0.01.

**ELBO surgery** (:func:`elbo_surgery`, Hoffman & Johnson 2016). With the
aggregate posterior q(z) = (1/N) sum_n q(z | x_n) over the N datapoints of ``x``,

.. math::

    \frac{1}{N}\sum_n \mathrm{KL}(q(z | x_n) \| p(z))
      = \underbrace{I_q(n; z)}_{\text{mutual information}}
      + \underbrace{\mathrm{KL}(q(z) \| p(z))}_{\text{marginal KL}},

where the index n is uniform on the N datapoints. **Total correlation**
(:func:`total_correlation`, Chen et al. 2018): for a factorized prior and a
diagonal guide, the marginal KL splits further into
KL(q(z) || prod_d q(z_d)) (total correlation) plus sum_d KL(q(z_d) || p(z_d))
(dimension-wise KL).

Aggregate-posterior estimator. z is drawn from q(z | x_n) for every datapoint n
(``num_samples`` draws each) and

.. math::

    \log q(z) = \operatorname{logsumexp}_{m=1}^{N} \log q(z | x_m) - \log N,

summed over **all** N datapoints, chunk by chunk (memory stays bounded; time is
O(N^2 D)). Given ``x``, log q(z) is then exact, so the estimates are unbiased
Monte Carlo estimates of the quantities *defined by the empirical aggregate
posterior of x*. Two consequences of using a finite dataset:

* the mutual information of the index n and z is at most log N (because
  q(z | x_n) <= N q(z) pointwise): with log N small against the true
  I(x; z), the estimate saturates at log N (and, being Monte Carlo, may
  exceed it by its noise);
* as an estimate of the population quantities (q(z) = E_{p_data(x)} q(z | x)),
  the marginal KL is biased upward and the mutual information downward, by
  E[KL(q_N(z) || q(z))] >= 0 (KL is convex in its first argument, so Jensen's
  inequality applies to the empirical mixture q_N). To second order it is
  (E_x E_{q(z|x)}[q(z | x) / q(z)] - 1) / (2N): it shrinks as the N components
  overlap more, i.e. as N grows against exp(I(x; z)). The dimension-wise KL is
  biased upward in the same way; the total correlation, a difference of the
  two, either way. Minibatch versions of these estimators (minibatch-weighted
  sampling) are biased much more, which is why all N datapoints are used here.

Standard errors follow :func:`ppl_vae.summary.evaluation_summary`: the sample
std over datapoints of the per-datapoint values (each averaged over its draws)
divided by sqrt(N). They cover the Monte Carlo noise of the draws (conservatively:
the spread between datapoints is included) and the sampling error of the
dataset mean, not the finite-N bias above.

**Several latent sites.** Every function takes the data as positional tensors after the
guide (``x`` and any conditioning data, as :mod:`ppl_vae.evaluate`), names its site with
``site=`` (by default the model's only latent site), and :func:`diagnostics_summary`
computes every diagnostic for every latent site whose structure allows it, saying for
each site which are unavailable and why. The conditions, read from the programs'
dependencies (:func:`ppl_vae.inspection.inspect_program`):

* KL per dimension and the collapse report: the site's model parents are not drawn after
  it in the guide (the condition of its analytic KL term); where its guide or prior depends
  on other latent sites, the KL per dimension is taken at one draw of them per datapoint;
* active units: the site's guide depends on x alone (no latent parents in the guide), so
  that E_q[z | x] is the mean of one distribution;
* ELBO surgery and total correlation: also a prior without latent parents, so that
  KL(q(z) || p(z)) compares the aggregate posterior with a density we can evaluate.

**Discrete sites** (a guide whose support is discrete: Categorical, OneHotCategorical, Bernoulli,
``Bernoulli(probs).to_event(1)``, ...; :func:`_discrete_site_diagnostics`). ``"kl"`` holds the site's
KL(q(y | x_n) || p(y)) averaged over the datapoints: analytic where torch has a rule, summed over the
classes otherwise, else Monte Carlo. For one categorical variable per datapoint the ELBO surgery is
exact: the aggregate posterior q(y) = (1/N) sum_n q(y | x_n) is a vector of C probabilities, the
mutual information is I(n; y) = H(q(y)) - (1/N) sum_n H(q(y | x_n)) and the marginal KL is
KL(q(y) || p(y)), with no draws; ``"class_probabilities"`` gives q(y) and p(y). Active units and
the per-dimension collapse report count continuous dimensions and say so; a collapse warning is
given when I(x; y) < 0.1 nats (q(y | x) barely depends on x). A vector of discrete variables gets
the Monte Carlo ELBO surgery of continuous sites (a mass function in place of a density) and the
active units of its means E_q[y_d | x].

**Enumerated sites** (a guide marking discrete sites for enumeration, :mod:`ppl_vae.enumerated`). The
diagnostics sum them exactly, as the evaluation does, instead of drawing them: PSIS is of the evaluation's
weights W_k = sum_y p(x, y, z_k^(y)) / q(z_k^(y) | x, y) (so k-hat is of the log p̂(x) reported); a site's
KL per dimension is sum_y q(y | x) KL(q(z_d | x, y) || p(z_d | y)), and sums to the site's KL term; the active
units of a site whose guide depends on enumerated sites only are those of the exact mixture mean
E_q[z | x] = sum_y q(y | x) E_q[z | x, y]; a discrete site's KL with enumerated parents is its expectation under
their q. ELBO surgery and total correlation of such a site (its q(z | x) the mixture sum_y q(y | x) q(z | x, y))
are not computed, and say so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Independent,
    Normal,
    OneHotCategorical,
    kl_divergence,
)

from .chunking import DEFAULT_CHUNK_ELEMENTS, iter_chunk_terms, plan_evaluation
from .enumerated import enumerated_trace_pair
from .errors import InvalidDataError, ModelStructureError
from .estimators import EvidenceEstimate, evidence_from_weight_sums
from .inspection import (
    DEVICE_ERRORS,
    KL_ANALYTIC,
    KL_MONTE_CARLO,
    ProgramStructure,
    check_count,
    describe_distribution,
    trace_pair,
)
from .modes import evaluates
from .summary import mean_and_stderr

KHAT_THRESHOLD = 0.7  # Vehtari et al. (2024): above it, PSIS estimates are unreliable
# PSIS fits its Pareto tail to the largest min(K/5, 3 sqrt(K)) weights, and needs at least
# 5 of them (ArviZ >= 1 refuses fewer); hundreds of draws are better.
MIN_PSIS_SAMPLES = 25
# Log-weights of one datapoint spread over less than this are float round-off around a
# constant (e.g. the exact posterior as guide): bounded weights, no tail to fit.
CONSTANT_LOG_WEIGHT_SPREAD = 1e-3
ACTIVITY_THRESHOLD = 0.01  # Burda et al. (2015)
COLLAPSED_KL_THRESHOLD = 0.01  # nats per datapoint per dimension
NEGLIGIBLE_TOTAL_KL = 0.1  # nats per datapoint
DISCRETE_KL_SAMPLES = 100  # draws per datapoint for the KL of a discrete site torch has no rule for
KL_EXACT = "exact"  # summed over the classes of a categorical variable
DISCRETE_SURGERY_SAMPLES = 10  # draws per datapoint of the ELBO surgery of a vector of discrete variables


# --- Importance weights and PSIS ---------------------------------------------------


def importance_log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int,
    chunk_size: int | None = None,
    particles_per_chunk: int | None = None,
    data_plate: str | None = None,
) -> torch.Tensor:
    """log w_nk = log p(x_n, z_nk) - log q(z_nk | x_n), z_nk ~ q(z | x_n): a float64 CPU tensor [N, K], nats.

    K = ``num_samples``; positional tensors after x are per-datapoint conditioning data
    (as in :func:`ppl_vae.estimators.elbo_decomposition`). ``chunk_size`` datapoints and
    ``particles_per_chunk`` draws are traced at a time (by default from a memory budget).
    The whole [N, K] matrix is kept (8 N K bytes), so use a subset of the data when K is
    large; :func:`ppl_vae.estimators.evidence_estimate` streams the same weights without keeping them.
    """
    n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 0
    log_weights = torch.empty(n, check_count(num_samples, "num_samples"), dtype=torch.float64)
    for rows, block in _log_weight_blocks(model, guide, (x, *cond), num_samples, chunk_size, particles_per_chunk, data_plate):
        log_weights[rows] = block
    return log_weights


def _log_weight_blocks(model, guide, data, num_samples, chunk_size, particles_per_chunk, data_plate, progress=False):
    """Yield ``(rows, log_weights [n, K])`` per chunk of datapoints: all K draws of n datapoints at once."""
    plan = plan_evaluation(model, guide, *data, num_samples=num_samples, chunk_size=chunk_size,
                           particles_per_chunk=particles_per_chunk, data_plate=data_plate, kl="mc")
    rows_done, parts = None, []
    for rows, terms in iter_chunk_terms(model, guide, data, plan, progress):
        if rows != rows_done and parts:  # particle chunks of one data chunk come one after another
            yield rows_done, torch.cat(parts, 1)
            parts = []
        rows_done = rows
        parts.append(terms.log_weight.detach().double().T.cpu())
    if parts:
        yield rows_done, torch.cat(parts, 1)


def evidence_with_psis(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    particles_per_chunk: int | None = None,
    data_plate: str | None = None,
    khat_threshold: float = KHAT_THRESHOLD,
    progress: bool | str = False,
) -> tuple[EvidenceEstimate, dict[str, Any]]:
    """The importance-sampled log p(x) and its PSIS diagnostics from one set of draws, in bounded memory.

    The K log-weights of one chunk of datapoints are held at a time ([chunk, K]),
    so K = 5000 over a whole test set costs no more memory than
    :func:`ppl_vae.estimators.evidence_estimate`. Returns the
    :class:`~ppl_vae.estimators.EvidenceEstimate` and the dict of
    :func:`psis_diagnostics` over all of ``x``.
    """
    n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 0
    log_sum_w = torch.empty(n, dtype=torch.float64)
    log_sum_w2 = torch.empty(n, dtype=torch.float64)
    pieces: list[dict[str, Any]] = []
    for rows, log_weights in _log_weight_blocks(model, guide, (x, *cond), num_samples, chunk_size, particles_per_chunk,
                                                data_plate, progress):
        log_sum_w[rows] = torch.logsumexp(log_weights, 1)
        log_sum_w2[rows] = torch.logsumexp(2 * log_weights, 1)
        pieces.append(psis_diagnostics(log_weights, khat_threshold))
    num_samples = int(num_samples)
    evidence = evidence_from_weight_sums(log_sum_w, log_sum_w2, num_samples)
    psis = {key: torch.cat([p[key] for p in pieces]) for key in ("khat", "unreliable", "ess", "log_evidence", "psis_log_evidence")}
    psis.update(
        unreliable_share=psis["unreliable"].double().mean().item(), khat_threshold=khat_threshold, num_samples=num_samples
    )
    return evidence, psis


def _arviz_psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSIS of each row of ``log_weights`` [N, K] separately: (normalized smoothed log weights [N, K], k-hat [N]).

    ArviZ < 1 has ``arviz.psislw(log_weights)``, draws on the last axis. ArviZ >= 1
    (Python >= 3.12) moved it to ``arviz_stats``, whose ``psislw`` follows the
    PSIS-LOO convention: it takes log-*likelihoods* and smooths their negatives,
    hence the minus sign.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arviz 0.2x announces its 1.0 refactor on import
            from arviz import psislw
    except ImportError:
        psislw = None
    if psislw is not None:
        smoothed, khat = psislw(log_weights, reff=1.0)
    else:
        from arviz_stats.base import array_stats

        smoothed, khat = array_stats.psislw(-log_weights, r_eff=1.0, axis=-1)
    return np.asarray(smoothed, dtype=np.float64), np.asarray(khat, dtype=np.float64)


def _check_log_weights(log_weights) -> torch.Tensor:
    log_weights = torch.as_tensor(log_weights).detach().double().cpu()
    if log_weights.dim() != 2 or log_weights.shape[0] == 0:
        raise InvalidDataError(f"log_weights must be a non-empty [N, K] matrix, got shape {list(log_weights.shape)}")
    if log_weights.shape[1] < MIN_PSIS_SAMPLES:
        raise InvalidDataError(
            f"PSIS needs at least {MIN_PSIS_SAMPLES} draws per datapoint (hundreds for a stable k-hat), "
            f"got K={log_weights.shape[1]}"
        )
    bad = ~torch.isfinite(log_weights)
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        raise InvalidDataError(
            f"{int(bad.any(1).sum())} datapoint(s) have a non-finite log-weight (first at index {row}): a weight of "
            "0 or NaN means the guide draws z where the model has no density, or a network gives non-finite outputs"
        )
    return log_weights


def psis_diagnostics(log_weights: torch.Tensor, khat_threshold: float = KHAT_THRESHOLD) -> dict[str, Any]:
    r"""Pareto-smoothed importance sampling diagnostics of importance log-weights [N, K] (one row per datapoint).

    Returns a dict; per-datapoint entries are float64 CPU tensors [N]:

    * ``"khat"`` -- the Pareto shape k-hat of each row's weights (ArviZ's PSIS,
      relative efficiency 1 since the draws are independent). Rows whose
      log-weights spread over less than 1e-3 nats (constant weights up to
      round-off, as with the exact posterior as guide) have no tail to fit and get
      -inf. Rows where ArviZ could not fit the tail (tied weights) get +inf
      (unreliable) and are not smoothed.
    * ``"unreliable"`` -- bool [N], k-hat > ``khat_threshold``;
      ``"unreliable_share"`` -- their share of the N datapoints.
    * ``"ess"`` -- effective sample size of the raw weights, (sum_k w_k)^2 / sum_k w_k^2.
    * ``"log_evidence"`` -- the plain estimate log (1/K) sum_k w_k, nats.
    * ``"psis_log_evidence"`` -- the PSIS estimate log (1/K) sum_k w~_k, nats, where
      w~ are the smoothed weights: the M largest weights replaced by quantiles of the
      fitted Pareto tail (and capped at the largest raw weight), the others unchanged.

    Derivation of the PSIS estimate: ArviZ returns smoothed weights normalized to sum
    to one, log w^_k = log w~_k - log sum_j w~_j, so the scale sum_j w~_j is lost.
    Every draw below the tail is left unchanged (w~_k = w_k), and the smallest raw
    weight is always below the tail, so with j its index,
    log sum_k w~_k = log w_j - log w^_j, and the estimate is that minus log K.
    """
    log_weights = _check_log_weights(log_weights)
    n, k = log_weights.shape
    log_k = math.log(k)
    log_sum_w = torch.logsumexp(log_weights, 1)
    ess = torch.exp(2 * log_sum_w - torch.logsumexp(2 * log_weights, 1))
    khat = torch.full((n,), -math.inf, dtype=torch.float64)
    psis_log_sum_w = log_sum_w.clone()  # constant rows: smoothing changes nothing

    spread = log_weights.max(1).values - log_weights.min(1).values
    fit = (spread >= CONSTANT_LOG_WEIGHT_SPREAD).nonzero().flatten()
    if fit.numel():
        raw = log_weights[fit].numpy()
        smoothed, fitted_khat = _fit_rows(raw)
        anchor = raw.argmin(1)[:, None]
        rows = np.arange(raw.shape[0])[:, None]
        psis_log_sum_w[fit] = torch.from_numpy(raw[rows, anchor] - smoothed[rows, anchor]).flatten()
        # A tail ArviZ could not fit (NaN, e.g. tied weights) counts as unreliable.
        khat[fit] = torch.from_numpy(np.where(np.isnan(fitted_khat), math.inf, fitted_khat))
    unreliable = khat > khat_threshold
    return {
        "khat": khat,
        "unreliable": unreliable,
        "unreliable_share": unreliable.double().mean().item(),
        "khat_threshold": khat_threshold,
        "ess": ess,
        "log_evidence": log_sum_w - log_k,
        "psis_log_evidence": psis_log_sum_w - log_k,
        "num_samples": k,
    }


def _fit_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ArviZ's PSIS on every row; a row whose tail cannot be fit (ties) gets k-hat = inf and no smoothing."""
    try:
        return _arviz_psislw(raw)
    except ValueError:  # ArviZ >= 1 raises on a tail of tied values; retry row by row
        smoothed, khat = np.empty_like(raw), np.empty(raw.shape[0])
        for i, row in enumerate(raw):
            try:
                row_smoothed, row_khat = _arviz_psislw(row[None])
                smoothed[i], khat[i] = row_smoothed[0], row_khat[0]
            except ValueError:
                smoothed[i], khat[i] = row - np.logaddexp.reduce(row), math.inf
        return smoothed, khat


# --- Latent sites over the whole batch ------------------------------------------------


@dataclass
class _SiteChunk:
    """A latent site for one chunk of datapoints: q(z | x_rows) and the prior p(z), batch [n].

    In a program whose guide marks discrete sites for enumeration, the chunk is traced with them enumerated
    (:func:`ppl_vae.enumerated.enumerated_trace_pair`), as the evaluation sums them: a site that depends on them has
    their values in its batch dims left of the data plate, and ``weight`` is q(y | x) of every configuration y of
    the enumerated sites (batch [E..., n]), by which :func:`_expected` takes its exact expectation.
    """

    rows: slice
    q: Distribution
    p: Distribution
    weight: torch.Tensor | None = None

    def expected(self, value: torch.Tensor, name: str, event_dims: int = 0) -> torch.Tensor:
        """sum_y q(y | x) value(y): per-datapoint ``value`` [batch..., event...] -> [n, event...] (:func:`_expected`)."""
        return _expected(self, value, name, event_dims)


@dataclass
class _Site:
    """A latent site's distributions over all datapoints, and what the programs' structure says of it."""

    name: str
    chunks: list[_SiteChunk]
    num_datapoints: int
    model_parents: list[str]  # latent sites its prior depends on
    guide_parents: list[str]  # latent sites its guide depends on
    conflicts: list[str]  # model parents drawn after it in the guide, from its value
    enumerated: set[str] = field(default_factory=set)  # the guide's sites the evaluation sums out (ppl_vae.enumerated)

    @property
    def latent_dim(self) -> int:
        return int(self.chunks[0].q.event_shape[0])

    def require_shape(self) -> None:
        """Batch shape [n] (the data plate only; in an enumerated program, its enumerated sites' values left of it)
        and one event dimension, in the guide and the prior."""
        chunk = self.chunks[0]
        for role, fn in (("guide", chunk.q), ("model", chunk.p)):
            n = chunk.rows.stop - chunk.rows.start
            batch = tuple(fn.batch_shape)
            enumerated = chunk.weight is not None and batch[-1:] == (n,) and _enumeration_batch(chunk, batch)
            if (batch != (n,) and not enumerated) or len(fn.event_shape) != 1:
                raise ModelStructureError(
                    f"site {self.name!r}: the {role}'s distribution has batch shape {list(fn.batch_shape)} and event "
                    f"shape {list(fn.event_shape)}; these diagnostics need batch shape [N] (the data plate only, at "
                    "dim -1) and one event dimension, e.g. dist.Normal(loc, scale).to_event(1) inside "
                    "pyro.plate('data', N)"
                )

    def require_fixed_parents(self) -> None:
        """The condition of an analytic KL term: no model parent is drawn after the site in the guide."""
        self.require_shape()
        if self.conflicts:
            raise ModelStructureError(
                f"site {self.name!r}: its model parent(s) {self.conflicts} are drawn after it in the guide, so "
                "KL(q || p) per dimension at fixed parents is not its KL term"
            )

    def require_guide_of_x_alone(self, shape: bool = True, mixture: bool = False) -> None:
        """q(z | x) is one distribution per datapoint: the site's guide has no latent parents (and, with ``shape``,
        :meth:`require_shape`). ``mixture``: parents that are all enumerated are allowed (q(z | x) is then the exact
        mixture sum_y q(y | x) q(z | x, y), whose mean is taken exactly)."""
        if shape:
            self.require_shape()
        if mixture and self.chunks[0].weight is not None and set(self.guide_parents) <= self.enumerated:
            return
        if self.guide_parents and set(self.guide_parents) <= self.enumerated:
            raise ModelStructureError(
                f"site {self.name!r}: its guide depends on the enumerated site(s) {self.guide_parents}, so "
                f"q({self.name} | x) is the mixture sum_y q(y | x) q(z | x, y); the aggregate posterior of these "
                "diagnostics is computed for one distribution per datapoint"
            )
        if self.guide_parents:
            raise ModelStructureError(
                f"site {self.name!r}: its guide depends on latent site(s) {self.guide_parents}, so q({self.name} | x) "
                "is a mixture over their draws, not one distribution per datapoint"
            )

    def require_marginal_prior(self, shape: bool = True) -> None:
        """The aggregate posterior is compared with p(z): the site's prior has no latent parents."""
        self.require_guide_of_x_alone(shape)
        if self.model_parents:
            raise ModelStructureError(
                f"site {self.name!r}: its prior depends on latent site(s) {self.model_parents}, so its marginal "
                f"p({self.name}) has no closed form to compare the aggregate posterior with"
            )


def _pick_site(latent_sites: list[str], site: str | None) -> str:
    if site is None:
        if len(latent_sites) != 1:
            raise ModelStructureError(f"the model has several latent sites {latent_sites}: name one with site=...")
        return latent_sites[0]
    if site not in latent_sites:
        raise ModelStructureError(f"{site!r} is not a latent site of the model; its latent sites are {latent_sites}")
    return site


def _collect_sites(
    model: Callable, guide: Callable, data: tuple, names: list[str] | None, chunk_size: int | None,
    data_plate: str | None,
) -> dict[str, _Site]:
    """Trace the guide, and the model replayed on it, over the data in chunks; keep each named site's distributions.

    ``names`` None means every latent site. One pass serves every site, so the sites'
    distributions come from the same draws.
    """
    plan = plan_evaluation(model, guide, *data, num_samples=1, chunk_size=chunk_size, data_plate=data_plate)
    structure = plan.structure
    names = structure.latent_sites if names is None else names
    n = data[0].shape[0]
    chunks: dict[str, list[_SiteChunk]] = {name: [] for name in names}
    # Enumerated sites are summed here as in the evaluation (not drawn), so each diagnostic is of the quantity the
    # evaluation reports: e.g. a site's KL per dimension sums to its KL term,
    # sum_y q(y | x) KL(q(z | x, y) || p(z | y)).
    trace = enumerated_trace_pair if structure.enumerated else trace_pair
    with torch.no_grad():
        for start in range(0, n, plan.chunk_size):
            rows = slice(start, min(start + plan.chunk_size, n))
            model_trace, guide_trace = trace(
                model, guide, tuple(value[rows] for value in data), None, structure.max_plate_nesting
            )
            weight = _enumeration_weight(guide_trace, structure) if structure.enumerated else None
            for name in names:
                chunks[name].append(_SiteChunk(rows, guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"],
                                               weight))
    return {name: _site(name, chunks[name], n, structure) for name in names}


def _enumeration_weight(guide_trace: Any, structure: ProgramStructure) -> torch.Tensor:
    """q(y | x) of every configuration of the enumerated guide sites: the product of their probabilities at their
    enumerated values, broadcast to one tensor [E..., n] (their dims left of the data plate)."""
    log_q = [guide_trace.nodes[name]["fn"].log_prob(guide_trace.nodes[name]["value"]) for name in structure.enumerated]
    shape = torch.broadcast_shapes(*(value.shape for value in log_q))
    return sum(value.expand(shape) for value in log_q).exp()


def _enumeration_batch(chunk: _SiteChunk, batch: tuple[int, ...]) -> bool:
    """Whether a batch shape is made of the enumeration's dims and the data plate: it broadcasts into the weight's."""
    try:
        return torch.broadcast_shapes(batch, chunk.weight.shape) == chunk.weight.shape
    except RuntimeError:
        return False


def _expected(chunk: _SiteChunk, value: torch.Tensor, name: str, event_dims: int = 0) -> torch.Tensor:
    """The exact expectation over the enumerated sites of a per-datapoint ``value`` [batch..., event...]:
    sum_y q(y | x) value(y), [n, event...]. Without enumeration, ``value`` reshaped to [n, event...].

    The weight is first summed over the enumeration dims ``value`` does not vary along (it does not depend on those
    sites, or it is the term of one of them, e.g. KL(q(y2 | x, y1) || p(y2 | y1)) has no y2 dim): the marginal q of
    the configurations it does depend on. 0 * anything = 0 (a configuration q gives no mass).
    """
    n = chunk.rows.stop - chunk.rows.start
    event = tuple(value.shape[value.dim() - event_dims:])
    batch = tuple(value.shape[:value.dim() - event_dims])
    if chunk.weight is None:
        return value.reshape(n, *event)
    weight = chunk.weight.to(device=value.device, dtype=value.dtype)
    if batch[-1:] not in ((n,), (1,), ()) or not _enumeration_batch(chunk, batch):
        raise ModelStructureError(f"site {name!r}: batch shape {list(batch)} is not the enumerated sites' values and "
                                  f"the data plate {list(weight.shape)}")
    padded = (1,) * (weight.dim() - len(batch)) + batch
    absent = [d for d in range(weight.dim() - 1) if padded[d] == 1 and weight.shape[d] > 1]
    weight = weight.sum(absent, keepdim=True) if absent else weight
    weight = weight.reshape(*weight.shape, *(1,) * event_dims)
    value = value.reshape(*padded, *event)
    product = torch.where(weight > 0, weight * value, torch.zeros((), dtype=value.dtype))
    return product.sum(tuple(range(weight.dim() - event_dims - 1))).expand(n, *event)


def _site(name: str, chunks: list[_SiteChunk], n: int, structure: ProgramStructure) -> _Site:
    return _Site(
        name, chunks, n, sorted(structure.model_parents.get(name, ())), sorted(structure.guide_parents.get(name, ())),
        list(structure.order_conflicts.get(name, [])), set(structure.enumerated),
    )


def _collect_site(
    model: Callable, guide: Callable, data: tuple, site: str | None, chunk_size: int | None, data_plate: str | None
) -> _Site:
    """:func:`_collect_sites` for one site: ``site``, or the model's only latent site."""
    plan = plan_evaluation(model, guide, *data, num_samples=1, chunk_size=chunk_size, data_plate=data_plate)
    name = _pick_site(plan.structure.latent_sites, site)
    return _collect_sites(model, guide, data, [name], chunk_size, data_plate)[name]


def _diagonal_normal(fn: Distribution, name: str, role: str) -> Normal:
    """The per-dimension Normal [n, D] behind dist.Normal(loc, scale).to_event(1); a clear error for anything else."""
    if not (isinstance(fn, Independent) and isinstance(fn.base_dist, Normal) and fn.reinterpreted_batch_ndims == 1):
        raise ModelStructureError(
            f"site {name!r}: the {role}'s distribution is {type(fn).__name__}"
            + (f"({type(fn.base_dist).__name__})" if isinstance(fn, Independent) else "")
            + ", not a diagonal Normal; per-dimension diagnostics need dist.Normal(loc, scale).to_event(1) "
            "in both the guide and the prior"
        )
    shape = fn.batch_shape + fn.event_shape
    return Normal(fn.base_dist.loc.expand(shape), fn.base_dist.scale.expand(shape), validate_args=False)


# --- Per-dimension KL, active units, collapse -----------------------------------------


def _kl_per_dimension(site: _Site) -> torch.Tensor:
    site.require_fixed_parents()
    total = torch.zeros(site.latent_dim, dtype=torch.float64)
    for chunk in site.chunks:
        q = _diagonal_normal(chunk.q, site.name, "guide")
        p = _diagonal_normal(chunk.p, site.name, "model (prior)")
        kl = kl_divergence(q, p).double()  # [batch..., D]: the enumerated sites' values (if any) and the datapoints
        total += chunk.expected(kl, site.name, event_dims=1).sum(0).cpu()
    return total / site.num_datapoints


def _activity(site: _Site) -> torch.Tensor:
    site.require_guide_of_x_alone(mixture=True)  # E_q[z | x] = sum_y q(y | x) E_q[z | x, y] over enumerated parents
    means = torch.cat([c.expected(_diagonal_normal(c.q, site.name, "guide").loc.double(), site.name, event_dims=1).cpu()
                       for c in site.chunks])
    return means.var(0, correction=1 if site.num_datapoints > 1 else 0)


@evaluates
def kl_per_dimension(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    site: str | None = None,
    chunk_size: int | None = None,
    data_plate: str | None = None,
) -> torch.Tensor:
    """(1/N) sum_n KL(q(z_d | x_n) || p(z_d)) for each latent dimension d: a float64 CPU tensor [D], nats.

    Analytic Normal-Normal KL; the guide and the prior of ``site`` must both be
    diagonal Normals (``dist.Normal(loc, scale).to_event(1)``), and the site's model
    parents must not be drawn after it in the guide. The entries sum to the site's
    analytic KL term of :func:`ppl_vae.estimators.elbo_decomposition`.
    """
    return _kl_per_dimension(_collect_site(model, guide, (x, *cond), site, chunk_size, data_plate))


def _active_units(site: _Site, threshold: float) -> dict[str, Any]:
    activity = _activity(site)
    active = activity > threshold
    return {"num_active": int(active.sum()), "active": active, "activity": activity, "threshold": threshold}


@evaluates
def active_units(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    site: str | None = None,
    threshold: float = ACTIVITY_THRESHOLD,
    chunk_size: int | None = None,
    data_plate: str | None = None,
) -> dict[str, Any]:
    """Active units of Burda et al. (2015): unit d is active when A_d = Var_x(E_q[z_d | x]) > ``threshold``.

    The guide of ``site`` must be a diagonal Normal that depends on x alone (its mean
    is read from the distribution). Returns ``"num_active"`` (int), ``"active"`` (bool
    tensor [D]), ``"activity"`` (A_d, float64 tensor [D], in squared units of z) and ``"threshold"``.
    """
    return _active_units(_collect_site(model, guide, (x, *cond), site, chunk_size, data_plate), threshold)


def _collapse_report(site: _Site, kl_threshold: float, activity_threshold: float) -> dict[str, Any]:
    kl = _kl_per_dimension(site)
    try:
        num_active: int | dict = int((_activity(site) > activity_threshold).sum())
    except ModelStructureError as error:  # the KL per dimension holds; the posterior mean is not one distribution's
        num_active = {"unavailable": str(error)}
    order = torch.argsort(kl, descending=True)
    collapsed = int((kl < kl_threshold).sum())
    total = kl.sum().item()
    d = site.latent_dim
    problems = []
    if collapsed > d / 2:
        problems.append(f"{collapsed} of {d} latent dimensions carry less than {kl_threshold} nats of KL")
    if total < NEGLIGIBLE_TOTAL_KL:
        problems.append(f"the total KL is {total:.3g} nats, so q(z|x) barely differs from the prior")
    warning = f"posterior collapse at site {site.name!r}: " + "; ".join(problems) if problems else None
    return {
        "site": site.name,
        "units": "nats per datapoint",
        "num_datapoints": site.num_datapoints,
        "latent_dim": d,
        "kl_per_dimension": kl.tolist(),
        "dimensions_by_kl": order.tolist(),
        "kl_sorted": kl[order].tolist(),
        "total_kl": total,
        "kl_threshold": kl_threshold,
        "collapsed_share": collapsed / d,
        "num_active": num_active,
        "activity_threshold": activity_threshold,
        "warning": warning,
    }


@evaluates
def collapse_report(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    site: str | None = None,
    kl_threshold: float = COLLAPSED_KL_THRESHOLD,
    activity_threshold: float = ACTIVITY_THRESHOLD,
    chunk_size: int | None = None,
    data_plate: str | None = None,
) -> dict[str, Any]:
    """A posterior-collapse report for a diagonal-Normal latent site, JSON-ready (floats and lists), in nats.

    * ``"kl_per_dimension"`` -- mean KL of each dimension, in dimension order;
    * ``"dimensions_by_kl"`` and ``"kl_sorted"`` -- the dimensions and their KL, largest KL first;
    * ``"total_kl"`` -- their sum (the site's KL term);
    * ``"collapsed_share"`` -- share of dimensions whose KL is below ``kl_threshold``;
    * ``"num_active"`` -- active units (Burda et al. 2015, ``activity_threshold``), see
      :func:`active_units`; ``{"unavailable": reason}`` where the site's guide depends on other latent sites;
    * ``"warning"`` -- a sentence when most dimensions are collapsed or the total KL is
      below 0.1 nats (the decoder then barely uses z), else None.
    """
    data = _collect_site(model, guide, (x, *cond), site, chunk_size, data_plate)
    return _collapse_report(data, kl_threshold, activity_threshold)


# --- Aggregate posterior: ELBO surgery and total correlation ---------------------------


@dataclass
class _AggregateTerms:
    """Per-draw terms [S, N] (or [S, N, D] per dimension) for z_sn ~ q(z | x_n), nats."""

    kl: torch.Tensor  # [N]: KL(q(z|x_n) || p(z)), analytic, or Monte Carlo over the S draws
    kl_method: str
    log_q_agg: torch.Tensor  # log q(z_sn)
    log_p: torch.Tensor  # log p(z_sn)
    log_q_agg_dims: torch.Tensor | None = None  # log q(z_snd), the aggregate's marginals
    log_p_dims: torch.Tensor | None = None  # log p(z_snd)


def _log_aggregate(z: torch.Tensor, site: _Site, per_dimension: bool):
    """log q(z) = logsumexp_m log q(z | x_m) - log N for draws z [J, D]; with its per-dimension marginals [J, D]."""
    total = torch.full(z.shape[:1], -math.inf, dtype=torch.float64)
    dims = torch.full(z.shape, -math.inf, dtype=torch.float64) if per_dimension else None
    zz = z.unsqueeze(-2)  # [J, 1, D] against a batch of n datapoints
    for chunk in site.chunks:
        if per_dimension:
            log_q = _diagonal_normal(chunk.q, site.name, "guide").log_prob(zz)  # [J, n, D]
            dims = torch.logaddexp(dims, torch.logsumexp(log_q, 1).double().cpu())
            log_q = log_q.sum(-1)
        else:
            log_q = chunk.q.log_prob(zz)  # [J, n]
        total = torch.logaddexp(total, torch.logsumexp(log_q, 1).double().cpu())
    log_n = math.log(site.num_datapoints)
    return total - log_n, (dims - log_n if per_dimension else None)


def _aggregate_terms(site: _Site, num_samples: int, per_dimension: bool) -> _AggregateTerms:
    """Draw ``num_samples`` z from every q(z | x_n) and evaluate each draw under q(z | x_n), p(z) and q(z)."""
    site.require_marginal_prior()
    num_samples = check_count(num_samples, "num_samples")
    draws, log_q_own, log_p, log_p_dims, kl = [], [], [], [], []
    with torch.no_grad():
        for chunk in site.chunks:
            z = chunk.q.sample((num_samples,))  # [S, n, D]
            draws.append(z)
            log_q_own.append(chunk.q.log_prob(z).double().cpu())
            log_p.append(chunk.p.log_prob(z).double().cpu())
            if per_dimension:
                log_p_dims.append(_diagonal_normal(chunk.p, site.name, "model (prior)").log_prob(z).double().cpu())
            kl.append(_analytic_kl(chunk.q, chunk.p))
        z = torch.cat(draws, 1)
        log_q_agg, log_q_agg_dims = _log_aggregate_blocks(z, site, per_dimension)
    log_q_own, log_p = torch.cat(log_q_own, 1), torch.cat(log_p, 1)
    analytic = all(value is not None for value in kl)
    return _AggregateTerms(
        kl=torch.cat(kl) if analytic else (log_q_own - log_p).mean(0),  # else Monte Carlo over the same draws
        kl_method=KL_ANALYTIC if analytic else KL_MONTE_CARLO,
        log_q_agg=log_q_agg,
        log_p=log_p,
        log_q_agg_dims=log_q_agg_dims,
        log_p_dims=torch.cat(log_p_dims, 1) if per_dimension else None,
    )


def _analytic_kl(q: Distribution, p: Distribution) -> torch.Tensor | None:
    try:
        return kl_divergence(q, p).double().cpu()
    except NotImplementedError:
        return None


def _log_aggregate_blocks(z: torch.Tensor, site: _Site, per_dimension: bool):
    """:func:`_log_aggregate` of draws z [S, N, D], in blocks: [block, chunk, D] stays within the memory budget."""
    s, n, d = z.shape
    chunk_n = max(c.rows.stop - c.rows.start for c in site.chunks)
    block = max(1, DEFAULT_CHUNK_ELEMENTS // (chunk_n * d))
    flat = z.reshape(s * n, d)
    parts = [_log_aggregate(flat[i : i + block], site, per_dimension) for i in range(0, s * n, block)]
    log_q_agg = torch.cat([total for total, _ in parts]).reshape(s, n)
    log_q_agg_dims = torch.cat([dims for _, dims in parts]).reshape(s, n, d) if per_dimension else None
    return log_q_agg, log_q_agg_dims


def _summary(per_datapoint: torch.Tensor) -> dict[str, float]:
    mean, stderr = mean_and_stderr(per_datapoint)
    return {"mean": mean, "stderr": stderr}


@evaluates
def elbo_surgery(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    site: str | None = None,
    num_samples: int = 1,
    chunk_size: int | None = None,
    data_plate: str | None = None,
) -> dict[str, Any]:
    r"""Average KL = mutual information + marginal KL (Hoffman & Johnson 2016), JSON-ready, nats per datapoint.

    * ``"average_kl"`` -- (1/N) sum_n KL(q(z | x_n) || p(z)), analytic where torch
      has a rule (``"kl_method"`` says which), else Monte Carlo;
    * ``"marginal_kl"`` -- KL(q(z) || p(z)) = E_q(z)[log q(z) - log p(z)] for the
      aggregate posterior q(z) = (1/N) sum_n q(z | x_n), estimated with
      ``num_samples`` draws from each q(z | x_n) and log q(z) summed over all N datapoints;
    * ``"mutual_information"`` -- average KL minus marginal KL, per datapoint; the
      quantity is at most ``"mutual_information_bound"`` = log N, the estimate up to its noise.

    Each is ``{"mean": ..., "stderr": ...}``. See the module docstring for the
    estimator's bias with finite N and what the standard errors cover. Works for any
    guide distribution with batch shape [N] and one event dimension (a diagonal
    Normal, a MultivariateNormal, ...) that depends on x alone, and a prior without
    latent parents. Costs O(S N^2 D) time for S = ``num_samples``.
    """
    return _elbo_surgery(_collect_site(model, guide, (x, *cond), site, chunk_size, data_plate), num_samples)


def _elbo_surgery(data: _Site, num_samples: int) -> dict[str, Any]:
    terms = _aggregate_terms(data, num_samples, per_dimension=False)
    marginal = (terms.log_q_agg - terms.log_p).mean(0)
    return {
        "site": data.name,
        "units": "nats per datapoint",
        "num_datapoints": data.num_datapoints,
        "num_samples": num_samples,
        "kl_method": terms.kl_method,
        "average_kl": _summary(terms.kl),
        "marginal_kl": _summary(marginal),
        "mutual_information": _summary(terms.kl - marginal),
        "mutual_information_bound": math.log(data.num_datapoints),
    }


@evaluates
def total_correlation(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    site: str | None = None,
    num_samples: int = 1,
    chunk_size: int | None = None,
    data_plate: str | None = None,
) -> dict[str, Any]:
    r"""Marginal KL = total correlation + dimension-wise KL (Chen et al. 2018), JSON-ready, nats per datapoint.

    For a diagonal-Normal guide and a diagonal-Normal (factorized) prior, with the
    aggregate posterior q(z) and its marginals q(z_d) = (1/N) sum_n q(z_d | x_n):

    * ``"total_correlation"`` -- KL(q(z) || prod_d q(z_d)) = E_q(z)[log q(z) - sum_d log q(z_d)];
    * ``"dimensionwise_kl"`` -- sum_d KL(q(z_d) || p(z_d)), with ``"per_dimension"``
      (a list of D means) beside its mean and stderr;
    * ``"marginal_kl"`` -- KL(q(z) || p(z)), their sum, from the same draws.

    All use the full-dataset aggregate, so no minibatch-weighted sampling is
    needed; see the module docstring for the finite-N bias.
    """
    return _total_correlation(_collect_site(model, guide, (x, *cond), site, chunk_size, data_plate), num_samples)


def _total_correlation(data: _Site, num_samples: int) -> dict[str, Any]:
    terms = _aggregate_terms(data, num_samples, per_dimension=True)
    tc = (terms.log_q_agg - terms.log_q_agg_dims.sum(-1)).mean(0)
    dimensionwise = (terms.log_q_agg_dims - terms.log_p_dims).mean(0)  # [N, D]
    # log p(z) as the sum of its factors (not the float32 joint), so TC + dimension-wise KL = marginal KL exactly.
    marginal = (terms.log_q_agg - terms.log_p_dims.sum(-1)).mean(0)
    return {
        "site": data.name,
        "units": "nats per datapoint",
        "num_datapoints": data.num_datapoints,
        "num_samples": num_samples,
        "total_correlation": _summary(tc),
        "dimensionwise_kl": {**_summary(dimensionwise.sum(1)), "per_dimension": dimensionwise.mean(0).tolist()},
        "marginal_kl": _summary(marginal),
    }


# --- Discrete latent sites -------------------------------------------------------------------


def is_discrete(fn: Distribution) -> bool:
    """Whether a distribution's support is discrete (Categorical, OneHotCategorical, Bernoulli, Poisson, ...)."""
    try:
        return bool(fn.support.is_discrete)
    except (NotImplementedError, AttributeError):
        return False


def _class_probabilities(fn: Distribution, n: int) -> torch.Tensor | None:
    """q(y = c) [n, C] of one categorical variable per datapoint, float64 on the CPU; None for other distributions.

    A Categorical or OneHotCategorical over C classes, or a Bernoulli (C = 2: 0 and 1), of batch shape [n].
    """
    if tuple(fn.batch_shape) != (n,):
        return None
    if isinstance(fn, (Categorical, OneHotCategorical)):
        return fn.probs.double().cpu()
    if isinstance(fn, Bernoulli) and tuple(fn.event_shape) == ():
        probs = fn.probs.double().cpu()
        return torch.stack([1 - probs, probs], -1)
    return None


def _site_class_probabilities(site: _Site, role: str) -> torch.Tensor | None:
    """The class probabilities [N, C] of ``site``'s guide (``"q"``) or prior (``"p"``) over all datapoints."""
    parts = [_class_probabilities(getattr(c, role), c.rows.stop - c.rows.start) for c in site.chunks]
    return None if any(part is None for part in parts) else torch.cat(parts)


def _describe_site(site: _Site) -> str:
    q = site.chunks[0].q
    probs = _class_probabilities(q, site.chunks[0].rows.stop - site.chunks[0].rows.start)
    classes = f", {probs.shape[-1]} classes" if probs is not None else ""
    return f"{describe_distribution(q)}{classes}"


def _discrete_kl(site: _Site, num_samples: int = DISCRETE_KL_SAMPLES) -> dict[str, Any]:
    """KL(q(y | x_n) || p(y)) averaged over the datapoints: analytic where torch has a rule, exact by summing over
    the classes of a categorical variable otherwise, else Monte Carlo over ``num_samples`` draws per datapoint."""
    if site.conflicts:
        raise ModelStructureError(f"site {site.name!r}: its model parent(s) {site.conflicts} are drawn after it in the "
                                  "guide, so KL(q || p) at fixed parents is not its KL term")
    n = site.chunks[0].rows.stop - site.chunks[0].rows.start
    for role, fn in (("guide", site.chunks[0].q), ("model", site.chunks[0].p)):
        enumerated = site.chunks[0].weight is not None and _enumeration_batch(site.chunks[0], tuple(fn.batch_shape))
        if tuple(fn.batch_shape) != (n,) and not enumerated:
            raise ModelStructureError(f"site {site.name!r}: the {role}'s distribution has batch shape "
                                      f"{list(fn.batch_shape)}; its KL per datapoint needs batch shape [N] (the data "
                                      "plate only)")
    parts, methods = [], set()
    with torch.no_grad():
        for chunk in site.chunks:
            n = chunk.rows.stop - chunk.rows.start
            value, q_probs, p_probs = _analytic_kl(chunk.q, chunk.p), None, None
            if value is None:
                q_probs, p_probs = _class_probabilities(chunk.q, n), _class_probabilities(chunk.p, n)
            if value is not None:
                methods.add(KL_ANALYTIC)
            elif q_probs is not None and p_probs is not None:
                value = _categorical_kl(q_probs, p_probs)
                methods.add(KL_EXACT)
            else:
                draws = chunk.q.sample((num_samples,))
                value = (chunk.q.log_prob(draws) - chunk.p.log_prob(draws)).double().mean(0).cpu()
                methods.add(KL_MONTE_CARLO)
            parts.append(chunk.expected(value, site.name))  # exact over enumerated parents; else value [n]
    kl = torch.cat(parts)
    method = methods.pop() if len(methods) == 1 else "mixed"
    return {"site": site.name, "units": "nats per datapoint", "num_datapoints": site.num_datapoints,
            "distribution": _describe_site(site), **_summary(kl), "method": method,
            **({"num_samples": num_samples} if method == KL_MONTE_CARLO else {})}


def _categorical_kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_c q_c (log q_c - log p_c) per row of class probabilities [n, C] (0 log 0 = 0)."""
    return (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)


def _discrete_elbo_surgery(site: _Site) -> dict[str, Any]:
    r"""ELBO surgery of one categorical variable, exact: no draws, every sum over the C classes.

    With q(y) = (1/N) sum_n q(y | x_n), per datapoint
    KL_n = sum_y q(y | x_n) log(q(y | x_n) / p_n(y)) = I_n + M_n, where
    I_n = sum_y q(y | x_n) log(q(y | x_n) / q(y)) and M_n = sum_y q(y | x_n) log(q(y) / p_n(y));
    the mean of I_n is the mutual information I(n; y) = H(q(y)) - (1/N) sum_n H(q(y | x_n)) and the mean of
    M_n is KL(q(y) || p(y)) (for a prior p the same for every n).
    """
    site.require_marginal_prior(shape=False)
    q, p = _site_class_probabilities(site, "q"), _site_class_probabilities(site, "p")
    if q is None or p is None:
        raise ModelStructureError(f"site {site.name!r} is discrete ({_describe_site(site)}) but not one categorical "
                                  "variable per datapoint, whose aggregate posterior is summed exactly; ELBO surgery "
                                  "is computed for Categorical, OneHotCategorical and Bernoulli sites")
    aggregate = q.mean(0, keepdim=True)
    mutual = (torch.xlogy(q, q) - torch.xlogy(q, aggregate)).sum(-1)
    marginal = (torch.xlogy(q, aggregate) - torch.xlogy(q, p)).sum(-1)
    return {
        "site": site.name,
        "units": "nats per datapoint",
        "num_datapoints": site.num_datapoints,
        "num_samples": 0,
        "method": "exact: q(y) = (1/N) sum_n q(y | x_n) summed over the classes",
        "kl_method": KL_EXACT,
        "average_kl": _summary(mutual + marginal),
        "marginal_kl": _summary(marginal),
        "mutual_information": _summary(mutual),
        "mutual_information_bound": math.log(site.num_datapoints),
        "class_probabilities": {"aggregate_posterior": aggregate[0].tolist(), "prior": p.mean(0).tolist()},
    }


def _discrete_site_diagnostics(site: _Site) -> dict[str, Any]:
    """KL, class probabilities and ELBO surgery of a discrete site, and a reason that fits for the others.

    One categorical variable per datapoint (Categorical, OneHotCategorical, Bernoulli): ELBO surgery exact
    (:func:`_discrete_elbo_surgery`); active units and KL per dimension do not apply (no continuous dimensions).
    A vector of discrete variables (e.g. ``dist.Bernoulli(probs).to_event(1)``): ELBO surgery by the Monte Carlo
    estimator of continuous sites (a mass function in place of a density), and the active units of its means.
    """
    what = f"site {site.name!r} is discrete ({_describe_site(site)})"
    single = _site_class_probabilities(site, "q") is not None
    q = site.chunks[0].q
    vector = not single and tuple(q.batch_shape) == (site.chunks[0].rows.stop - site.chunks[0].rows.start,) \
        and len(q.event_shape) == 1
    kl = _or_reason(lambda: _discrete_kl(site))
    if single:
        surgery = _or_reason(lambda: _discrete_elbo_surgery(site))
    elif vector:
        surgery = _or_reason(lambda: _elbo_surgery(site, DISCRETE_SURGERY_SAMPLES))
    else:
        surgery = {"unavailable": f"{what}: ELBO surgery needs one categorical variable or a vector of discrete "
                                  "variables per datapoint (batch shape [N], at most one event dimension)"}
    if "mutual_information" in surgery and surgery["mutual_information"]["mean"] < NEGLIGIBLE_TOTAL_KL:
        kl["warning"] = (f"posterior collapse at site {site.name!r}: I(x; {site.name}) is "
                         f"{surgery['mutual_information']['mean']:.3g} nats, so q({site.name} | x) barely depends on x")
    elif "mean" in kl and kl["mean"] < NEGLIGIBLE_TOTAL_KL:
        kl["warning"] = (f"posterior collapse at site {site.name!r}: its KL is {kl['mean']:.3g} nats, so "
                         f"q({site.name} | x) barely differs from the prior")
    if single:
        active = {"unavailable": f"{what}: one categorical variable has no dimensions to count as active; its class "
                                 f"probabilities and the mutual information I(x; {site.name}) of the ELBO surgery "
                                 "say how much it is used"}
    elif vector:
        active = _or_reason(lambda: _discrete_active_units(site))
    else:
        active = {"unavailable": f"{what}: active units need one event dimension of variables with a mean"}
    return {
        "kind": "discrete",
        "kl": kl,
        "active_units": active,
        "collapse": {"unavailable": f"{what}: the report on collapsed dimensions is made for diagonal-Normal sites; "
                                    "the site's KL and collapse warning are under 'kl'"},
        "elbo_surgery": surgery,
        "total_correlation": {"unavailable": f"{what}: total correlation is computed between the dimensions of a "
                                             "diagonal-Normal site"},
    }


def _discrete_active_units(site: _Site) -> int:
    """Active units of a vector of discrete variables: A_d = Var_x(E_q[y_d | x]) > the threshold (the guide's mean)."""
    site.require_guide_of_x_alone(shape=False)
    with torch.no_grad():
        means = torch.cat([c.q.mean.double().cpu() for c in site.chunks])
    return int((means.var(0, correction=1 if site.num_datapoints > 1 else 0) > ACTIVITY_THRESHOLD).sum())


# --- Everything at once, for `ppl-vae evaluate` -----------------------------------------


def _or_reason(compute: Callable[[], Any]) -> Any:
    """The diagnostic's value, or ``{"unavailable": reason}`` when the program's structure does not allow it."""
    try:
        return compute()
    except (ModelStructureError, NotImplementedError) as error:
        return {"unavailable": str(error).splitlines()[0]}
    except DEVICE_ERRORS:  # out of memory or a CUDA error: not the program's structure, and later steps would fail too
        raise
    except RuntimeError as error:  # e.g. a conditional flow that does not broadcast over other datapoints' draws
        return {"unavailable": "the guide's distribution cannot be evaluated at other datapoints' draws "
                               f"({str(error).splitlines()[0]})"}


@evaluates
def diagnostics_summary(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    psis: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    data_plate: str | None = None,
) -> dict[str, Any]:
    """JSON-ready diagnostics of a pair on its data: PSIS reliability, and per latent site collapse, active units,
    ELBO surgery and total correlation.

    ``psis`` is the second value of :func:`evidence_with_psis` on the same data (None
    when K was too small for PSIS). ``"sites"`` maps every latent site to its
    diagnostics; one that the site's structure does not allow (per-dimension ones need
    diagonal Normals; see the module docstring for the conditions on dependencies)
    comes back as ``{"unavailable": reason}``. A discrete site gets its own (``"kind": "discrete"``,
    its KL under ``"kl"``, an exact ELBO surgery for one categorical variable; see the module docstring).
    """
    sites = _collect_sites(model, guide, (x, *cond), None, chunk_size, data_plate)
    return {
        "units": "nats per datapoint",
        "psis": _psis_summary(psis) if psis is not None else {
            "unavailable": f"PSIS needs at least {MIN_PSIS_SAMPLES} importance samples per datapoint"
        },
        "sites": {name: _site_diagnostics(site) for name, site in sites.items()},
    }


def _site_diagnostics(site: _Site) -> dict[str, Any]:
    if is_discrete(site.chunks[0].q):
        return _discrete_site_diagnostics(site)
    collapse = _or_reason(lambda: _collapse_report(site, COLLAPSED_KL_THRESHOLD, ACTIVITY_THRESHOLD))
    return {
        # Active units need only a diagonal-Normal guide of x alone, so they are counted even where the
        # prior (a mixture, a flow, a prior with latent parents) rules out the per-dimension KL.
        "active_units": collapse["num_active"] if "num_active" in collapse else _or_reason(
            lambda: _active_units(site, ACTIVITY_THRESHOLD)["num_active"]),
        "collapse": collapse,
        "elbo_surgery": _or_reason(lambda: _elbo_surgery(site, 1)),
        "total_correlation": _or_reason(lambda: _total_correlation(site, 1)),
    }


def site_diagnostics(diagnostics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-site diagnostics of a :func:`diagnostics_summary` result, by site name.

    Results written before diagnostics were per site (one latent site, at the top level)
    are read as one site, named by their collapse report or ``"z"``.
    """
    if "sites" in diagnostics:
        return diagnostics["sites"]
    keys = ("active_units", "collapse", "elbo_surgery", "total_correlation")
    name = diagnostics.get("collapse", {}).get("site") or diagnostics.get("elbo_surgery", {}).get("site") or "z"
    return {name: {key: diagnostics[key] for key in keys if key in diagnostics}}


def _psis_summary(psis: dict[str, Any]) -> dict[str, Any]:
    khat = psis["khat"][torch.isfinite(psis["khat"])]
    return {
        "num_samples": psis["num_samples"],
        "khat_threshold": psis["khat_threshold"],
        "unreliable_share": psis["unreliable_share"],
        "khat_median": khat.median().item() if khat.numel() else None,
        "khat_max": khat.max().item() if khat.numel() else None,
        "log_evidence": _summary(psis["log_evidence"]),
        "psis_log_evidence": _summary(psis["psis_log_evidence"]),
        "mean_ess": psis["ess"].mean().item(),
    }

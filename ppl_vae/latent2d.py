r"""Two-dimensional latent spaces: exact evidence and posteriors on a grid, and tools to look at the space.

With a 2-D latent z the integral behind every VAE number can be done numerically:

.. math::

    p(x) = \int p(x | z)\, p(z)\, dz \approx \sum_{i,j} w_{ij}\, p(x | z_{ij})\, p(z_{ij}),

on a regular grid z_ij over a box [a_1, b_1] x [a_2, b_2] with P points per axis
(spacing h_d = (b_d - a_d) / (P - 1)) and the trapezoid weights
w_ij = h_1 h_2 c_i c_j (c = 1/2 on the first and last point of an axis, 1 elsewhere).
Sums are log-sum-exps in float64. The same grid gives the true posterior
p(z | x) = p(x, z) / p(x) at every grid point (:func:`grid_log_posterior`), which is how
the figures of ``experiments/q5_bayes_2d.py`` draw it.

**The composite rule of** :func:`log_evidence_2d`. A trained VAE's posteriors are narrow
(standard deviations of 0.01-0.1 in a prior of scale 1), and some have, besides that core,
faint ridges or second modes far away, even beyond |z| = 5. So three grids are combined:

1. a *global* grid over ``bounds`` (default [-8, 8]^2, 321 points per axis, spacing 0.05),
   shared by all datapoints (for a VAE the decoder runs once per grid point);
2. per datapoint, a *local* grid of ``zoom_points`` per axis (default 61) over the box of
   global points whose log p(x, z) is within ``zoom_threshold`` (30 nats) of the maximum,
   padded by two global cells and clipped to the global box. Where it does not resolve the
   posterior (see below) its spacing is halved, up to twice;
3. a coarse *ring* grid over the box three times as wide as the global one (default
   [-24, 24]^2, 121 points per axis), shared by all datapoints.

log p(x) = log(local sum + the global grid's cells outside the local box + the ring grid's
cells outside the global box). Beyond the ring (|z| > 18 by default) the prior is below
e^-288 of its peak and nothing is counted.

**Error estimate** (``error``, nats, per datapoint) = ``refinement`` + ``outer_mass`` +
``tail_mass``:

* ``refinement`` = |log I_h - log I_2h| of the local grid, the change when every other
  point is dropped (P must be odd). For a smooth integrand that is negligible at the box's
  edges the trapezoid rule converges faster than any power of h (for a Gaussian of standard
  deviation s the relative error is about 2 exp(-2 pi^2 s^2 / h^2) per axis), so the error of
  I_h is far smaller than this difference: a conservative estimate;
* ``outer_mass`` and ``tail_mass``: the shares of the result that come from the global cells
  outside the local box and from the ring outside the global box, each counted whole as
  possible error (log(1 + m) <= m), which overstates them.

These estimates assume the local grid *resolves* the posterior: when only a few grid
points carry its mass, I_h and I_2h can both be far off while agreeing with each other.
So ``effective_points`` = (sum_ij m_ij)^2 / sum_ij m_ij^2 of the local grid's masses
m_ij = w_ij p(x, z_ij) is reported too, and where it stays below :data:`MIN_EFFECTIVE_POINTS`
(10; a Gaussian posterior of standard deviation s has about 4 pi s^2 / h^2, so 10 points means
h ~ 1.1 s, where the trapezoid rule is still accurate to ~1e-6) after the refinements, the error
is infinite: the grid is too coarse to say. A posterior thin along a direction the grid does
not resolve while wide along another can pass this check; ``refinement`` then usually shows
it, but that is not guaranteed. A mode narrower than the global spacing that no global point
comes near would be missed entirely. These are estimates, not bounds; tests/test_latent2d.py
checks them against closed forms and against finer grids.

**Which model.** :func:`log_evidence_2d` takes a :class:`ppl_vae.model.VAE` (fast path: the
prior, decoder and likelihood modules; for the Bernoulli likelihood log p(x | z) for all images
is one matrix product) or any Pyro model ``model(x)`` with one latent sample site of event
shape (2,) inside the data plate (generic path: the model is run with the latent site
conditioned on the grid, vectorized over grid points in a plate left of the model's plates,
and every site's log-density is read from the trace, as :mod:`ppl_vae.evaluate` does). Scale
factors (a KL weight) are ignored: the numbers are those of the unscaled model, like every
evidence number here.

The other helpers: densities of any program's latent site on a grid (the prior, a guide, the
aggregate posterior (1/N) sum_n q(z | x_n)). Decoding a grid of the latent space, the share of
grid cells that hold a code and a small digit classifier used to score decoded images live in
:mod:`ppl_vae.latent_views` (shared with :mod:`ppl_vae.plots`) and are importable from here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyro
import torch
from pyro import poutine
from torch import nn

from .chunking import DEFAULT_CHUNK_ELEMENTS, per_datapoint
from .errors import InvalidDataError, ModelStructureError
from .inspection import ProgramStructure, find_data_plate, sample_sites
from .latent_views import (  # noqa: F401 -- re-exported: latent2d.guide_means etc. (tests, experiments/)
    classify,
    code_range,
    decode_grid,
    guide_means,
    neighbour_change,
    occupancy,
    train_digit_classifier,
)
from .modes import evaluation_mode

LATENT_DIM = 2
DEFAULT_BOUNDS = (-8.0, 8.0)
DEFAULT_POINTS = 321
DEFAULT_ZOOM_POINTS = 61
DEFAULT_ZOOM_THRESHOLD = 30.0  # nats below the maximum of log p(x, z) on the global grid
ZOOM_PADDING_CELLS = 2
RING_FACTOR = 3  # the ring grid is this many times as wide as the global box
RING_CELLS = 40  # cells of the ring grid across the width of the global box
MAX_REFINEMENTS = 2  # local grids that do not resolve the posterior get twice, then four times the resolution
REFINEMENT_TOLERANCE = 1e-4  # nats
MIN_EFFECTIVE_POINTS = 10.0  # fewer grid points carrying the posterior: the error estimate is not trusted (infinite)

# A log-joint function: (x [n, ...], z [G, 2] shared by all rows, or [n, G, 2] per row) -> log p(x_i, z_g) [n, G].
LogJoint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- Grids and quadrature -------------------------------------------------------------------


def _as_boxes(low, high, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds as [n, 2] float64 boxes, from scalars, [2] tensors (one box for all) or [n, 2] tensors."""
    boxes = []
    for bound in (low, high):
        bound = torch.as_tensor(bound, dtype=torch.float64).cpu()
        if bound.dim() <= 1:
            bound = bound.expand(LATENT_DIM).expand(n, LATENT_DIM)
        if bound.shape != (n, LATENT_DIM):
            raise InvalidDataError(f"the grid's bounds must be scalars, [2] or [N, 2] with N = {n}, got {list(bound.shape)}")
        boxes.append(bound.clone())
    if not torch.all(boxes[1] > boxes[0]):
        raise InvalidDataError("every upper bound of the grid must be above its lower bound")
    return boxes[0], boxes[1]


def _check_points(points: int) -> None:
    if not isinstance(points, int) or points < 5 or points % 2 == 0:
        raise InvalidDataError(f"points per axis must be an odd integer >= 5 (the error check drops every other point), got {points!r}")


def grid_axes(low: torch.Tensor, high: torch.Tensor, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The points of each axis, [..., P] for z_1 and for z_2, from boxes ``low``/``high`` of shape [..., 2]."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    axes = low[..., None, :] + (high - low)[..., None, :] * t[:, None]  # [..., P, 2]
    return axes[..., 0], axes[..., 1]


def grid_points(low: torch.Tensor, high: torch.Tensor, points: int) -> torch.Tensor:
    """Grid points as [..., P * P, 2] (float64), z_1 varying slowest: point (i, j) is row i * P + j."""
    z1, z2 = grid_axes(torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64), points)
    p = points
    first = z1[..., :, None].expand(*z1.shape[:-1], p, p)
    second = z2[..., None, :].expand(*z2.shape[:-1], p, p)
    return torch.stack([first, second], -1).reshape(*z1.shape[:-1], p * p, LATENT_DIM)


def _log_trapezoid_weights(low: torch.Tensor, high: torch.Tensor, points: int) -> torch.Tensor:
    """log w_ij of the 2-D trapezoid rule, [n, P, P], for boxes [n, 2]."""
    h = (high - low) / (points - 1)  # [n, 2]
    ends = torch.ones(points, dtype=torch.float64)
    ends[0] = ends[-1] = 0.5
    log_c = ends.log()
    return h.log().sum(-1)[:, None, None] + log_c[None, :, None] + log_c[None, None, :]


@dataclass
class GridEvidence:
    """Numerically integrated log p(x) per datapoint (float64 CPU tensors [N]), with its error estimates.

    * ``log_evidence`` -- log of the quadrature sum, nats;
    * ``refinement`` -- |log I_h - log I_2h| of the (local) grid, the discretization error estimate;
    * ``edge_mass`` -- share of the (local) grid's sum on its boundary points;
    * ``effective_points`` -- (sum of the grid's masses)^2 / sum of their squares: how many grid
      points carry the posterior;
    * ``outer_mass`` / ``tail_mass`` -- shares of the result from the global cells outside the local
      box and from the ring outside the global box (0 where not computed);
    * ``error`` -- ``refinement + outer_mass + tail_mass``, nats; infinite where
      ``effective_points`` is below :data:`MIN_EFFECTIVE_POINTS` (the grid does not resolve the posterior);
    * ``low`` / ``high`` -- each datapoint's (local) box [N, 2]; ``points`` -- its points per axis [N].
    """

    log_evidence: torch.Tensor
    refinement: torch.Tensor
    edge_mass: torch.Tensor
    effective_points: torch.Tensor
    outer_mass: torch.Tensor
    tail_mass: torch.Tensor
    error: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    points: torch.Tensor


def _reduce_grid(log_joint: torch.Tensor, low: torch.Tensor, high: torch.Tensor, points: int):
    """(log I_h, refinement, edge mass, effective points) from log p(x, z) on the grid, [n, P, P] float64."""
    p = points
    terms = log_joint + _log_trapezoid_weights(low, high, p)
    flat = terms.reshape(len(terms), -1)
    log_integral = torch.logsumexp(flat, -1)
    coarse = log_joint[:, ::2, ::2] + _log_trapezoid_weights(low, high, (p + 1) // 2)
    log_coarse = torch.logsumexp(coarse.reshape(len(coarse), -1), -1)
    edge = torch.zeros(p, p, dtype=torch.bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    edge_mass = torch.exp(torch.logsumexp(terms[:, edge], -1) - log_integral)
    effective_points = torch.exp(2 * log_integral - torch.logsumexp(2 * flat, -1))
    return log_integral, (log_integral - log_coarse).abs(), edge_mass, effective_points


def grid_log_joint(log_joint: LogJoint, x: torch.Tensor, low, high, points: int, chunk_size: int = 100) -> torch.Tensor:
    """log p(x_n, z) on each datapoint's grid: float64 [N, P, P], z_1 along dim 1 and z_2 along dim 2."""
    _check_points(points)
    n = x.shape[0]
    low, high = _as_boxes(low, high, n)
    shared = bool(torch.all(low == low[:1]) and torch.all(high == high[:1]))
    out = []
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            z = grid_points(low[0], high[0], points) if shared else grid_points(low[rows], high[rows], points)
            values = log_joint(x[rows], z.float())
            out.append(values.double().cpu().reshape(-1, points, points))
    return torch.cat(out)


def _unresolved_to_inf(error: torch.Tensor, effective_points: torch.Tensor) -> torch.Tensor:
    return torch.where(effective_points >= MIN_EFFECTIVE_POINTS, error, torch.full_like(error, math.inf))


def grid_log_evidence(log_joint: LogJoint, x: torch.Tensor, low, high, points: int = DEFAULT_ZOOM_POINTS,
                      chunk_size: int = 100) -> GridEvidence:
    """log p(x) = log sum_ij w_ij p(x, z_ij) on the boxes [low, high] (shared [2] or per datapoint [N, 2]).

    One grid, no ring: ``error`` is the discretization estimate only; mass outside the box is
    not counted (``edge_mass`` hints at it). :func:`log_evidence_2d` adds the rest.
    """
    low, high = _as_boxes(low, high, x.shape[0])
    values = grid_log_joint(log_joint, x, low, high, points, chunk_size)
    log_integral, refinement, edge_mass, effective_points = _reduce_grid(values, low, high, points)
    zeros = torch.zeros_like(refinement)
    return GridEvidence(log_integral, refinement, edge_mass, effective_points, zeros, zeros.clone(),
                        _unresolved_to_inf(refinement, effective_points), low, high,
                        torch.full((len(x),), points, dtype=torch.long))


def zoom_indices(log_joint_values: torch.Tensor, threshold: float = DEFAULT_ZOOM_THRESHOLD,
                 padding_cells: int = ZOOM_PADDING_CELLS) -> torch.Tensor:
    """Per datapoint, the index box [i_low, i_high, j_low, j_high] ([N, 4]) of the grid points with
    log p(x, z) >= max - ``threshold``, padded by whole cells and clipped to the grid."""
    n, p, _ = log_joint_values.shape
    keep = log_joint_values >= log_joint_values.amax((1, 2), keepdim=True) - threshold
    index = torch.arange(p)
    rows, cols = keep.any(2), keep.any(1)  # [N, P]: a kept point on z_1 = z1[i] / on z_2 = z2[j]
    i_low = torch.where(rows, index, p).amin(1) - padding_cells
    i_high = torch.where(rows, index, -1).amax(1) + padding_cells
    j_low = torch.where(cols, index, p).amin(1) - padding_cells
    j_high = torch.where(cols, index, -1).amax(1) + padding_cells
    return torch.stack([i_low, i_high, j_low, j_high], 1).clamp(0, p - 1)


def _cells_outside(log_joint_values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """log of the trapezoid sum over the grid's cells outside each datapoint's index box [N, 4]: [N] (-inf if none)."""
    n, p, _ = log_joint_values.shape
    h = (high - low) / (p - 1)
    corners = torch.stack([log_joint_values[:, :-1, :-1], log_joint_values[:, 1:, :-1],
                           log_joint_values[:, :-1, 1:], log_joint_values[:, 1:, 1:]], -1)
    cells = torch.logsumexp(corners, -1) - math.log(4) + h.log().sum(-1)[:, None, None]  # [N, P-1, P-1]
    a = torch.arange(p - 1)
    inside_1 = (a[None, :] >= boxes[:, :1]) & (a[None, :] < boxes[:, 1:2])  # cell a spans points a and a + 1
    inside_2 = (a[None, :] >= boxes[:, 2:3]) & (a[None, :] < boxes[:, 3:4])
    inside = inside_1[:, :, None] & inside_2[:, None, :]
    return torch.logsumexp(cells.masked_fill(inside, -math.inf).reshape(n, -1), -1)


def log_evidence_2d(target, x: torch.Tensor, bounds=DEFAULT_BOUNDS, points: int = DEFAULT_POINTS,
                    zoom: bool = True, zoom_points: int = DEFAULT_ZOOM_POINTS,
                    zoom_threshold: float = DEFAULT_ZOOM_THRESHOLD, ring: bool = True, site: str | None = None,
                    chunk_size: int = 100) -> GridEvidence:
    """log p(x) of a 2-D latent model by quadrature, per datapoint, with its error estimate (module docstring).

    ``target`` is a :class:`ppl_vae.model.VAE`, a Pyro model ``model(x)``, or a :data:`LogJoint`
    made by :func:`vae_log_joint` / :func:`program_log_joint`. ``bounds`` is ``(low, high)`` for both
    axes or a pair of [2] tensors: the global box. ``zoom`` adds the local grids, ``ring`` the
    coarse grid around the global box; without both it is the global grid alone.
    """
    log_joint = as_log_joint(target, site)
    n = x.shape[0]
    low, high = _as_boxes(*bounds, n)
    _check_points(points)
    values = grid_log_joint(log_joint, x, low, high, points, chunk_size)
    log_global, refinement, edge_mass, effective_points = _reduce_grid(values, low, high, points)
    zeros = torch.zeros(n, dtype=torch.float64)
    counts = torch.full((n,), points, dtype=torch.long)
    result = GridEvidence(log_global, refinement, edge_mass, effective_points, zeros, zeros.clone(), zeros.clone(),
                          low, high, counts)
    log_parts = [log_global]
    if zoom:
        boxes = zoom_indices(values, zoom_threshold)
        z1, z2 = grid_axes(low, high, points)
        arange = torch.arange(n)
        local_low = torch.stack([z1[arange, boxes[:, 0]], z2[arange, boxes[:, 2]]], -1)
        local_high = torch.stack([z1[arange, boxes[:, 1]], z2[arange, boxes[:, 3]]], -1)
        local = grid_log_evidence(log_joint, x, local_low, local_high, zoom_points, chunk_size)
        points_now = zoom_points
        for _ in range(MAX_REFINEMENTS):
            rows = ((local.effective_points < MIN_EFFECTIVE_POINTS) | (local.refinement > REFINEMENT_TOLERANCE)).nonzero().flatten()
            if rows.numel() == 0:
                break
            points_now = 2 * points_now - 1  # halves the spacing, keeps the old points
            again = grid_log_evidence(log_joint, x[rows], local_low[rows], local_high[rows], points_now, chunk_size)
            for name in ("log_evidence", "refinement", "edge_mass", "effective_points", "points"):
                getattr(local, name)[rows] = getattr(again, name)
        for name in ("refinement", "edge_mass", "effective_points", "low", "high", "points"):
            setattr(result, name, getattr(local, name))
        log_parts = [local.log_evidence, _cells_outside(values, low, high, boxes)]
    if ring:
        centre, half = (low + high) / 2, (high - low) / 2
        ring_low, ring_high = centre - RING_FACTOR * half, centre + RING_FACTOR * half
        ring_points = RING_FACTOR * RING_CELLS + 1
        ring_values = grid_log_joint(log_joint, x, ring_low[0], ring_high[0], ring_points, chunk_size)
        first, last = (RING_FACTOR - 1) * RING_CELLS // 2, (RING_FACTOR + 1) * RING_CELLS // 2  # the global box's cells
        inner = torch.tensor([first, last, first, last]).expand(n, 4)
        log_parts.append(_cells_outside(ring_values, ring_low, ring_high, inner))
    log_evidence = torch.logsumexp(torch.stack(log_parts), 0)
    if zoom:
        result.outer_mass = torch.exp(log_parts[1] - log_evidence)
    if ring:
        result.tail_mass = torch.exp(log_parts[-1] - log_evidence)
    result.log_evidence = log_evidence
    result.error = _unresolved_to_inf(result.refinement + result.outer_mass + result.tail_mass, result.effective_points)
    return result


def grid_log_posterior(target, x: torch.Tensor, low, high, points: int = DEFAULT_ZOOM_POINTS,
                       site: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The true posterior on a grid: (z_1 axis [N, P], z_2 axis [N, P], log p(z | x) [N, P, P]).

    The log-density is normalized by the trapezoid sum over the box (as :func:`grid_log_evidence`),
    so exp of it integrates to 1 over the box; the posterior mass outside the box is not counted.
    """
    log_joint = as_log_joint(target, site)
    low, high = _as_boxes(low, high, x.shape[0])
    values = grid_log_joint(log_joint, x, low, high, points)
    log_integral = _reduce_grid(values, low, high, points)[0]
    z1, z2 = grid_axes(low, high, points)
    return z1, z2, values - log_integral[:, None, None]


# --- Log-joint functions: the fast path for a VAE, the generic path for any Pyro model -------


def as_log_joint(target, site: str | None = None) -> LogJoint:
    """A :data:`LogJoint` for a VAE (fast path), a Pyro model (generic path), or a LogJoint as is."""
    from .model import VAE

    if isinstance(target, VAE):
        return vae_log_joint(target)
    if getattr(target, "_is_log_joint", False):
        return target
    if callable(target):
        return program_log_joint(target, site)
    raise InvalidDataError(f"expected a VAE, a Pyro model or a log-joint function, got {type(target).__name__}")


def _mark(fn: LogJoint) -> LogJoint:
    fn._is_log_joint = True
    return fn


def vae_log_joint(vae, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> LogJoint:
    """log p(z) + log p(x | z) of a :class:`ppl_vae.model.VAE` from its prior, decoder and likelihood modules.

    On a shared grid the decoder runs once per grid point; with the Bernoulli likelihood
    log p(x | z) = x . logits - sum softplus(logits) for all images at once (a matrix product).
    """
    from .likelihoods import BernoulliLikelihood

    bernoulli = type(vae.likelihood) is BernoulliLikelihood

    def log_joint(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with evaluation_mode(vae):  # the networks as delivered: eval mode, no running statistic moved
            return _vae_log_joint(x, z)

    def _vae_log_joint(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = vae.flatten(x)
        device = next(vae.parameters()).device
        x, z = x.to(device), z.to(device)
        n, d = x.shape
        prior = vae.prior()
        if z.dim() == 2:  # shared grid
            g_chunk = max(1, chunk_elements // (max(1, n) * d)) if not bernoulli else max(1, chunk_elements // d)
            parts = []
            for start in range(0, z.shape[0], g_chunk):
                zc = z[start : start + g_chunk]
                out = vae.decoder(zc)
                if bernoulli:
                    log_lik = x @ out.T - nn.functional.softplus(out).sum(-1)  # [n, g]
                else:
                    log_lik = vae.likelihood(out).log_prob(x[:, None, :])  # [n, g]
                parts.append((log_lik + prior.log_prob(zc)[None, :]).double())
            return torch.cat(parts, 1)
        g_chunk = max(1, chunk_elements // (n * d))  # per-datapoint grids [n, G, 2]
        parts = []
        for start in range(0, z.shape[1], g_chunk):
            zc = z[:, start : start + g_chunk]
            out = vae.decoder(zc)  # [n, g, P]
            if bernoulli:
                log_lik = torch.bmm(out, x[:, :, None])[..., 0] - nn.functional.softplus(out).sum(-1)
            else:
                log_lik = vae.likelihood(out).log_prob(x[:, None, :])
            parts.append((log_lik + prior.log_prob(zc)).double())
        return torch.cat(parts, 1)

    return _mark(log_joint)


def _inspect_model(model: Callable, x: torch.Tensor, site: str | None, data_plate: str | None):
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with evaluation_mode(model), torch.random.fork_rng(devices=devices):
        trace = poutine.trace(model).get_trace(x)
    sites = sample_sites(trace)
    observed = [name for name, s in sites.items() if s["is_observed"]]
    latent = [name for name, s in sites.items() if not s["is_observed"]]
    if not observed:
        raise ModelStructureError("the model has no observed sample site: condition on the data with obs=x")
    if site is None:
        if len(latent) != 1:
            raise ModelStructureError(f"the model has latent sites {latent}: name the 2-D one with site=...")
        site = latent[0]
    elif site not in latent:
        raise ModelStructureError(f"{site!r} is not a latent sample site of the model (latent sites: {latent})")
    others = [name for name in latent if name != site]
    if others:
        raise ModelStructureError(f"grid integration needs exactly one latent site; the model also samples {others}")
    if tuple(sites[site]["fn"].event_shape) != (LATENT_DIM,):
        raise ModelStructureError(
            f"grid integration needs a latent site of event shape (2,), site {site!r} has {tuple(sites[site]['fn'].event_shape)}"
        )
    frames = [frame for s in sites.values() for frame in s["cond_indep_stack"]]
    if any(not frame.vectorized or frame.dim is None for frame in frames):
        raise ModelStructureError("sequential plates (pyro.plate used as an iterator) are not supported")
    max_plate_nesting = max((-frame.dim for frame in frames), default=0)
    data_frame = find_data_plate(sites, observed, x.shape[0], data_plate)
    for name, s in sites.items():
        if data_frame.name not in {f.name for f in s["cond_indep_stack"]}:
            raise ModelStructureError(f"site {name!r} is not inside the data plate {data_frame.name!r}")
    return site, ProgramStructure(max_plate_nesting, data_frame.name, data_frame.dim, observed, [site])


GRID_PLATE = "_ppl_vae_grid"


def program_log_joint(model: Callable, site: str | None = None, data_plate: str | None = None,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> LogJoint:
    """log p(x, z) of any Pyro model ``model(x)`` with one 2-D latent site, read from its traces.

    The latent site is conditioned on the grid values, the model runs vectorized over a
    plate of grid points left of its own plates, and the log-densities of every sample site
    (the conditioned latent and the observed ones) are summed per datapoint and grid point.
    """

    def log_joint(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with evaluation_mode(model):
            return _program_log_joint(x, z)

    def _program_log_joint(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        name, structure = _inspect_model(model, x, site, data_plate)
        n = x.shape[0]
        item = max(1, math.prod(x.shape[1:]))
        g_total = z.shape[-2]
        g_chunk = max(1, min(g_total, chunk_elements // (n * item)))
        ndim = structure.max_plate_nesting + 1
        parts = []
        for start in range(0, g_total, g_chunk):
            zc = z[..., start : start + g_chunk, :].to(x.device)
            g = zc.shape[-2]
            if zc.dim() == 2:
                zc = zc[:, None, :].expand(g, n, LATENT_DIM)
            else:
                zc = zc.transpose(0, 1)  # [g, n, 2]
            shape = [1] * ndim
            shape[0], shape[ndim + structure.data_dim] = g, n
            value = zc.reshape(*shape, LATENT_DIM)

            def conditioned(data, value=value, g=g):
                with pyro.plate(GRID_PLATE, g, dim=-ndim):
                    return poutine.condition(model, data={name: value})(data)

            trace = poutine.trace(conditioned).get_trace(x)
            total = torch.zeros(g, n, dtype=torch.float64, device=x.device)
            for s in sample_sites(trace).values():
                log_prob = s["fn"].log_prob(s["value"])
                total = total + per_datapoint(log_prob, s["mask"], structure, g, n).double()
            parts.append(total.T)
        return torch.cat(parts, 1)

    return _mark(log_joint)


# --- Densities of a program's latent site on a grid: prior, guide, aggregate posterior -------


def site_log_density(program: Callable, x: torch.Tensor, z: torch.Tensor, site: str = "z",
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """log of the distribution that ``program(x)`` samples ``site`` from, for each datapoint, at points z [G, 2].

    For the guide: log q(z | x_n); for the model: the prior log p(z) (the same for every n).
    Returns float64 [N, G]. The site's distribution must have batch shape [N] (the data plate).
    """
    with evaluation_mode(program):
        trace = poutine.trace(program).get_trace(x)
        if site not in trace.nodes:
            raise ModelStructureError(f"the program has no site {site!r}")
        fn = trace.nodes[site]["fn"]
        n = x.shape[0]
        g_chunk = max(1, chunk_elements // max(1, n))
        parts = [fn.log_prob(z[start : start + g_chunk, None, :].to(x.device).float()).double().T
                 for start in range(0, z.shape[0], g_chunk)]
    return torch.cat(parts, 1).reshape(n, -1).cpu()


def aggregate_log_density(guide: Callable, x: torch.Tensor, z: torch.Tensor, site: str = "z",
                          chunk_size: int = 500) -> torch.Tensor:
    """log q(z) = log (1/N) sum_n q(z | x_n), the aggregate posterior of the N datapoints, at z [G, 2]: [G]."""
    total = torch.full((z.shape[0],), -math.inf, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_size):
        log_q = site_log_density(guide, x[start : start + chunk_size], z, site)
        total = torch.logaddexp(total, torch.logsumexp(log_q, 0))
    return total - math.log(x.shape[0])

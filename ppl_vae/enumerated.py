r"""Evaluation with the discrete guide sites marked for enumeration summed out exactly, not drawn.

For a program whose guide marks discrete sites y for enumeration (``infer={"enumerate": "parallel"}``,
``config_enumerate``, ``--enumerate``) and draws its other latent sites z ~ q(z | x, y), one *particle* k
draws z for every value of y at once (Pyro's parallel enumeration: y's values in tensor dimensions left of
the particle plate, so several enumerated sites broadcast against each other), and the chunk's terms are
reduced over y exactly (:func:`enumerated_chunk_terms`, called by :func:`ppl_vae.chunking.chunk_terms`):

* **Evidence.** The per-particle importance weight is

  .. math:: W_k = \sum_y \frac{p(x, y, z_k^{(y)})}{q(z_k^{(y)} | x, y)}, \qquad z_k^{(y)} \sim q(z | x, y),

  unbiased for p(x) since E_q[p(x, y, z) / q(z | x, y)] = p(x, y) for each y. So

  .. math:: \log \hat p(x) = \log \frac{1}{K} \sum_k W_k = \log \sum_y \hat p(x, y),\quad
            \hat p(x, y) = \frac{1}{K} \sum_k \frac{p(x, y, z_k^{(y)})}{q(z_k^{(y)} | x, y)},

  the continuous sites importance-sampled given each y. Its variance is lower than that of drawing
  y ~ q(y | x) as well (weights p(x, y, z) / (q(y | x) q(z | x, y))): the sum over y removes the
  variance of the discrete draw entirely (Rao-Blackwellization: Var(E[w | z]) <= Var(w)), and a
  q(y | x) far from p(y | x) costs nothing, since q(y | x) does not enter the estimate at all. With the
  exact q(z | x, y) = p(z | x, y) every ratio is p(x, y) and log p̂(x) = log p(x) exactly, for any K.
* **ELBO decomposition.** Every term is its expectation under q(y | x) taken exactly,
  E_q[f] = sum_y q(y | x) f(y) (q(y | x): the product of the enumerated guide sites' probabilities):
  the reconstruction sum_y q(y | x) E_{q(z | x, y)}[log p(x | y, z)], each continuous site's KL at each y,
  and each enumerated site's KL term sum_y q(y | x) [log q(y | x) - log p(y)] -- analytic
  (``torch.distributions.kl_divergence``) where the structure says so, e.g. Categorical against Categorical.
  Their difference is the quantity ``TraceEnum_ELBO`` computes: sum_y q(y | x) E[log p(x, y, z) - log q(z | x, y)
  - log q(y | x)].

Sites the model alone enumerates (no guide site) are refused by :func:`ppl_vae.inspection.inspect_program`.
"""

from __future__ import annotations

from typing import Callable

import torch
from pyro import poutine
from torch.distributions import kl_divergence

from .inspection import (
    KL_ANALYTIC,
    Data,
    ProgramStructure,
    check_observed_support,
    sample_sites,
    site_log_prob,
    trace_pair,
)


def parallel_enumeration(guide: Callable) -> Callable:
    """``guide`` with every site marked for enumeration (``"parallel"`` or ``"sequential"``) enumerated in parallel:
    the evaluation sums them in one vectorized pass (sequential marks only save memory in training)."""
    def config(msg: dict) -> dict:
        return {"enumerate": "parallel"} if msg["infer"].get("enumerate") else {}

    return poutine.infer_config(guide, config)


def enumerated_trace_pair(model: Callable, guide: Callable, data: Data, k: int, max_plate_nesting: int):
    """Guide trace with its marked sites enumerated (dims left of the particle plate), and the model replayed on it."""
    def enumerated_guide(*args):
        return poutine.enum(parallel_enumeration(guide), first_available_dim=-(max_plate_nesting + 2))(*args)

    # The particle plate wraps the enumerated guide; enumeration dims start left of it.
    return trace_pair(model, enumerated_guide, data, k, max_plate_nesting)


def enumerated_chunk_terms(
    model: Callable, guide: Callable, data: Data, k: int, structure: ProgramStructure
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One vectorized pass of ``k`` particles with the enumerated sites summed: (log W_k, reconstruction per observed
    site, KL per latent site), each [k, n] in nats, as the module docstring defines them."""
    n = data[0].shape[0]
    model_trace, guide_trace = enumerated_trace_pair(model, guide, data, k, structure.max_plate_nesting)
    model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)
    check_observed_support({name: model_sites[name] for name in structure.observed_sites})
    raw: dict[tuple[str, str], tuple[torch.Tensor, object]] = {}
    for name in structure.observed_sites:
        raw["obs", name] = site_log_prob(model_sites[name]), model_sites[name]["mask"]
    for name in structure.latent_sites:
        p_site, q_site = model_sites[name], guide_sites[name]
        raw["p", name] = site_log_prob(p_site), p_site["mask"]
        raw["q", name] = site_log_prob(q_site), q_site["mask"]
        if structure.kl_methods[name] == KL_ANALYTIC:
            raw["kl", name] = kl_divergence(q_site["fn"], p_site["fn"]), q_site["mask"]
    terms = _per_datapoint_enumerated(raw, structure, k, n)
    enumerated = [name for name in structure.latent_sites if name in structure.enumerated]
    log_q_discrete = sum((terms["q", name] for name in enumerated), torch.zeros_like(terms["obs", structure.observed_sites[0]]))
    log_w = sum(terms["obs", name] for name in structure.observed_sites)
    for name in structure.latent_sites:
        log_w = log_w + terms["p", name] - (0 if name in structure.enumerated else terms["q", name])
    enum_dims = tuple(range(log_w.dim() - 2))
    probability = log_q_discrete.exp()

    def expected(value: torch.Tensor) -> torch.Tensor:  # sum_y q(y | x) value(y), exact; 0 * anything = 0
        value = value.expand_as(probability)
        return torch.where(probability > 0, probability * value, torch.zeros_like(value)).sum(enum_dims) \
            if enum_dims else value

    log_weight = torch.logsumexp(log_w, enum_dims) if enum_dims else log_w
    by_site = {name: expected(terms["obs", name]) for name in structure.observed_sites}
    kl = {name: expected(terms["kl", name] if ("kl", name) in terms else terms["q", name] - terms["p", name])
          for name in structure.latent_sites}
    return log_weight, by_site, kl


def _per_datapoint_enumerated(raw: dict, structure: ProgramStructure, k: int, n: int) -> dict:
    """Each term summed over every plate but the particle and data plates, keeping the enumeration dims:
    all broadcast to one shape [E_1, ..., E_m, k, n]."""
    plates = structure.max_plate_nesting + 1  # the particle plate and the programs' plates
    full = max(plates, *(value.dim() for value, _ in raw.values()))
    enum = full - plates
    keep = {enum, full + structure.data_dim}
    reduced = {}
    for key, (value, mask) in raw.items():
        if mask is not None and not (isinstance(mask, bool) and mask):
            value = torch.where(torch.as_tensor(mask, device=value.device), value, value.new_zeros(()))
        value = value.reshape((1,) * (full - value.dim()) + tuple(value.shape))
        other = [d for d in range(enum, full) if d not in keep]
        reduced[key] = value.sum(other, keepdim=True) if other else value
    shape = torch.broadcast_shapes(*(value.shape for value in reduced.values()))
    shape = (*shape[:enum], k, *shape[enum + 1:])
    out = {}
    for key, value in reduced.items():
        value = value.expand(shape)
        # The plate dims that were summed (size 1 now) go: [E..., k, n].
        out[key] = value.reshape(*shape[:enum], k, n)
    return out

r"""Fused log-densities for the evaluation engine: the numbers ``Distribution.log_prob`` gives, in fewer, faster passes.

Importance sampling with K particles over N images of D pixels scores a [K, N, D] tensor of
logits at the observed site. Torch's ``Bernoulli.log_prob`` computes
``-binary_cross_entropy_with_logits(logits, x)``, which on the CPU runs a slow scalar
``log1p`` per element and several full-size temporaries; it took about 3 of the 5 seconds of
``log_evidence`` at K = 1000 over 200 MNIST images (issue 19).

For an observed Bernoulli site (optionally inside ``Independent``/``to_event``), with values
x in {0, 1} (checked before: :func:`ppl_vae.inspection.check_observed_support`) and logits l,

.. math::

    \log p(x \mid l) = x l - \mathrm{softplus}(l) = \log\sigma\big((2x - 1)\,l\big)
                     = \min\big((2x - 1)\,l,\ 0\big) + \log\sigma(|l|),

two terms that are never positive (so no cancellation), each from vectorized kernels
(``abs``, ``sigmoid``, ``log``, ``mul``, ``clamp``) in one scratch tensor, summed over the
event dims as ``Independent.log_prob`` does. The only approximation is
log σ(|l|) = -log(1 + e^{-|l|}) computed as the log of the rounded σ(|l|) instead of with
``log1p``: at most half a unit in the last place of 1 per element (2^-25 in float32), so at
most about 784 · 3e-8 = 2.3e-5 nats per MNIST image, below the float32 rounding of the sum
over the pixels that both paths share. In float64 it is at the 1e-16 level.

The fused path is taken only where its conditions hold, each checked on every call
(:func:`unfused_reason`): the site is observed and its values passed the support check; the
distribution is torch's (or Pyro's) ``Bernoulli``, possibly in ``Independent`` layers, with no
subclass overriding ``log_prob``; float32 or float64 logits, the values of the same dtype;
tensors on the CPU (on a GPU torch's binary cross-entropy is already one fused kernel, and
this path has not been measured there); no gradient needed. Anywhere else the site's own
``log_prob`` runs, and :func:`describe` says why (the evaluation records it, see
``ProgramStructure.log_density``): a fallback, never an error. :func:`fusion` turns the path
off, e.g. to compare it with the plain one (tests/test_fused.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.distributions import Bernoulli, Independent

FUSED_BERNOULLI = "fused Bernoulli log-density"
_ENABLED = [True]


@contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Turn the fused log-densities on or off inside the block (on by default)."""
    previous = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = previous


def _unwrap(fn) -> tuple[object, int, str | None]:
    """The distribution inside any ``Independent`` layers, the event dims they add, and why it cannot be fused."""
    event_dims = 0
    while isinstance(fn, Independent):
        if type(fn).log_prob is not Independent.log_prob:
            return fn, event_dims, f"{type(fn).__name__} overrides log_prob"
        event_dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if not isinstance(fn, Bernoulli):
        return fn, event_dims, f"no fused log-density for {type(fn).__name__}"
    if type(fn).log_prob is not Bernoulli.log_prob:
        return fn, event_dims, f"{type(fn).__name__} overrides log_prob"
    return fn, event_dims, None


def unfused_reason(fn, value: torch.Tensor, check_grad: bool = True) -> str | None:
    """None where :func:`fused_log_prob` applies to ``fn`` at the (support-checked, observed) ``value``; else why not."""
    if not _ENABLED[0]:
        return "fused log-densities turned off"
    base, _, reason = _unwrap(fn)
    if reason:
        return reason
    logits = base.logits
    if logits.dtype not in (torch.float32, torch.float64) or value.dtype != logits.dtype:
        return f"logits of dtype {logits.dtype} and values of dtype {value.dtype} (fused: float32 or float64, both alike)"
    if logits.device.type != "cpu" or value.device.type != "cpu":
        return f"tensors on {logits.device.type} (fused on the CPU only; elsewhere torch's own kernel)"
    if check_grad and torch.is_grad_enabled() and (logits.requires_grad or value.requires_grad):
        return "gradients needed"
    return None


def describe(fn, value: torch.Tensor) -> str:
    """How an observed site's log-density is computed: the fused path, or its own log_prob and why."""
    reason = unfused_reason(fn, value, check_grad=False)
    return FUSED_BERNOULLI if reason is None else f"log_prob ({reason})"


def fused_log_prob(fn, value: torch.Tensor) -> torch.Tensor | None:
    """``fn.log_prob(value)`` for an observed site whose values passed the support check, or None where not fused."""
    if unfused_reason(fn, value) is not None:
        return None
    base, event_dims, _ = _unwrap(fn)
    return bernoulli_log_prob(base.logits, value, event_dims)


# Elements per block of the fused computation: its scratch tensor (1 MiB in float32) stays in the CPU's
# cache across the passes, instead of each pass streaming a chunk's whole [k, n, D] tensor through memory.
BLOCK_ELEMENTS = 2**18


def bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor, event_dims: int = 0) -> torch.Tensor:
    """log Bernoulli(value; sigmoid(logits)) for values in {0, 1}, summed over the rightmost ``event_dims`` dims.

    The values where this is called have passed the support check; elsewhere (masked-out
    entries, dropped afterwards) the result is not a log-density. Computed in blocks along the
    leading dim of the broadcast shape, with one scratch tensor reused across blocks.
    """
    shape = torch.broadcast_shapes(logits.shape, value.shape)
    batch_dims = len(shape) - event_dims
    logits = logits.expand(shape)
    sign = 2 * value.reshape((1,) * (len(shape) - value.dim()) + tuple(value.shape)) - 1
    dims = tuple(range(batch_dims, len(shape)))
    if not shape or batch_dims == 0:  # no leading batch dim to block along
        return _bernoulli_block(logits, sign, dims, torch.empty(shape, dtype=logits.dtype, device=logits.device))
    rows = max(1, BLOCK_ELEMENTS // max(1, shape[1:].numel()))
    scratch = torch.empty((min(rows, shape[0]), *shape[1:]), dtype=logits.dtype, device=logits.device)
    result = torch.empty(shape[:batch_dims], dtype=logits.dtype, device=logits.device)
    for start in range(0, shape[0], rows):
        block = slice(start, min(start + rows, shape[0]))
        block_sign = sign if sign.shape[0] == 1 else sign[block]
        result[block] = _bernoulli_block(logits[block], block_sign, dims, scratch[: block.stop - block.start])
    return result


def bernoulli_log_prob_and_grad(logits: torch.Tensor, value: torch.Tensor, event_dims: int = 0,
                                grad_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`bernoulli_log_prob` and its gradient in the logits at the broadcast shape, x - σ(l), in one pass.

    For HMC, which needs both at every leapfrog step. σ(l) is computed once per element (torch's ``sigmoid``, the
    expensive pass) and serves both: the gradient is x - σ(l), and log σ(|l|) = log max(σ(l), 1 - σ(l))
    (exact for l >= 0; for l < 0 the rounding of 1 - σ(l) is at most half a unit in the last place of a number
    in [1/2, 1], the same size as :func:`bernoulli_log_prob`'s own approximation).
    The gradient has the broadcast shape (written into ``grad_out`` when it is given and of that shape and dtype:
    a caller that scores the same shapes repeatedly saves allocating, and first touching, a fresh tensor each
    time); summing it to the logits' shape is the caller's.
    """
    shape = torch.broadcast_shapes(logits.shape, value.shape)
    batch_dims = len(shape) - event_dims
    sign = (2 * value - 1).expand(shape)  # once, on the values' own (unbroadcast) shape
    logits, value = logits.expand(shape), value.expand(shape)
    reusable = (grad_out is not None and grad_out.shape == shape and grad_out.dtype == logits.dtype
                and grad_out.device == logits.device and grad_out.is_contiguous())
    grad = grad_out if reusable else torch.empty(shape, dtype=logits.dtype, device=logits.device)
    dims = tuple(range(batch_dims, len(shape)))
    if not shape or batch_dims == 0:  # no leading batch dim to block along
        return _bernoulli_grad_block(logits, value, sign, dims, grad, torch.empty_like(grad)), grad
    rows = max(1, BLOCK_ELEMENTS // max(1, shape[1:].numel()))
    scratch = torch.empty((min(rows, shape[0]), *shape[1:]), dtype=logits.dtype, device=logits.device)
    result = torch.empty(shape[:batch_dims], dtype=logits.dtype, device=logits.device)
    for start in range(0, shape[0], rows):
        block = slice(start, min(start + rows, shape[0]))
        result[block] = _bernoulli_grad_block(logits[block], value[block], sign[block], dims, grad[block],
                                              scratch[: block.stop - block.start])
    return result, grad


def _bernoulli_grad_block(logits: torch.Tensor, value: torch.Tensor, sign: torch.Tensor, dims: tuple[int, ...],
                          grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`_bernoulli_block`'s sum, writing x - σ(l) into ``grad``; ``out`` is scratch (both of the block's shape)."""
    torch.sigmoid(logits, out=grad)
    torch.sub(grad.new_ones(()), grad, out=out)
    torch.maximum(out, grad, out=out).log_()  # log sigmoid(|l|) = log max(σ(l), 1 - σ(l)), in [-log 2, 0]
    log_sigmoid_abs = out.sum(dims) if dims else out.clone()
    torch.mul(logits, sign, out=out)
    out.clamp_(max=0)  # min((2x - 1) l, 0)
    torch.sub(value, grad, out=grad)  # x - σ(l)
    return log_sigmoid_abs.add_(out.sum(dims) if dims else out)


def _bernoulli_block(logits: torch.Tensor, sign: torch.Tensor, dims: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
    """sum over ``dims`` of min(sign * l, 0) + log sigmoid(|l|), with ``out`` (of the block's shape) as scratch."""
    torch.abs(logits, out=out)
    out.sigmoid_().log_()  # log sigmoid(|l|) = -log(1 + exp(-|l|)), in [-log 2, 0]
    log_sigmoid_abs = out.sum(dims) if dims else out.clone()
    torch.mul(logits, sign, out=out)
    out.clamp_(max=0)  # min((2x - 1) l, 0)
    return log_sigmoid_abs.add_(out.sum(dims) if dims else out)

"""Training steps: one "check, then apply" step per optimizer kind, the steps of an epoch, and numerical faults.

A step computes the loss and the gradients, then the global gradient norm (clipped to ``clip_norm`` when
given), and applies the optimizer only when both are finite; otherwise the gradients are zeroed and
:class:`~ppl_vae.errors.NumericalFaultError` is raised with the parameters and optimizer state untouched
(:func:`checked_svi_step` for Pyro's ``SVI``, :func:`checked_module_step` for a loss that is a torch module,
also under DistributedDataParallel). :func:`run_epoch` runs an engine's step over the minibatches of one epoch
and turns faults, Ctrl-C and the program's own exceptions into one-line errors naming the last good state.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads

from ..errors import NumericalFaultError, PplVaeError, TrainingInterrupted
from ..evaluate import DEVICE_ERRORS


def as_tuple(batch: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    """A minibatch as the programs' positional data: (x,) or (x, y)."""
    return batch if isinstance(batch, tuple) else (batch,)


def fault_message(what: str, last_good: str) -> str:
    """The message of a numerical fault: what happened, likely causes, and where the last good state is."""
    return (
        f"{what}: training diverged and was stopped before that update was applied. Likely causes: a learning "
        "rate too high (try a smaller --lr), exploding gradients (try --clip-norm, e.g. 100), data outside the "
        "likelihood's support, or an encoder or decoder scale collapsing to 0 or overflowing. "
        f"The last good state is kept: {last_good}. Resuming would repeat the same steps, so start a new run (or "
        "--overwrite) with changed settings."
    )


def run_epoch(
    batches: Iterable[torch.Tensor],
    step: Callable[[torch.Tensor], float],
    stop_requested: Callable[[], bool],
    num_steps: int,
    epoch: int,
    epochs: int,
    progress: bool,
    last_good: str,
    counts: Callable[[torch.Tensor | tuple], float] | None = None,
) -> tuple[float, int]:
    """Run ``step`` (returning the loss, nats summed over the minibatch) on every minibatch of one epoch.

    Returns the mean training objective (nats/image, the negative mean loss) and the
    number of steps. Raises :class:`TrainingInterrupted` before a step when
    ``stop_requested()``, and re-raises a step's :class:`NumericalFaultError` naming the
    step; both messages name ``last_good``, where the last good state is (a checkpoint).
    Every engine and strategy runs its epochs through it. ``counts(batch)``: how many images a batch counts for
    in that mean (default: its rows; semi-supervised training counts a labelled batch at its weight).
    """
    from tqdm.auto import tqdm

    total_loss, seen = 0.0, 0
    bar = tqdm(batches, total=num_steps, desc=f"epoch {epoch}/{epochs}", unit="step", disable=not progress, leave=False)
    try:
        for step_number, batch in enumerate(bar, start=1):
            where = f"epoch {epoch}, step {step_number} of {num_steps}"
            if stop_requested():
                raise TrainingInterrupted(
                    f"interrupted by Ctrl-C at {where}; --resume continues from {last_good}, running epoch {epoch} again "
                    "from its start"
                )
            try:
                loss = step(batch)
            except NumericalFaultError as fault:
                raise NumericalFaultError(fault_message(f"{fault} at {where}", last_good)) from None
            except (PplVaeError, *DEVICE_ERRORS):
                raise
            except Exception as error:
                fault = program_step_error(error, where, last_good)
                if fault is None:  # not the program's: the package's bug keeps its traceback
                    raise
                raise fault from error
            total_loss += loss
            seen += counts(batch) if counts is not None else as_tuple(batch)[0].shape[0]
            if step_number % 10 == 0 or step_number == num_steps:
                bar.set_postfix_str(f"ELBO {-total_loss / seen:.2f} nats/image")
    finally:
        bar.close()
    return -total_loss / seen, num_steps


def program_step_error(error: Exception, where: str, last_good: str) -> PplVaeError | None:
    """A training step's exception as one line when it came from the user's program (its traceback passes through
    the user's code, e.g. a raise in its model); None for anything else."""
    from ..user_code import describe_user_error

    described = describe_user_error(error)
    if described is None:
        return None
    return PplVaeError(f"the program raised {described} at {where}; the last good state is kept: {last_good}")


def checked_svi_step(svi: SVI, batch: torch.Tensor | tuple, clip_norm: float | None = None) -> float:
    """``svi.step(batch)`` that never applies a non-finite update; returns the loss.

    Pyro's ``SVI.step`` (loss and gradients, then the optimizer on every parameter
    seen, then zeroed gradients) with one addition between gradients and update:
    the global norm of all gradients is computed, and clipped to ``clip_norm`` when
    given (``torch.nn.utils.clip_grad_norm_``). If the loss or that norm is NaN or
    infinite, the gradients are zeroed and :class:`NumericalFaultError` is raised,
    with the parameters and the optimizer state untouched. The check costs one
    small reduction per parameter tensor and one device synchronization, so it runs
    every step. Pyro's own ``clip_args`` were not used: they clip each parameter
    tensor separately, not the global norm, and return no norm to check.
    """
    with poutine.trace(param_only=True) as capture, _faults_as_errors():
        loss = float(svi.loss_and_grads(svi.model, svi.guide, *as_tuple(batch)))
    # Trace order, not a set: the global norm then sums the same way in every process.
    params = list(dict.fromkeys(site["value"].unconstrained() for site in capture.trace.nodes.values()))
    grad_norm = _global_grad_norm(params, clip_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        bad = _non_finite_gradients(params)
        zero_grads(params)
        _raise_fault(loss, grad_norm, bad)
    svi.optim(params)
    zero_grads(params)
    return loss


def checked_module_step(
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    clip_norm: float | None = None,
    *,
    loss_scale: float = 1.0,
    total_loss: Callable[[torch.Tensor], float] | None = None,
    params: list[torch.Tensor] | None = None,
) -> float:
    """:func:`checked_svi_step` for a loss that is a torch module, with a torch optimizer; returns the loss.

    Back-propagates ``loss_scale * loss_module(batch)`` (the module returns the loss in
    nats summed over the batch), computes the global gradient norm (clipped to
    ``clip_norm`` when given) and applies ``optimizer`` only when the loss and that norm
    are finite; otherwise the gradients are zeroed and :class:`NumericalFaultError` is
    raised with the parameters and the optimizer state untouched. ``total_loss`` maps the
    detached loss to the number that is checked and returned (default: its value);
    distributed training passes an all-reduce over the processes there
    (:func:`ppl_vae.training.engines.checked_ddp_step`). ``params``: the module's trainable parameters, when the
    caller keeps the list (found on every call otherwise).
    """
    if params is None:
        params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    with _faults_as_errors():
        local_loss = loss_module(*as_tuple(batch))
    (local_loss * loss_scale).backward()
    detached = local_loss.detach()
    loss = total_loss(detached) if total_loss is not None else float(detached)
    grad_norm = _global_grad_norm(params, clip_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        bad = _non_finite_module_gradients(loss_module)
        optimizer.zero_grad(set_to_none=True)
        _raise_fault(loss, grad_norm, bad)
    optimizer.step()
    return loss


@contextlib.contextmanager
def _faults_as_errors() -> Iterator[None]:
    """Turn a distribution's refusal of NaN parameters (with Pyro's validation on) into a NumericalFaultError."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN")  # Pyro's warning; the error raised later says more
        try:
            yield
        except ValueError as error:
            if "invalid values" not in str(error):
                raise
            first_line = str(error).strip().splitlines()[0]
            raise NumericalFaultError(f"a distribution got NaN or infinite parameters ({first_line})") from None


def _raise_fault(loss: float, grad_norm: float, bad: list[str]) -> None:
    if not math.isfinite(loss):
        raise NumericalFaultError(f"the loss became {loss}")
    if bad:
        raise NumericalFaultError(f"the gradient became {grad_norm} (non-finite gradients of {', '.join(bad)})")
    raise NumericalFaultError(f"the gradient norm overflowed to {grad_norm} (gradients too large to square)")


def _global_grad_norm(params: list[torch.Tensor], clip_norm: float | None) -> float:
    """The 2-norm of all gradients together, before clipping them to ``clip_norm`` (when given)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if clip_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
    return float(torch.nn.utils.get_total_norm(grads))  # the foreach kernels clip_grad_norm_ uses


def _non_finite_gradients(params: list[torch.Tensor], limit: int = 3) -> list[str]:
    """The Pyro names of (at most ``limit``) parameters whose gradient holds a NaN or infinity."""
    store = pyro.get_param_store()
    names = [(store.param_name(p) or "?").removeprefix("program$$$")
             for p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    return _first_names(names, limit)


def _non_finite_module_gradients(module: torch.nn.Module, limit: int = 3) -> list[str]:
    """The names (in the VAE) of at most ``limit`` parameters of ``module`` whose gradient holds a NaN or infinity."""
    names = [
        name.removeprefix("module.").removeprefix("vae.").removeprefix("program.")
        for name, p in module.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    return _first_names(names, limit)


def _first_names(names: list[str], limit: int) -> list[str]:
    return names[:limit] + ([f"{len(names) - limit} more"] if len(names) > limit else [])

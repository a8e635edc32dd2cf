"""Train and eval mode of a program's networks: every evaluation in eval mode, every training step in train mode.

A program's networks may behave differently while training: ``nn.Dropout`` zeroes units at
random only in train mode, ``nn.BatchNorm`` normalizes by the batch's statistics and updates
its running statistics only in train mode. An evaluation (validation, the test evaluation,
``ppl-vae evaluate``, diagnostics, figures) must see the network the run delivers: eval mode,
no running statistic moved by the evaluated images, and no autograd graph kept.

:func:`evaluation_mode` does that for the modules behind a model and a guide (bound methods of
an ``nn.Module``, as every program has, or the module itself), and puts every module back in
the mode it was in afterwards; the evaluation functions enter it themselves
(:func:`ppl_vae.inspection.inspect_program`, :func:`ppl_vae.chunking.iter_chunk_terms`,
:func:`evaluates` on the diagnostics and figures), so every caller gets it. Plain functions
(no module behind them) get ``torch.no_grad`` alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


def modules_of(*targets: Any) -> list[nn.Module]:
    """The distinct ``nn.Module`` objects behind ``targets``: a module itself, or the one a bound method belongs to.

    Anything else (a plain function, a tensor, None) contributes nothing.
    """
    found: dict[int, nn.Module] = {}
    for target in targets:
        owner = target if isinstance(target, nn.Module) else getattr(target, "__self__", None)
        if isinstance(owner, nn.Module):
            found.setdefault(id(owner), owner)
    return list(found.values())


@contextlib.contextmanager
def evaluation_mode(*targets: Any) -> Iterator[None]:
    """Run the block with the modules behind ``targets`` in eval mode and under ``torch.no_grad``.

    Every submodule's own ``training`` flag is recorded before and restored after (also when the
    block raises), so a submodule the user keeps in eval mode during training (a frozen BatchNorm)
    stays so, and a module evaluated during training goes back to train mode. Nesting is harmless.
    """
    modules = modules_of(*targets)
    previous = [(module, module.training) for top in modules for module in top.modules()]
    try:
        for top in modules:
            top.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in previous:
            module.training = training


def evaluates(function: F) -> F:
    """Decorate ``function(model, guide, ...)`` or ``function(module, ...)`` to run in :func:`evaluation_mode`.

    The modules are those behind its first two positional arguments (the program's model and guide,
    or a module and its data: a tensor contributes nothing).
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with evaluation_mode(*args[:2]):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def running_statistics_problem(module: nn.Module) -> str | None:
    """Why a loss compiled by ``torch.jit.trace`` would keep ``module``'s running statistics wrong (None if not).

    The compiled loss replays the in-place updates of BatchNorm's running mean and variance, but not the
    count ``num_batches_tracked`` (a Python-side increment the trace records as a constant). With the default
    momentum the count is unused; with ``momentum=None`` the running statistics are a cumulative average with
    factor 1 / num_batches_tracked, which the trace freezes at the value of its first batch: the running
    statistics that every evaluation (eval mode) normalizes with would be silently wrong.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats and sub.momentum is None:
            return (f"{name.removeprefix('program.') or 'the program'} ({type(sub).__name__}) has momentum=None: its "
                    "running statistics average over num_batches_tracked, which the compiled loss does not count")
    return None

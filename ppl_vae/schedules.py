r"""What changes from epoch to epoch of training, as pure functions: learning rate, KL weight, early stopping.

Nothing here holds torch state. Epochs are 1-based. A schedule that depends on what training measured (``plateau``,
early stopping) is a pure update ``state -> state`` of a small dict of plain numbers, which a checkpoint holds as it
is (``json``/``torch.save``): a resumed run continues from the same state, so it lowers the rate and stops at the
same epochs as an uninterrupted one.

The loop, per epoch ``e``:

1. ``lr = learning_rate(schedule, e, ..., plateau=plateau_state)`` and ``beta = kl_weight(e, ...)`` before the first
   step of the epoch (both logged in the epoch's record);
2. after validation, with the monitored value ``v = monitored_value(record, monitor)`` (higher is better: the
   validation ELBO or log p̂(x) in nats; ``None`` on an epoch where it was not measured):
   ``plateau_state = plateau_update(plateau_state, v, ...)`` and
   ``stopping = early_stopping_update(stopping, e, v, ...)``; ``stopping["improved"]``: write
   ``checkpoint.best.pt``; ``stopping["stop"]``: end training after this epoch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from .errors import PplVaeError

LR_SCHEDULES = ("constant", "step", "cosine", "burda", "plateau")
# What early stopping and the plateau schedule watch (higher is better), by the key of the epoch's record: the
# validation ELBO (every epoch) or the validation log p̂(x) of --evidence-every (only on the epochs it is computed).
MONITORS = {"elbo": "val_elbo", "evidence": "val_log_px"}
# Burda et al. (2016), section 5: 3**i passes over the data at learning rate 1e-3 * 10**(-i/7), i = 0..7.
BURDA_STAGES = 8


def monitored_value(record: dict, monitor: str = "elbo") -> float | None:
    """The value of ``monitor`` (a key of :data:`MONITORS`) in an epoch's record; None where it was not measured."""
    if monitor not in MONITORS:
        raise PplVaeError(f"unknown monitored quantity {monitor!r}: choose one of {', '.join(MONITORS)}")
    value = record.get(MONITORS[monitor])
    return None if value is None else float(value)


def check_lr_schedule(name: str, *, factor: float = 0.1, patience: int = 10, min_delta: float = 0.0) -> None:
    """Refuse an unknown schedule name or plateau settings that cannot work (one line)."""
    if name not in LR_SCHEDULES:
        raise PplVaeError(f"unknown lr schedule {name!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if not 0 < factor < 1:
        raise PplVaeError(f"the plateau factor multiplies the learning rate and must be between 0 and 1, got {factor}")
    if patience < 0 or min_delta < 0:
        raise PplVaeError(f"patience and min-delta must be >= 0, got {patience} and {min_delta}")


def burda_stage(epoch: int) -> int:
    """The stage i of Burda's schedule that ``epoch`` is in: stage i is epochs (3**i + 1) / 2 .. (3**(i+1) - 1) / 2.

    Past the eight stages of the paper (3,280 epochs) the pattern continues (stage 8 from epoch 3,281).
    """
    stage = 0
    while epoch > (3 ** (stage + 1) - 1) // 2:
        stage += 1
    return stage


def learning_rate(
    schedule: str, epoch: int, base: float, epochs: int, *, milestones: Sequence[int] = (), gamma: float = 0.1,
    final: float = 1e-4, plateau: dict | None = None,
) -> float:
    """The learning rate of ``epoch`` (1-based) under ``schedule``, ``base`` the first epoch's rate.

    * ``constant``: ``base``.
    * ``step``: ``base * gamma**m``, m the number of ``milestones`` before ``epoch`` (a milestone is the epoch after
      which the rate is multiplied), as ``torch.optim.lr_scheduler.MultiStepLR`` stepped once per epoch.
    * ``cosine``: ``final + (base - final) (1 + cos(pi (epoch - 1) / epochs)) / 2``, from ``base`` at epoch 1 toward
      ``final``, as ``CosineAnnealingLR(T_max=epochs, eta_min=final)`` stepped once per epoch.
    * ``burda``: ``base * 10**(-i / 7)`` in stage i = :func:`burda_stage` (3**i epochs); with ``base`` 1e-3 and
      3,280 epochs it is the schedule of Burda et al. (2016).
    * ``plateau``: the rate the state of :func:`plateau_update` holds (``base`` before any update).
    """
    if schedule == "constant":
        return base
    if schedule == "step":
        return base * gamma ** bisect.bisect_right(sorted(milestones), epoch - 1)
    if schedule == "cosine":
        return final + (base - final) * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2
    if schedule == "burda":
        return base * 10 ** (-burda_stage(epoch) / 7)
    if schedule == "plateau":
        return base if plateau is None else plateau["lr"]
    raise PplVaeError(f"unknown lr schedule {schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")


def plateau_start(base: float) -> dict:
    """The state of the ``plateau`` schedule before the first epoch: rate ``base``, nothing measured yet."""
    return {"lr": base, "best": None, "bad_epochs": 0, "reductions": 0}


def plateau_update(
    state: dict, value: float | None, *, factor: float = 0.1, patience: int = 10, min_delta: float = 0.0,
    min_lr: float = 0.0,
) -> dict:
    """The ``plateau`` state after an epoch whose monitored value (higher is better) is ``value``.

    A value above ``best + min_delta`` is an improvement; after more than ``patience`` measured epochs in a row without
    one, the rate is multiplied by ``factor`` (not below ``min_lr``) and the count restarts: the rule of
    ``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="max", threshold_mode="abs", threshold=min_delta)``. ``None``
    (not measured this epoch) changes nothing; a non-finite value is no improvement.
    """
    if value is None:
        return dict(state)
    new = dict(state)
    if math.isfinite(value) and (state["best"] is None or value > state["best"] + min_delta):
        new["best"], new["bad_epochs"] = value, 0
    else:
        new["bad_epochs"] = state["bad_epochs"] + 1
    if new["bad_epochs"] > patience:
        new["lr"] = max(state["lr"] * factor, min_lr)
        new["bad_epochs"] = 0
        new["reductions"] = state["reductions"] + 1
    return new


def kl_weight(epoch: int, beta: float = 1.0, warmup_epochs: int = 0, warmup_start: float = 0.01) -> float:
    """The KL weight of ``epoch`` (1-based): linear from ``warmup_start`` (epoch 1) to ``beta`` (epoch
    ``warmup_epochs + 1``), then ``beta``. Epochs 1..warmup_epochs are the warm-up."""
    if warmup_epochs == 0:
        return beta
    progress = min(1.0, (epoch - 1) / warmup_epochs)
    return warmup_start + (beta - warmup_start) * progress


def early_stopping_start() -> dict:
    """The early-stopping state before the first epoch."""
    return {"best": None, "best_epoch": None, "bad_epochs": 0, "improved": False, "stop": False}


def early_stopping_update(
    state: dict, epoch: int, value: float | None, *, patience: int | None, min_delta: float = 0.0,
    warmup_epochs: int = 0,
) -> dict:
    """The early-stopping state after ``epoch``, whose monitored value (higher is better) is ``value``.

    ``improved``: ``value`` beats the best so far by more than ``min_delta`` (the first measured value always does);
    the epoch becomes ``best_epoch`` (write the best checkpoint). Warm-up epochs can be the best (the monitored bound
    is the unweighted one), but patience counts from the end of the warm-up: ``bad_epochs`` is the number of epochs
    since ``max(best_epoch, warmup_epochs)``, and ``stop`` is ``bad_epochs >= patience`` (never with ``patience``
    None: the best epoch is still tracked). ``None`` (not measured this epoch, e.g. between ``--evidence-every``
    epochs) improves nothing, and the epoch still counts. A non-finite value is no improvement.
    """
    new = dict(state)
    best = state["best"]
    improved = value is not None and math.isfinite(value) and (best is None or value > best + min_delta)
    if improved:
        new["best"], new["best_epoch"] = value, epoch
    since = max(new["best_epoch"] or 0, warmup_epochs)
    new["bad_epochs"] = max(0, epoch - since)
    new["improved"] = improved
    new["stop"] = patience is not None and new["bad_epochs"] >= patience
    return new

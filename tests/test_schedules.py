"""ppl_vae.schedules: learning rates, KL weight and early stopping as pure functions of the epoch (and of state)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppl_vae import schedules
from ppl_vae.errors import PplVaeError
from ppl_vae.train import TrainConfig, kl_weight as train_kl_weight, learning_rate_at


@pytest.mark.parametrize("options", [
    dict(lr_schedule="constant"),
    dict(lr_schedule="step", lr_milestones=(2, 5, 5), lr_gamma=0.3),
    dict(lr_schedule="cosine", lr_final=1e-5),
])
def test_existing_schedules_keep_the_values_of_torchs_schedulers(options):
    """learning_rate_at (the trainer's one rule) gives the rates the trainer's torch schedulers gave, stepped once
    per epoch, for the schedule names it had before schedules.learning_rate replaced them."""
    config = TrainConfig(epochs=9, learning_rate=2e-3, **options)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.lr_final)
    else:
        milestones = list(config.lr_milestones) if config.lr_schedule == "step" else []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.lr_gamma)
    for epoch in range(1, config.epochs + 1):
        assert learning_rate_at(config, epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()  # (no gradients: no update) the order torch expects before the scheduler's step
        scheduler.step()


def test_burda_schedule_is_3_to_the_i_epochs_at_1e_3_times_10_to_the_minus_i_over_7():
    rates = [schedules.learning_rate("burda", epoch, 1e-3, 3280) for epoch in range(1, 3281)]
    stages = sorted(set(rates), reverse=True)
    assert len(stages) == schedules.BURDA_STAGES
    for i, rate in enumerate(stages):
        assert rate == pytest.approx(1e-3 * 10 ** (-i / 7))
        assert rates.count(rate) == 3 ** i
    assert rates[-1] == pytest.approx(1e-4)
    assert [schedules.burda_stage(e) for e in (1, 2, 4, 5, 13, 14, 3280, 3281)] == [0, 1, 1, 2, 2, 3, 7, 8]


def test_plateau_follows_torch_reduce_on_plateau_and_resumes_from_its_state():
    values = [1.0, 2.0, 2.05, 2.0, 1.9, 3.0, 3.0, 2.9, 2.95, 2.8, 2.7, 2.6, 2.6, 2.7, 2.5, 2.4, 2.3, 2.2]
    options = dict(factor=0.5, patience=2, min_delta=0.1, min_lr=2e-4)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=2, threshold=0.1, threshold_mode="abs", min_lr=2e-4)
    state, rates = schedules.plateau_start(1e-3), []
    for epoch, value in enumerate(values, start=1):
        assert schedules.learning_rate("plateau", epoch, 1e-3, len(values), plateau=state) == \
            pytest.approx(optimizer.param_groups[0]["lr"])
        rates.append(state["lr"])
        reference.step(value)
        state = schedules.plateau_update(state, value, **options)
        if epoch == 9:  # a checkpoint holds the state as plain data; a resumed run continues from it
            state = json.loads(json.dumps(state))
    assert len(set(rates)) > 2 and min(rates) == pytest.approx(2e-4)  # it did reduce, down to min_lr
    assert schedules.plateau_update(state, None, **options) == state


def test_kl_weight_is_the_trainers():
    for beta, warmup, start in ((1.0, 0, 0.01), (1.0, 4, 0.01), (0.5, 3, 0.1), (4.0, 10, 0.2)):
        config = TrainConfig(beta=beta, warmup_epochs=warmup, warmup_start=start)
        for epoch in range(1, 15):
            assert schedules.kl_weight(epoch, beta, warmup, start) == train_kl_weight(config, epoch)
    assert schedules.kl_weight(5, 2.0, 4, 0.5) == 2.0 and schedules.kl_weight(4, 2.0, 4, 0.5) < 2.0


def run_stopping(values, resume_at=None, **options):
    state, best_epochs = schedules.early_stopping_start(), []
    for epoch, value in enumerate(values, start=1):
        state = schedules.early_stopping_update(state, epoch, value, **options)
        if state["improved"]:
            best_epochs.append(epoch)
        if epoch == resume_at:
            state = json.loads(json.dumps(state))
        if state["stop"]:
            return epoch, state["best_epoch"], best_epochs
    return None, state["best_epoch"], best_epochs


def test_early_stopping_counts_patience_from_the_end_of_warm_up():
    values = [-100, -90, -95, -96, -97, -98, -89.95, -99, -99, -99]
    # No warm-up: epoch 2 is the best (-89.95 is within min_delta), patience 3 runs out at epoch 5.
    assert run_stopping(values, patience=3, min_delta=0.1) == (5, 2, [1, 2])
    # Warm-up of 4 epochs: the best is still epoch 2, but patience counts from epoch 4: stop at 7.
    assert run_stopping(values, patience=3, min_delta=0.1, warmup_epochs=4) == (7, 2, [1, 2])
    # Without min_delta, epoch 7 improves, and the count restarts there.
    assert run_stopping(values, patience=3, warmup_epochs=4) == (10, 7, [1, 2, 7])
    assert run_stopping(values, patience=None) == (None, 7, [1, 2, 7])


def test_early_stopping_resumes_to_the_same_epoch_and_best_and_skips_unmeasured_epochs():
    values = [-100, None, -90, None, -91, None, -92, None, -93, None]
    whole = run_stopping(values, patience=4)
    assert whole == (7, 3, [1, 3])
    for resume_at in range(1, 7):
        assert run_stopping(values, resume_at=resume_at, patience=4) == whole
    assert run_stopping([math.nan, -5.0, math.inf], patience=5) == (None, 2, [2])


def test_bad_settings_are_refused_in_one_line():
    schedules.check_lr_schedule("burda")
    for name, options, words in (("linear", {}, "unknown lr schedule"), ("plateau", {"factor": 1.5}, "between 0 and 1"),
                                 ("plateau", {"patience": -1}, ">= 0")):
        with pytest.raises(PplVaeError, match=words):
            schedules.check_lr_schedule(name, **options)


def test_the_monitored_value_is_read_from_the_epochs_record():
    record = {"epoch": 4, "val_elbo": -95.5, "val_log_px": -90.25}
    assert schedules.monitored_value(record) == -95.5
    assert schedules.monitored_value(record, "evidence") == -90.25
    assert schedules.monitored_value({"epoch": 3, "val_elbo": -96.0}, "evidence") is None  # not an --evidence-every epoch
    with pytest.raises(PplVaeError, match="unknown monitored quantity 'loss'"):
        schedules.monitored_value(record, "loss")

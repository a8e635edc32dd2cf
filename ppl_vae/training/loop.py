"""The training loop, top to bottom: set up (:mod:`ppl_vae.training.setup`), then per epoch train, validate,
record and save, then the test evaluation. The same loop for any program, either engine, one process or several
(:mod:`ppl_vae.training.strategy`), a run directory (:func:`train`) or a program in memory (:func:`fit`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..blocked_evaluation import evaluate_per_datapoint
from ..data import ImageData
from ..errors import PplVaeError, TrainingInterrupted
from ..evaluate import evaluation_summary
from ..model import VAEConfig
from ..process_group import current, derive_seed
from ..programs import ProgramSpec
from ..inspection import name_data_arguments
from .checks import conditioning, conditioning_names, levels_of
from .config import TrainConfig, describe_objective, kl_weight, learning_rate_at
from .interrupts import StopRequest
from .monitoring import best_state, keep_best_in_memory, stopped_line, watch
from .tracking import close_trackers, log_to_trackers, start_trackers
from .records import epoch_record, print_epoch, validation_evidence
from .setup import (
    TrainingRun,
    TrainRequest,
    data_for_run,
    data_in_memory,
    save_checkpoint,
    setup_in_memory,
    setup_run,
)
from ..semisupervised import label_error_summary
from .semi import batch_counts, steps_per_epoch
from .steps import run_epoch
from .strategy import OneProcess, Strategy


def train(
    run_dir: str | Path,
    config: TrainConfig | None = None,
    model_config: VAEConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    program: ProgramSpec | torch.nn.Module | None = None,
    processes: Strategy | None = None,
    trust_program: bool = False,
    data: Any = None,
) -> dict[str, Any]:
    """Train a program into ``run_dir``; returns the final test evaluation.

    ``program``: None for the built-in VAE of ``model_config``; a :class:`~ppl_vae.programs.ProgramSpec` (a
    built-in name, or a user's FILE.py:NAME with keyword arguments, recorded so every command can rebuild it);
    or an ``nn.Module`` with ``model`` and ``guide`` (resuming and evaluating then need the object again).
    ``resume=True`` reads the configuration from the run directory and continues after its last checkpoint;
    the run's copy of its program file is imported only if this user's key signed it (:mod:`ppl_vae.trust`)
    or with ``trust_program=True``. ``processes`` (a :class:`~ppl_vae.training.strategy.Strategy`) runs the
    same loop on several processes (:func:`train_distributed`). ``data``: a dataset name or ``.npz`` path, or
    tensors per split, ``{"train": (x, *cond), "val": ..., "test": ...}`` with the conditioning tensors named
    by ``config.cond`` (checked by :func:`ppl_vae.data.tensor_data`; kept as the run's ``tensors.npz``).
    """
    run_dir = runs.check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    config, given, payload = data_for_run(run_dir, config, data, resume)
    lock = runs.RunLock(run_dir)  # held while training (by rank 0): one writer per run
    trackers, finished = [], False
    try:
        request = TrainRequest(run_dir, lock, config, model_config, resume, overwrite, progress, program, trust_program,
                               given, payload)
        run = setup_run(request, processes or OneProcess())
        run.trackers = trackers = start_trackers(run, resumed=resume)
        train_epochs(run)
        result = test_evaluation(run)
        finished = True
        return result
    finally:
        close_trackers(trackers, finished)  # KILLED on Ctrl-C or a failure: --resume continues the same runs
        lock.release()


def fit(program: torch.nn.Module, data: ImageData | Mapping[str, Any], config: TrainConfig,
        progress: bool = True) -> list[dict[str, Any]]:
    """Train ``program`` on ``data`` (held in memory) through the same loop, without a run directory.

    ``data``: an :class:`~ppl_vae.data.ImageData`, or tensors per split ``{"train": (x, *cond), "val": ...,
    "test": ...}`` with the conditioning tensors named by ``config.cond`` (:func:`ppl_vae.data.tensor_data`).

    The same checks, engine choice, KL weight, checked steps and per-epoch validation as :func:`train`; nothing
    is written and there is no final test evaluation. Returns the epoch records (``metrics.jsonl``'s fields);
    the program is left in eval mode, with the best epoch's weights under ``config.early_stopping``.
    """
    run = setup_in_memory(program, data_in_memory(data, config), config, progress)
    train_epochs(run)
    if run.best_weights is not None:
        run.program.load_state_dict(run.best_weights)
    run.program.eval()
    return run.history


def train_epochs(run: TrainingRun) -> None:
    """Epochs ``start_epoch + 1`` to ``epochs``: train, validate, record and save each; Ctrl-C stops between steps."""
    with StopRequest() as stop:
        for epoch in range(run.start_epoch + 1, run.config.epochs + 1):
            if run.stopping["stop"]:  # stopped early before it was resumed: nothing more to train
                break
            record = train_one_epoch(run, epoch, stop)
            record.update(validate(run, epoch, record))
            watch(run, record)
            end_epoch(run, record)
        if run.stopping["stop"] and run.main and run.progress:
            print(stopped_line(run), flush=True)
        if run.strategy.agree_to_stop(stop.requested):
            raise TrainingInterrupted(
                f"interrupted by Ctrl-C after the last epoch ({run.config.epochs}), which is saved in {run.run_dir}; "
                "the test evaluation was skipped: --resume runs it"
            )


def train_one_epoch(run: TrainingRun, epoch: int, stop: StopRequest) -> dict[str, Any]:
    """One pass of checked steps over the training set at the epoch's KL weight; the schedule then steps."""
    started, config = time.perf_counter(), run.config
    run.trained.kl_weight = kl_weight(config, epoch)
    lr = learning_rate_at(config, epoch, run.plateau)  # the one pure function of the epoch (and plateau state)
    run.engine.set_learning_rate(lr)
    batches = run.strategy.epoch_batches(run.data, config, epoch)
    run.engine.begin_epoch(stop)
    run.program.train()  # training steps in train mode (Dropout on, BatchNorm on batch statistics); evaluations switch
    train_elbo, steps = run_epoch(batches, run.engine.step, run.engine.stop_requested,
                                  steps_per_epoch(run.data, config), epoch, config.epochs,
                                  run.progress and run.main, run.last_good(epoch - 1), counts=batch_counts(config))
    seconds = time.perf_counter() - started
    run.elapsed += seconds
    return {"train_elbo": train_elbo, "steps": steps, "lr": lr, "epoch_seconds": seconds}


def validate(run: TrainingRun, epoch: int, trained: dict[str, Any]) -> dict[str, Any]:
    """The epoch's record: the validation ELBO (checked finite) and, every evidence_every epochs, log p̂(x)."""
    config, program = run.config, run.program
    val = evaluate_per_datapoint(program.model, program.guide, run.data.val, *conditioning(run.data, "val", config),
                                 elbo_samples=config.val_samples, seed=derive_seed(config.seed, "validation", epoch),
                                 ).decomposition
    record = epoch_record(epoch, trained.pop("train_elbo"), val, run.last_good(epoch - 1), lr=trained.pop("lr"),
                          kl_weight=run.trained.kl_weight, epoch_seconds=trained.pop("epoch_seconds"),
                          steps=trained.pop("steps"), train_seconds=run.elapsed,
                          device=run.strategy.describe(run.device))
    record["world_size"] = run.strategy.world_size
    if config.evidence_every and (epoch % config.evidence_every == 0 or epoch == config.epochs):
        record.update(validation_evidence(program, run.data, config, epoch))
    return record


def end_epoch(run: TrainingRun, record: dict[str, Any]) -> None:
    """Rank 0 appends the record to metrics.jsonl and saves the epoch's checkpoint, then prints the epoch's line."""
    run.history.append(record)
    keep_best_in_memory(run)
    if not run.main:
        return
    if run.run_dir is not None:
        runs.append_metrics(run.run_dir, record)
        run.checkpoint_id = save_checkpoint(run, record["epoch"])  # with the schedules' states of this epoch
        if run.config.early_stopping is not None and run.stopping["improved"]:
            runs.keep_as_best(run.run_dir)
        log_to_trackers(run, record)
    if run.progress:
        print_epoch(record, run.config)


def test_evaluation(run: TrainingRun) -> dict[str, Any]:
    """The final evaluation on the test split (ELBO decomposition, log p̂(x) with K = test_samples); rank 0 writes
    it to test.json. The same on any number of processes (:mod:`ppl_vae.blocked_evaluation`)."""
    config, program, data = run.config, run.program, run.data
    checkpoint, epoch, checkpoint_id = best_state(run)  # with --early-stopping: the best epoch's weights
    cond = conditioning(data, "test", config)
    per_datapoint = evaluate_per_datapoint(
        program.model, program.guide, data.test, *cond, num_samples=config.test_samples, elbo_samples=10,
        seed=derive_seed(config.seed, "test"), progress=run.progress and run.main,
    )
    result = name_data_arguments(evaluation_summary(
        program.model, program.guide, data.test, *cond, num_samples=config.test_samples,
        levels=levels_of(program, config.binarize) if data.grey_levels else None, evidence=per_datapoint.evidence,
        decomposition=per_datapoint.decomposition,
    ), conditioning_names(config))  # log p(x | c) for a run given c (labels stay y)
    result.update({
        "split": "test", "epochs": run.trained_epochs, "epoch": epoch, "checkpoint": checkpoint,
        "checkpoint_id": checkpoint_id,
        "train_seconds": run.elapsed, "device": run.strategy.describe(run.device),
        "world_size": run.strategy.world_size, "model": run.description,
        "objective": describe_objective(config, enumerated=run.enumerated),
    })
    if config.labelled is not None:  # the classifier q(y | x) on the test labels
        result.update(label_error_summary(program, data.test, data.labels("test"), config.label_site))
    if run.main:
        runs.record_written(run.run_dir, runs.TEST_FILE)
        runs.write_json(run.run_dir / runs.TEST_FILE, result)
    return result


def train_distributed(
    run_dir: str | Path,
    config: TrainConfig | None = None,
    model_config: VAEConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    program: ProgramSpec | torch.nn.Module | None = None,
    trust_program: bool = False,
    data: Any = None,
) -> dict[str, Any]:
    """:func:`train` on every process of the process group (:func:`ppl_vae.distributed.initialize` first).

    The same loop, run directory, options and guarantees (resume, Ctrl-C, numerical faults,
    damaged checkpoints), with DistributedDataParallel (:class:`~ppl_vae.training.engines.DdpEngine`) instead of
    ``SVI``; see :mod:`ppl_vae.distributed` for the loss scaling and the random streams. The device is the
    process group's, not ``config.device``. ``program``, ``trust_program`` and ``data`` as for :func:`train`, given
    alike on every process (tensors that differ between processes are refused on every one). Returns the final
    test evaluation on every process; rank 0 writes every file.
    """
    context = current()
    if context is None:
        raise PplVaeError("train_distributed needs a process group: call ppl_vae.distributed.initialize() under torchrun")
    return train(run_dir, config, model_config, resume=resume, overwrite=overwrite, progress=progress,
                 program=program, processes=context, trust_program=trust_program, data=data)

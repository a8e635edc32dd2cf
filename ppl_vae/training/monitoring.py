"""What the loop does with the monitored quantity after each epoch's validation: the ``plateau`` learning-rate
schedule and early stopping, as the pure updates of :mod:`ppl_vae.schedules` on states the checkpoint holds
(:func:`watch`); which weights the final test evaluation uses (:func:`best_state`).

The monitored value (``--monitor``: the validation ELBO, or the log p̂(x) of ``--evidence-every``; higher is
better, nats/image) improves when it beats the best so far by more than ``--min-delta``. Early stopping ends
training after ``--early-stopping`` epochs without improvement, counted from the end of the KL warm-up; the best
epoch's checkpoint is kept as ``checkpoint.best.pt`` (:func:`ppl_vae.runs.keep_as_best`).
"""

from __future__ import annotations

from typing import Any

from .. import runs
from ..schedules import MONITORS, early_stopping_update, monitored_value, plateau_update
from .setup import TrainingRun

MONITOR_WORDS = {"elbo": "the validation ELBO", "evidence": "the validation log p̂(x)"}


def watch(run: TrainingRun, record: dict[str, Any]) -> None:
    """Update the plateau and early-stopping states with the epoch's monitored value; note them in ``record``."""
    config, epoch = run.config, record["epoch"]
    value = monitored_value(record, config.monitor)
    if config.lr_schedule == "plateau":
        run.plateau = plateau_update(run.plateau, value, factor=config.plateau_factor,
                                     patience=config.plateau_patience, min_delta=config.min_delta)
    run.stopping = early_stopping_update(run.stopping, epoch, value, patience=config.early_stopping,
                                         min_delta=config.min_delta, warmup_epochs=config.warmup_epochs)
    if config.early_stopping is not None or config.lr_schedule == "plateau":
        record.update({"monitor": MONITORS[config.monitor], "best_epoch": run.stopping["best_epoch"],
                       "epochs_without_improvement": run.stopping["bad_epochs"]})


def stopped_line(run: TrainingRun) -> str:
    """The line printed when early stopping ends a run."""
    config, state = run.config, run.stopping
    return (f"early stopping after epoch {run.trained_epochs}: {MONITOR_WORDS[config.monitor]} did not improve by more "
            f"than {config.min_delta:g} nats/image for {state['bad_epochs']} epochs (--early-stopping "
            f"{config.early_stopping}); the best epoch is {state['best_epoch']} ({state['best']:.2f} nats/image)")


def best_state(run: TrainingRun) -> tuple[str, int, str | None]:
    """Which checkpoint the final test evaluation uses, put into the program: ("best", its epoch, its id) with
    --early-stopping (the best epoch's weights, from checkpoint.best.pt read by rank 0 and shared), else ("last",
    the last epoch trained, the latest checkpoint's id). A run held in memory keeps its last weights."""
    if run.config.early_stopping is None or run.run_dir is None or run.stopping["best_epoch"] is None:
        return "last", run.trained_epochs, run.checkpoint_id

    def read() -> dict[str, Any]:
        best = runs.load_checkpoint(run.run_dir, map_location="cpu", which="best")
        return {key: best.get(key) for key in ("model", "epoch", "id")}  # what every process needs, no more

    best = run.strategy.on_main(read)
    run.program.load_state_dict(best["model"])
    return "best", best["epoch"], best["id"]


def keep_best_in_memory(run: TrainingRun) -> None:
    """A run held in memory (:func:`ppl_vae.training.loop.fit`) with --early-stopping: a copy of the best epoch's
    weights, which the program gets back at the end."""
    if run.run_dir is None and run.config.early_stopping is not None and run.stopping["improved"]:
        run.best_weights = {name: value.detach().clone() for name, value in run.program.state_dict().items()}

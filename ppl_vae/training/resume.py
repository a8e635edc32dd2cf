"""Resuming a run: its saved configurations, and the checks of a checkpoint before anything is written.

A checkpoint is refused (one line, naming what to do) when the training path cannot continue it exactly:
another optimizer format, another number of processes (one process vs torchrun), or fewer ``--epochs`` than
it has trained. The engine's own record is kept across resumes (:func:`ppl_vae.training.engines.resumed_engine_choice`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import runs
from ..data import in_run_directory
from ..errors import RunDirectoryError
from ..model import VAEConfig
from .config import OPTIMIZER_FORMAT_PYRO, OPTIMIZER_FORMAT_TORCH, TrainConfig


def check_optimizer_format(checkpoint: dict[str, Any], expected: str, run_dir: Path) -> None:
    """Refuse to resume a checkpoint whose optimizer state the caller's training path cannot read."""
    found = checkpoint.get("optimizer_format", OPTIMIZER_FORMAT_PYRO)
    if found == expected:
        return
    if found == OPTIMIZER_FORMAT_TORCH and "world_size" in checkpoint:
        world_size = checkpoint["world_size"]
        how = f"with --devices (it ran on {world_size} process{'es' if world_size != 1 else ''}, under torchrun)"
    elif found == OPTIMIZER_FORMAT_TORCH:
        how = "in a single process, as it was trained (--engine jit)"
    else:
        how = "without --devices (it was trained in a single process with SVI)"
    raise RunDirectoryError(
        f"the checkpoint of {run_dir} holds {found!r} optimizer state, which this training path cannot resume: "
        f"resume it {how}"
    )


def check_resume_epochs(checkpoint: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume to fewer epochs than the checkpoint has trained: its weights are those of its epoch."""
    trained = checkpoint["epoch"]
    if config.epochs < trained:
        raise RunDirectoryError(
            f"--epochs {config.epochs} is fewer than the {trained} epochs {run_dir} has already trained: its weights "
            f"are those of epoch {trained}, and a result labelled {config.epochs} epochs would be wrong. Give "
            f"--epochs {trained} or more (or leave it out to train the run's own number), or start a new run"
        )


def check_single_process_checkpoint(checkpoint: dict[str, Any], expected: str, run_dir: Path) -> None:
    """Refuse a checkpoint that single-process training cannot resume: one written under torchrun, or another format."""
    if "world_size" in checkpoint:  # only distributed training writes it (and no RNG state)
        world_size = checkpoint["world_size"]
        raise RunDirectoryError(
            f"the checkpoint of {run_dir} was written by training on {world_size} process"
            f"{'es' if world_size != 1 else ''} under torchrun: resume it with --devices {world_size}"
        )
    check_optimizer_format(checkpoint, expected, run_dir)


def saved_configs(run_dir: Path, config: TrainConfig | None) -> tuple[TrainConfig, VAEConfig | None]:
    """The configurations of the run to resume, from its config.json (only ``epochs`` may be raised by ``config``).

    The model configuration is None for a program other than the built-in VAE (its spec is in program.json).
    """
    path = run_dir / runs.CONFIG_FILE
    saved = runs.read_json(path)
    try:
        model = VAEConfig(**saved["model"]) if saved["model"] is not None else None
        return TrainConfig(**{**in_run_directory(saved["train"], run_dir), **resume_overrides(config)}), model
    except (KeyError, TypeError) as error:
        raise RunDirectoryError(
            f"{path} does not hold a configuration this version of ppl_vae can read ({type(error).__name__}: "
            f"{error}); resume it with the version that wrote it, or start again with --overwrite"
        ) from None


def resume_overrides(config: TrainConfig | None) -> dict:
    """On resume, only the number of epochs may be raised from the command line; the rest is the run's own."""
    return {"epochs": config.epochs} if config is not None else {}

"""Training (the package :mod:`ppl_vae.training`): this module re-exports its public names, where earlier
versions defined them (``from ppl_vae.train import TrainConfig, train, load_run``)."""

from .training.checks import check_first_batch, check_split_labels, conditioning, levels_of, load_data
from .training.config import (
    ENGINES,
    LR_SCHEDULES,
    OPTIMIZER_FORMAT_PYRO,
    OPTIMIZER_FORMAT_TORCH,
    TrainConfig,
    current_learning_rate,
    describe_objective,
    kl_weight,
    learning_rate_at,
    make_optimizer,
    make_torch_optimizer,
)
from .training.engines import (
    COMPILED_LOSS_RTOL,
    ENGINE_CLASSES,
    CompiledEngine,
    Engine,
    EngineChoice,
    ModuleEngine,
    SviEngine,
    choose_engine,
    make_engine,
)
from .training.interrupts import StopRequest
from .training.loop import fit, train
from .training.records import epoch_record, learning_curve_point, print_epoch
from .training.resume import check_optimizer_format, check_resume_epochs, check_single_process_checkpoint
from .training.run_loading import build_run_program, load_run, read_run_config
from .training.setup import fit_to_dataset, program_entries, resolve_program
from .training.steps import checked_module_step, checked_svi_step, run_epoch
from .training.strategy import OneProcess, Strategy, resolve_device

__all__ = [
    "COMPILED_LOSS_RTOL", "ENGINES", "ENGINE_CLASSES", "LR_SCHEDULES", "OPTIMIZER_FORMAT_PYRO", "OPTIMIZER_FORMAT_TORCH",
    "CompiledEngine", "Engine", "EngineChoice", "ModuleEngine", "OneProcess", "StopRequest", "Strategy", "SviEngine",
    "TrainConfig", "build_run_program", "check_first_batch", "check_optimizer_format", "check_resume_epochs",
    "check_single_process_checkpoint", "check_split_labels", "checked_module_step", "checked_svi_step", "choose_engine",
    "conditioning", "current_learning_rate", "describe_objective", "epoch_record", "fit", "fit_to_dataset",
    "kl_weight", "learning_curve_point", "learning_rate_at", "levels_of", "load_data", "load_run", "make_engine",
    "make_optimizer", "make_torch_optimizer", "print_epoch", "program_entries", "read_run_config", "resolve_device",
    "resolve_program", "run_epoch", "train",
]

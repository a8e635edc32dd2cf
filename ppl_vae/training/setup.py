"""Everything before epoch 1, as named steps (torchtune-recipe style): the run's settings read and checked on rank 0
(:func:`read_settings`), the program built and checked on its data (:func:`build_program_for`,
:func:`check_program_on_data`), the engine chosen (:func:`choose_run_engine`), and the run directory started or
the checkpoint restored (:func:`start_run_directory`, :func:`restore_checkpoint`). :func:`setup_run` runs them in
order and returns the :class:`TrainingRun` the loop trains; :func:`setup_in_memory` does the same for a program
and data held in memory, without a run directory.

Every check comes before anything is written; a new run that fails before its first checkpoint is removed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from .. import runs
from ..data import DATA_RECORD_FILE, TENSORS_FILE, ImageData, dataset_image_shape, is_npz, sha256_of
from ..errors import PplVaeError, PplVaeWarning
from ..evaluate import ProgramStructure
from ..model import VAEConfig, build_vae
from ..gradient_estimators import check_gradient_program, check_gradient_sites
from ..objectives import check_meanfield, check_objective_sites
from ..programs import (
    ProgramSpec,
    Weighted,
    build_program,
    changed_source_note,
    check_program,
    load_spec,
    record_spec,
    vae_config_with,
)
from ..schedules import early_stopping_start, plateau_start
from ..trackers import check_trackers
from ..trust import verified_source
from .checks import (
    check_batches,
    check_first_batch,
    check_semi_supervised,
    check_split_labels,
    conditioning_names,
    load_data,
    unused_parameters_choice,
)
from .config import TrainConfig
from .engines import Engine, EngineChoice, choose_engine, resumed_engine_choice
from .resume import check_resume_epochs, saved_configs
from .semi import (
    check_enumeration,
    labelled_engine_choice,
    mark_enumeration,
    trained_program,
    with_labelled_record,
)
from .strategy import OneProcess, Strategy


@dataclass
class TrainRequest:
    """What :func:`ppl_vae.training.loop.train` was asked for (its arguments, after the first check of ``run_dir``)."""

    run_dir: Path
    lock: runs.RunLock
    config: TrainConfig | None = None
    model_config: VAEConfig | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    program: ProgramSpec | torch.nn.Module | None = None
    trust_program: bool = False
    data: ImageData | None = None  # tensors passed from Python (train(data=...)): the run keeps them (TENSORS_FILE)
    data_bytes: bytes | None = None  # their tensors.npz, written into the run directory when it starts


@dataclass
class Settings:
    """The run's configurations and program spec and, resuming, its checkpoint and engine record, all checked."""

    config: TrainConfig
    model_config: VAEConfig
    spec: ProgramSpec | None
    checkpoint: dict[str, Any] | None = None
    engine_record: dict[str, Any] | None = None


@dataclass
class TrainingRun:
    """Everything the loop trains with: the recipe's state. ``run_dir`` None: a run held in memory (:func:`fit`)."""

    config: TrainConfig
    program: torch.nn.Module  # the user's program (its state is the checkpoint's "model")
    trained: Weighted  # the program with the KL weight on its latent sites: what the engine optimizes
    data: ImageData
    engine: Engine
    strategy: Strategy
    device: torch.device
    description: str
    run_dir: Path | None = None
    saved_config: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    start_epoch: int = 0
    elapsed: float = 0.0  # training seconds so far, over every resume
    checkpoint_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # this call's epoch records
    enumerated: bool = False  # the guide marks sites for enumeration: the run trains with TraceEnum_ELBO
    # The states of the schedules that depend on what training measured (ppl_vae.schedules), in every checkpoint.
    plateau: dict[str, Any] = field(default_factory=dict)
    stopping: dict[str, Any] = field(default_factory=early_stopping_start)
    trackers: list[Any] = field(default_factory=list)  # --log: started by the loop on the main process
    best_weights: dict[str, Any] | None = None  # in memory, with --early-stopping: the best epoch's state_dict

    def __post_init__(self) -> None:
        self.plateau = self.plateau or plateau_start(self.config.learning_rate)

    @property
    def main(self) -> bool:
        return self.strategy.is_main

    @property
    def trained_epochs(self) -> int:
        """The last epoch trained (by this call, or before it was resumed)."""
        return self.history[-1]["epoch"] if self.history else self.start_epoch

    def last_good(self, epoch: int) -> str:
        """Where the state after ``epoch`` is kept, for messages: its checkpoint, or (in memory) the program."""
        if self.run_dir is None:
            return f"the program's parameters after epoch {epoch} (in memory)"
        return f"the checkpoint of epoch {epoch} in {self.run_dir}"


def fit_to_dataset(config: TrainConfig, model_config: VAEConfig,
                   shape: tuple[int, ...] | None = None) -> tuple[TrainConfig, VAEConfig]:
    """The configurations completed from the dataset, before anything is built or written.

    A ``.npz`` dataset becomes its absolute path and SHA-256 (a run resumed on a changed file
    is refused); the model gets the images' shape (C, H, W), which the conv networks need and
    which sets data_dim. A model built for another image shape is refused here, with both shapes. ``shape``: of
    tensors passed from Python (their file is written when the run starts; the configuration already names it).
    """
    given, shape = shape is not None, shape or dataset_image_shape(config.dataset)
    if is_npz(config.dataset) and not given:
        path = str(Path(config.dataset).expanduser().resolve())
        digest = sha256_of(path)
        if config.dataset_sha256 is not None and digest != config.dataset_sha256:
            raise PplVaeError(f"{path} has changed since the run was started (its SHA-256 differs from the run's "
                              "record): restore the file, or start a new run on it")
        config = dataclasses.replace(config, dataset=path, dataset_sha256=digest)
    if model_config.image_shape is None:
        if model_config.data_dim not in (VAEConfig.data_dim, math.prod(shape)):
            raise PplVaeError(f"the model's data_dim {model_config.data_dim} does not fit the images of {config.dataset}, "
                              f"{'x'.join(map(str, shape))} = {math.prod(shape)} values")
        model_config = dataclasses.replace(model_config, image_shape=shape, data_dim=math.prod(shape))
    elif model_config.image_shape != shape:
        raise PplVaeError(f"the model was built for images {list(model_config.image_shape)}, but {config.dataset} holds "
                          f"images {list(shape)}")
    return config, model_config


def data_for_run(run_dir: Path, config: TrainConfig | None, data: Any,
                 resume: bool) -> tuple[TrainConfig | None, ImageData | None, bytes | None]:
    """What ``train(data=...)`` trains on: a dataset name or ``.npz`` path (it becomes ``config.dataset``), or
    tensors per split (``{"train": (x, *cond), "val": ..., "test": ...}``, :func:`ppl_vae.data.tensor_data`), kept
    in the run as ``tensors.npz`` and recorded as its dataset with the SHA-256 of those bytes. Returns the
    configuration, the checked data and the file's bytes (None, None for a dataset)."""
    from collections.abc import Mapping

    from ..data import tensor_data, tensors_npz_bytes

    if data is None:
        return config, None, None
    if resume:
        raise PplVaeError(f"resume=True continues {run_dir} on the data it recorded: leave data= out")
    config = config or TrainConfig()
    if isinstance(data, (str, Path)):
        return dataclasses.replace(config, dataset=str(data)), None, None
    if not isinstance(data, Mapping):
        raise PplVaeError(f"data= is a dataset name, a .npz path, or tensors per split {{'train': (x, *cond), "
                          f"'val': ..., 'test': ...}}; got {type(data).__name__}")
    given = tensor_data(data.get("train"), data.get("val"), data.get("test"), cond=config.cond,
                        binarize=config.binarize, train_examples=config.train_examples,
                        eval_examples=config.eval_examples, record={"path": str(run_dir.resolve() / TENSORS_FILE)})
    payload = tensors_npz_bytes(data, config.cond)
    config = dataclasses.replace(config, dataset=str(run_dir.resolve() / TENSORS_FILE),
                                 dataset_sha256=hashlib.sha256(payload).hexdigest())
    return config, given, payload


def data_in_memory(data: ImageData | Any, config: TrainConfig) -> ImageData:
    """What :func:`ppl_vae.training.loop.fit` trains on: ``data`` itself, or tensors per split ``{"train": (x,
    *cond), ...}`` checked by :func:`ppl_vae.data.tensor_data` on the device of the training x."""
    from collections.abc import Mapping

    from ..data import tensor_data

    if not isinstance(data, Mapping):
        return data
    x = data.get("train")
    x = x[0] if isinstance(x, (tuple, list)) and x else x
    return tensor_data(data.get("train"), data.get("val"), data.get("test"), cond=config.cond,
                       binarize=config.binarize, device=x.device if isinstance(x, torch.Tensor) else "cpu",
                       train_examples=config.train_examples, eval_examples=config.eval_examples)


def resolve_program(
    run_dir: Path, resume: bool, program: "ProgramSpec | torch.nn.Module | None", trust_program: bool = False,
) -> ProgramSpec | None:
    """The program's spec; None for the built-in VAE of the model configuration.

    On resume the run's recorded spec decides; a Python object must be passed again; the
    recorded copy must be intact and trusted (:func:`ppl_vae.trust.verified_source`), and a
    changed or moved program file is then noted (the recorded copy is used).
    """
    if isinstance(program, torch.nn.Module):
        check_program(program)
        if resume and (load_spec(run_dir) is None or not load_spec(run_dir).object):
            raise PplVaeError(f"{run_dir} was not trained from a program object: resume it without program=")
        return ProgramSpec.for_object(program)
    if resume:
        spec = load_spec(run_dir)
        if spec is not None and spec.object:
            raise PplVaeError(f"{run_dir} was trained from a Python object ({spec.name}): rebuild it and pass it as "
                              "train(..., program=module, resume=True)")
        if spec is not None and not spec.is_builtin:
            verified_source(run_dir, spec, trust_program)  # refused before anything is written
            if note := changed_source_note(run_dir, spec):
                warnings.warn(note, PplVaeWarning, stacklevel=3)
        return spec
    if isinstance(program, ProgramSpec) and program.is_builtin and program.name == "vae":
        return None  # the built-in VAE: its options are the model configuration's
    return program




def is_builtin_vae(program: Any) -> bool:
    """Whether ``program`` is the spec of the built-in VAE (whose options are the model configuration's)."""
    return isinstance(program, ProgramSpec) and program.is_builtin and program.name == "vae"


def read_settings(request: TrainRequest, strategy: Strategy) -> Settings:
    """On rank 0: the configurations, the program's spec and (resuming) the checkpoint and the engine record,
    checked before use."""
    config, model_config, engine_record = request.config, request.model_config, None
    if request.resume:
        request.lock.acquire()  # before the checkpoint is read: a fallback repairs it
        runs.remove_temporaries(request.run_dir, runs.TRAINING_FILES)
        config, model_config = saved_configs(request.run_dir, config)
        engine_record = runs.read_json(request.run_dir / runs.CONFIG_FILE).get("engine")
    spec = resolve_program(request.run_dir, request.resume, request.program, request.trust_program)
    if not request.resume and is_builtin_vae(request.program) and request.program.kwargs:  # recorded in config.json
        model_config = vae_config_with(model_config or VAEConfig(), request.program.kwargs)
    # A program other than the built-in VAE takes from the VAE's configuration only the data's shape.
    config, model_config = fit_to_dataset(config or TrainConfig(), model_config or VAEConfig(),
                                          request.data.image_shape if request.data is not None else None)
    strategy.check_config(config)
    check_trackers(config.log)  # a missing extra: one line with its install command, before anything is written
    # Read onto the CPU: the saved RNG states must stay CPU byte tensors (torch.set_rng_state refuses a CUDA
    # one); load_state_dict moves weights and optimizer state.
    checkpoint = runs.load_checkpoint_for_resume(request.run_dir, map_location="cpu") if request.resume else None
    if checkpoint is not None:
        strategy.check_checkpoint(checkpoint, config, request.run_dir)
        check_resume_epochs(checkpoint, config, request.run_dir)
    return Settings(config, model_config, spec, checkpoint, engine_record)


def build_program_for(settings: Settings, request: TrainRequest, device: torch.device) -> torch.nn.Module:
    """The program to train, on ``device``, in train mode: the built-in VAE of the model configuration, the
    object passed, or the spec's program (a resumed run's from its checked copy)."""
    if settings.spec is None:
        program = build_vae(settings.model_config)
    elif isinstance(request.program, torch.nn.Module):
        program = request.program
    else:
        data_info = {"data_dim": settings.model_config.data_dim, "image_shape": settings.model_config.image_shape}
        program = build_program(settings.spec, request.run_dir if request.resume else None, data_info,
                                request.trust_program)
    return program.to(device).train()  # an object may come in eval mode: checks see the mode steps run in


def check_program_on_data(
    program: torch.nn.Module, data: ImageData, config: TrainConfig,
) -> tuple[ProgramStructure, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """The program run on two training batches (drawn apart from the run's random stream) and checked: its
    structure, the objective's fit to its sites, ``--labels`` on every split, meanfield's analytic KL terms.
    Returns the structure and the two batches (the second None when the training set is one batch)."""
    probe = torch.Generator(device=data.train.device).manual_seed(config.seed)  # leaves the random stream alone
    first, second = check_batches(data, config, probe)
    mark_enumeration(program, config)  # --enumerate: before the program first runs
    structure = check_first_batch(program, first, conditioning_names(config))
    check_enumeration(structure, config)
    # refused where the program's sites break its gradient; enumerated sites train with TraceEnum_ELBO
    check_objective_sites(config.objective, structure, trains_enumerated=True)
    check_gradient_sites(config.gradient, structure)  # STL/DReG: every guide site reparameterized, none enumerated
    check_gradient_program(config.gradient, program)  # and no BatchNorm, whose statistics the second guide run moves
    if config.labelled is not None:
        check_semi_supervised(program, data, config, structure, first)
    if config.labels:
        check_split_labels(program, data, conditioning_names(config))
    if config.objective == "meanfield":  # refused where its analytic KL terms would not be the ELBO's
        check_meanfield(program.model, program.guide, *first)
    return structure, first, second


def choose_run_engine(
    config: TrainConfig, trained: torch.nn.Module, checked: tuple, strategy: Strategy, device: torch.device,
    settings: Settings | None = None, run_dir: Path | None = None, progress: bool = True, data: ImageData | None = None,
    program: torch.nn.Module | None = None,
) -> EngineChoice:
    """The engine of the run, checked, not assumed: rank 0 decides for all processes; a resumed run keeps its own.
    Printed (or, where --engine jit falls back, warned about) and recorded in config.json."""
    structure, first, second = checked

    def choose() -> EngineChoice:
        choice = choose_engine(config, trained, first, structure.max_plate_nesting, device, structure=structure,
                               second_batch=second)
        choice = labelled_engine_choice(choice, config, trained, data, structure.max_plate_nesting)
        if strategy.world_size == 1:
            return choice
        return unused_parameters_choice(choice, config, trained, program, data, first, structure.max_plate_nesting,
                                        bool(structure.enumerated))

    choice = strategy.on_main(choose)
    if settings is not None and settings.checkpoint is not None:
        choice = resumed_engine_choice(choice, config, settings.engine_record, run_dir)
    if choice.requested == "jit" and choice.engine != "jit":
        warnings.warn(f"--engine jit: {choice.reason}; training with --engine svi instead", PplVaeWarning, stacklevel=4)
    elif progress and strategy.is_main:
        print(f"training engine: {choice.describe()}", flush=True)
    return choice


def setup_run(request: TrainRequest, strategy: Strategy) -> TrainingRun:
    """Everything before epoch 1 of a run directory, in order; nothing is written before every check passed."""
    settings = strategy.on_main(lambda: read_settings(request, strategy))
    config, spec = settings.config, settings.spec
    device = strategy.select_device(config)
    seed_and_validation(config)
    program = build_program_for(settings, request, device)
    if request.data_bytes is not None:  # tensors from Python: the same on every process, or refused on every one
        strategy.check_same_data(hashlib.sha256(request.data_bytes).hexdigest())
    data = with_labelled_record(load_data(config, program, device, request.data), config)
    checked = check_program_on_data(program, data, config)
    # the KL weight of every latent site, for any program (the one mechanism); --labelled adds the classifier term
    trained = Weighted(trained_program(program, data, config))
    choice = choose_run_engine(config, trained, checked, strategy, device, settings, request.run_dir, request.progress,
                               data, program)
    config = dataclasses.replace(config, engine=choice.engine)
    engine = strategy.make_engine(trained, config, checked[0].max_plate_nesting, enumerated=bool(checked[0].enumerated),
                                  unused_parameters=choice.unused_parameters)
    run = TrainingRun(
        config, program, trained, data, engine, strategy,
        device, settings.model_config.describe() if spec is None else spec.describe(), request.run_dir,
        {"model": settings.model_config.to_dict() if spec is None else None, "train": asdict(config),
         "engine": asdict(choice)}, request.progress)
    run.enumerated = bool(checked[0].enumerated)
    if settings.checkpoint is not None:
        restore_checkpoint(run, settings.checkpoint)
    else:
        run.checkpoint_id = strategy.on_main(lambda: start_run_directory(run, request, spec))
    return run


def setup_in_memory(program: torch.nn.Module, data: ImageData, config: TrainConfig,
                    progress: bool = True) -> TrainingRun:
    """:func:`setup_run` for a program object and data in memory: the same checks and engine choice, one process,
    no run directory (nothing is written; the records stay in ``TrainingRun.history``)."""
    if config.log:
        raise PplVaeError("--log writes into a run directory: train with ppl_vae.train.train(run_dir, ...) to use "
                          "trackers (fit keeps its records in memory)")
    strategy = OneProcess()
    device = data.train.device
    seed_and_validation(config)
    program = check_program(program).to(device).train()
    data = with_labelled_record(data, config)
    checked = check_program_on_data(program, data, config)
    trained = Weighted(trained_program(program, data, config))
    choice = choose_run_engine(config, trained, checked, strategy, device, progress=progress, data=data)
    config = dataclasses.replace(config, engine=choice.engine)
    engine = strategy.make_engine(trained, config, checked[0].max_plate_nesting, enumerated=bool(checked[0].enumerated))
    return TrainingRun(config, program, trained, data, engine, strategy, device, type(program).__name__,
                       progress=progress, enumerated=bool(checked[0].enumerated))


def seed_and_validation(config: TrainConfig) -> None:
    """A fresh param store, the run's seed, and Pyro's validation as configured."""
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    pyro.enable_validation(config.pyro_validation)


def save_checkpoint(run: TrainingRun, epoch: int) -> str:
    """Rank 0: the checkpoint of ``epoch`` (program, optimizer, the strategy's RNG record, configuration); its id."""
    state = {"epoch": epoch, "model": run.program.state_dict(), **run.engine.state_dict(),
             **run.strategy.checkpoint_extra(run.device), "config": run.saved_config, "train_seconds": run.elapsed,
             "schedules": {"plateau": run.plateau, "stopping": run.stopping}}
    return runs.save_checkpoint(run.run_dir, state)


def start_run_directory(run: TrainingRun, request: TrainRequest, spec: ProgramSpec | None) -> str:
    """On rank 0, every check passed (options, device, data, program): make the run directory, replacing an old run
    with overwrite; write the records and the checkpoint of epoch 0 (so a run stopped during its first epoch resumes
    too). A run that fails here is removed again, so it blocks no later run."""
    created = runs.start_run_dir(run.run_dir, request.lock, overwrite=request.overwrite)
    try:
        runs.record_written(run.run_dir, runs.CONFIG_FILE, DATA_RECORD_FILE, runs.METRICS_FILE,
                            *runs.CHECKPOINT_FILES, *program_entries(spec))  # before they are written
        if request.data_bytes is not None:  # tensors from Python: the run's dataset, read again by every command
            runs.write_bytes(runs.record_written(run.run_dir, TENSORS_FILE)[0], request.data_bytes)
        runs.write_json(run.run_dir / runs.CONFIG_FILE, run.saved_config)
        runs.write_json(run.run_dir / DATA_RECORD_FILE, run.data.record)
        if spec is not None:
            record_spec(run.run_dir, spec)
        return save_checkpoint(run, 0)
    except BaseException:
        request.lock.release()
        runs.discard_unstarted_run(run.run_dir, created)  # a run that never started blocks no later one
        raise


def restore_checkpoint(run: TrainingRun, checkpoint: dict[str, Any]) -> None:
    """Continue after ``checkpoint``: program, optimizer and random state; rank 0 rewrites the run's records (with a
    raised --epochs, config.json then says how far it was trained) and drops metrics of epochs after it."""
    run.program.load_state_dict(checkpoint["model"])
    run.engine.load_state_dict(checkpoint)
    run.strategy.restore(checkpoint, run.device)
    run.start_epoch, run.elapsed = checkpoint["epoch"], checkpoint.get("train_seconds", 0.0)
    run.checkpoint_id = checkpoint.get("id")
    saved = checkpoint.get("schedules") or {}  # none in checkpoints of earlier versions: the schedules start afresh
    run.plateau = saved.get("plateau") or plateau_start(run.config.learning_rate)
    run.stopping = saved.get("stopping") or early_stopping_start()
    if run.main:
        if run.config.early_stopping is not None and run.stopping["best_epoch"] == run.start_epoch > 0:
            runs.keep_as_best(run.run_dir)  # a run killed between the checkpoint and its best copy
        runs.record_written(run.run_dir, runs.CONFIG_FILE, DATA_RECORD_FILE, runs.METRICS_FILE, *runs.CHECKPOINT_FILES)
        runs.write_json(run.run_dir / runs.CONFIG_FILE, run.saved_config)
        runs.write_json(run.run_dir / DATA_RECORD_FILE, run.data.record)
        runs.truncate_metrics(run.run_dir, run.start_epoch)


def program_entries(spec: ProgramSpec | None) -> tuple[str, ...]:
    """The run entries :func:`ppl_vae.programs.record_spec` writes for ``spec``: program.json, and the copy of its file."""
    if spec is None:
        return ()
    copy = (runs.PROGRAM_FOLDER, f"{runs.PROGRAM_FOLDER}/{Path(spec.path).name}") if spec.path is not None else ()
    return (runs.PROGRAM_FILE, *copy)

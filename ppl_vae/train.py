"""Training: stochastic variational inference on any program's Pyro model and guide.

A program is an ``nn.Module`` with ``model(x, *cond)`` and ``guide(x, *cond)``
(:mod:`ppl_vae.programs`): the built-in VAE, the other built-in programs, or a user's own.
:func:`train` runs one loop (:func:`_train`) for all of them, with either engine, on one
process or on several: what differs between one process and a process group (the device,
sharding the minibatch, agreeing on faults and Ctrl-C, the random streams, rank 0 writing)
is :class:`OneProcess` or :class:`ppl_vae.distributed.Context`. The KL weight (``beta``
and its warm-up) scales every latent site of the program (:class:`ppl_vae.programs.Weighted`).

Each step maximizes the ELBO of a minibatch through ``SVI(model, guide, optim,
Trace_ELBO())`` (or another objective of :mod:`ppl_vae.objectives`), or through the same
ELBO compiled by Pyro's ``JitTrace_ELBO`` and one torch Adam (:class:`CompiledEngine`,
faster per step); on several processes, the loss module in DistributedDataParallel
(:class:`ppl_vae.distributed.DdpEngine`). ``engine="auto"``, the default, takes the compiled
loss wherever its trace is faithful (reparameterized guide sites, no TracerWarning from the program, no
Python state it changes) and it is checked equal to ``Trace_ELBO``'s on the first batch and on a second,
and SVI otherwise; ``engine="jit"`` is refused where the trace is not faithful (:func:`choose_engine`);
the run prints and records (config.json, ``"engine"``) which and why. Before anything is written, the
objective is checked against the program's guide sites
(:func:`ppl_vae.objectives.check_objective_sites`). The loss
Pyro reports is the negative objective summed over the minibatch, so the running
value shown is ``-loss / batch size`` in nats per datapoint (with beta != 1 it is
the beta-weighted objective, not the ELBO). After every epoch: the validation ELBO, a line in ``metrics.jsonl``
and an atomic checkpoint (model, optimizer and scheduler state, RNG state,
configuration, epoch), so ``resume=True`` continues an interrupted run exactly.
At the end: a test evaluation (ELBO decomposition and importance-sampled log
p(x)) written to ``test.json``. Training steps run the program in train mode; every evaluation
(validation, learning curve, test) in eval mode without gradients, and leaves the modes as they were
(:mod:`ppl_vae.modes`): Dropout and BatchNorm programs get the numbers ``ppl-vae evaluate`` gives.

Reliability (what :func:`train` guarantees):

* **Interrupted runs resume exactly.** Checkpoints hold the state at epoch
  boundaries only: one is written before the first epoch (epoch 0) and one after
  every epoch. A run stopped in the middle of epoch e (killed, Ctrl-C, a crash)
  resumes from the checkpoint of epoch e-1 and runs epoch e again from its start,
  with the same random stream, so on the CPU it ends with the same numbers as a run
  never stopped. The epoch's permutation and position are never saved: that would
  save at most one epoch of work (seconds to minutes) at the cost of a second,
  mid-epoch resume path to keep exact.
* **Ctrl-C** (SIGINT) asks training to stop before its next step: the run
  directory is left consistent (an epoch whose training is done is still
  validated and saved first) and :class:`~ppl_vae.errors.TrainingInterrupted` is
  raised. A second Ctrl-C stops at once.
* **Numerical faults.** Every step checks the loss and the global gradient norm
  before the optimizer applies them (:func:`checked_svi_step`); the validation ELBO
  is checked after every epoch. A NaN or infinity raises
  :class:`~ppl_vae.errors.NumericalFaultError` naming the epoch and step, with the
  parameters and checkpoints as they were before the fault. ``clip_norm`` clips
  the global gradient norm of every step.
* **Damaged checkpoint.** ``resume=True`` falls back to ``checkpoint.prev.pt``
  with a warning when ``checkpoint.pt`` is damaged or missing
  (:func:`ppl_vae.runs.load_checkpoint_for_resume`).
* **Run directory.** Every check (configuration, device, data; on resume the
  checkpoint and ``epochs`` >= the epochs trained) comes before anything is
  written; ``overwrite`` deletes only what the run's ``manifest.json`` records,
  and only then (:func:`ppl_vae.runs.start_run_dir`); every file is recorded
  there before it is written (:func:`ppl_vae.runs.record_written`); the run is locked while training
  (:class:`ppl_vae.runs.RunLock`); a new run that fails before its first
  checkpoint is removed again, so it blocks no later run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads

from . import runs
from .data import DATA_RECORD_FILE, MNISTData, check_dataset, dataset_image_shape, is_npz, load_dataset, load_mnist, sha256_of
from .errors import InvalidDataError, ModelStructureError, NumericalFaultError, PplVaeError, PplVaeWarning, RunDirectoryError, TrainingInterrupted
from .evaluate import (
    DEVICE_ERRORS,
    ProgramStructure,
    evaluation_summary,
    inspect_program,
    mean_and_stderr,
)
from .model import VAEConfig, build_vae
from .modes import running_statistics_problem
from .objectives import (
    COMPILED_OBJECTIVES,
    UnfaithfulTrace,
    check_meanfield,
    check_objective,
    check_objective_sites,
    compiled_loss_problem,
    make_loss_module,
    make_objective,
    site_kind_problem,
)
from .programs import (
    ProgramSpec,
    Weighted,
    build_program,
    changed_source_note,
    check_parameters_belong,
    check_program,
    load_spec,
    record_spec,
    vae_config_with,
)
from .trust import verified_source

LR_SCHEDULES = ("constant", "step", "cosine")
# How a step is computed (see the Engine classes below); both read the same Pyro programs. "auto" chooses
# one of them for the run (choose_engine), and the run records which and why.
ENGINES = ("auto", "svi", "jit")


@dataclass
class TrainConfig:
    """Everything about a training run except the architecture, as plain data."""

    epochs: int = 50
    batch_size: int = 100
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    lr_milestones: tuple[int, ...] = ()  # epochs after which "step" multiplies the rate by lr_gamma
    lr_gamma: float = 0.1
    lr_final: float = 1e-4  # the rate "cosine" anneals to
    seed: int = 0
    device: str = "auto"
    binarize: str = "dynamic"
    data_dir: str | None = None
    dataset: str = "mnist"  # mnist, fashion-mnist, kmnist, cifar10, or the path of a .npz file (ppl_vae.data)
    dataset_sha256: str | None = None  # of a .npz dataset, filled in by training: evaluate refuses a changed file
    train_examples: int | None = None
    eval_examples: int | None = None
    val_samples: int = 1  # draws from q per datapoint for the per-epoch validation ELBO
    test_samples: int = 1000  # K for the final test log p̂(x); `ppl-vae evaluate` defaults to 5000
    objective: str = "elbo"  # elbo (Trace_ELBO), meanfield (TraceMeanField_ELBO) or iwae
    particles: int = 1  # draws from q per datapoint and step (K of the IWAE objective)
    beta: float = 1.0  # the KL weight, applied with poutine.scale on the latent site
    warmup_epochs: int = 0  # linear KL warm-up from warmup_start to beta over this many epochs
    warmup_start: float = 0.01
    evidence_every: int = 0  # every this many epochs (and at the end), log p̂(x) on validation images; 0: never
    evidence_examples: int = 500  # validation images for that learning curve
    evidence_samples: int = 500  # K for that learning curve
    clip_norm: float | None = None  # clip the global gradient norm of every step to this; None: no clipping
    pyro_validation: bool = False  # --validate: Pyro's argument checks in the hot loop (slow; tests turn it on)
    engine: str = "auto"  # auto: jit where checked equal to Trace_ELBO (choose_engine), else svi; svi: SVI with Pyro's
    # optimizer; jit: the loss compiled by JitTrace_ELBO, one torch Adam. config.json records the engine that ran.
    labels: bool = False  # every batch is (x, y), y the int64 class labels, passed to both programs

    def __post_init__(self) -> None:
        if not isinstance(self.labels, bool):
            raise PplVaeError(f"labels must be true or false, got {self.labels!r}")
        for name in ("epochs", "batch_size", "seed", "val_samples", "test_samples", "particles", "warmup_epochs",
                     "evidence_every", "evidence_examples", "evidence_samples", "train_examples", "eval_examples"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)) and not (
                value is None and name in ("train_examples", "eval_examples")
            ):
                raise PplVaeError(f"{name} must be an integer, got {value!r}")
        if not 0 <= self.seed < 2**32:
            raise PplVaeError(f"the seed must be an integer from 0 to 2**32 - 1 (NumPy's range), got {self.seed}")
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        if self.lr_schedule not in LR_SCHEDULES:
            raise PplVaeError(f"unknown lr schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.evidence_every < 0:
            raise PplVaeError(f"evidence_every must be >= 0 (0 turns the learning curve off), got {self.evidence_every}")
        for name in ("epochs", "batch_size", "val_samples", "test_samples", "evidence_examples", "evidence_samples"):
            if getattr(self, name) < 1:
                raise PplVaeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.engine not in ENGINES:
            raise PplVaeError(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        check_dataset(self.dataset)
        check_objective(self.objective, self.particles, compiled=self.engine == "jit")
        if not self.beta > 0 or self.warmup_epochs < 0 or not 0 < self.warmup_start <= max(self.beta, self.warmup_start):
            raise PplVaeError("beta must be positive, warmup_epochs >= 0 and warmup_start positive")
        if self.objective == "iwae" and (self.beta != 1.0 or self.warmup_epochs):
            raise PplVaeError("the IWAE objective has no KL term to weight: use beta 1 and no warm-up with --objective iwae")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise PplVaeError(f"the learning rate must be a positive finite number, got {self.learning_rate}")
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise PplVaeError(f"clip_norm must be a positive finite number or None, got {self.clip_norm}")


def _resumed_engine_choice(choice: EngineChoice, config: TrainConfig, saved: dict | None, run_dir: Path) -> EngineChoice:
    """A resumed run keeps its engine (its optimizer state is in that engine's format) and its record of why."""
    if choice.engine != config.engine:
        raise RunDirectoryError(
            f"{run_dir} was trained with --engine {config.engine}, which cannot continue it now ({choice.reason}); "
            "resume it with the version of ppl_vae (and torch, Pyro) that started it, or start a new run"
        )
    if saved and saved.get("engine") == choice.engine:
        return EngineChoice(saved.get("requested", config.engine), choice.engine,
                            saved.get("reason", choice.reason), choice.check_seconds)
    return choice


def kl_weight(config: TrainConfig, epoch: int) -> float:
    """The KL weight of ``epoch`` (1-based): linear from warmup_start to beta over warmup_epochs, then beta."""
    if config.warmup_epochs == 0:
        return config.beta
    progress = min(1.0, (epoch - 1) / config.warmup_epochs)
    return config.warmup_start + (config.beta - config.warmup_start) * progress


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; asking for CUDA without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PplVaeError("--device cuda was asked for, but torch sees no CUDA GPU: use --device cpu or auto")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PplVaeError(f"unknown device {device!r}: use auto, cpu or cuda") from None
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise PplVaeError(f"--device {device} was asked for, but torch sees {torch.cuda.device_count()} GPU(s), "
                          "numbered from 0: use --device cuda, or a smaller index")
    return resolved


def make_optimizer(config: TrainConfig) -> pyro.optim.PyroLRScheduler:
    """Adam wrapped in a learning-rate scheduler that steps once per epoch."""
    optim_args = {"optimizer": torch.optim.Adam, "optim_args": {"lr": config.learning_rate}}
    if config.lr_schedule == "cosine":
        return pyro.optim.CosineAnnealingLR({**optim_args, "T_max": config.epochs, "eta_min": config.lr_final})
    milestones = list(config.lr_milestones) if config.lr_schedule == "step" else []
    return pyro.optim.MultiStepLR({**optim_args, "milestones": milestones, "gamma": config.lr_gamma})


def make_torch_optimizer(
    params, config: TrainConfig
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LRScheduler]:
    """The same Adam and per-epoch schedule as :func:`make_optimizer`, as plain torch objects over ``params``.

    Pyro's ``PyroLRScheduler`` wraps these torch classes, one instance per parameter;
    Adam works elementwise, so one instance over all parameters updates them the same way.
    The distributed path (:mod:`ppl_vae.distributed`) trains a torch module and needs these.
    On the CPU, torch's fused Adam (one kernel per parameter, the same update to float rounding:
    ``tests/test_engine_choice.py`` checks it against Pyro's Adam) takes about 0.3 ms a step
    of the default VAE against 0.9 ms for the default implementation; elsewhere (CUDA: not
    measured here) torch's default implementation.
    """
    params = list(params)
    fused = bool(params) and all(p.device.type == "cpu" for p in params)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate, **({"fused": True} if fused else {}))
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.lr_final)
    else:
        milestones = list(config.lr_milestones) if config.lr_schedule == "step" else []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.lr_gamma)
    return optimizer, scheduler


def current_learning_rate(optimizer: pyro.optim.PyroLRScheduler, config: TrainConfig) -> float:
    for scheduler in optimizer.optim_objs.values():
        return scheduler.optimizer.param_groups[0]["lr"]
    return config.learning_rate


def _rng_state(device: torch.device) -> dict:
    """Python's, NumPy's and torch's CPU generators, and the training GPU's own (only that one: a run may
    resume where fewer GPUs are visible, and a CPU run on a GPU machine should not touch CUDA at all)."""
    state = pyro.util.get_rng_state()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    state = dict(state)
    cuda_state = state.pop("cuda", None)
    pyro.util.set_rng_state(state)
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


def levels_of(program: torch.nn.Module, binarize: str) -> str | None:
    """How 8-bit grey-level data meet the likelihood: ``"discrete"``, ``"dequantized"``, or None for binary data.

    A program says which with ``data_kind`` ("discrete": a mass on the 256 levels), on itself or on its
    ``likelihood``; without one, a density is assumed, evaluated at dequantized levels.
    """
    if binarize != "none":
        return None
    kind = getattr(getattr(program, "likelihood", None), "data_kind", getattr(program, "data_kind", "continuous"))
    return "discrete" if kind == "discrete" else "dequantized"


def fit_to_dataset(config: TrainConfig, model_config: VAEConfig) -> tuple[TrainConfig, VAEConfig]:
    """The configurations completed from the dataset, before anything is built or written.

    A ``.npz`` dataset becomes its absolute path and SHA-256 (a run resumed on a changed file
    is refused); the model gets the images' shape (C, H, W), which the conv networks need and
    which sets data_dim. A model built for another image shape is refused here, with both shapes.
    """
    shape = dataset_image_shape(config.dataset)
    if is_npz(config.dataset):
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


def load_data(config: TrainConfig, vae: torch.nn.Module, device: torch.device) -> MNISTData:
    dequantize_levels = levels_of(vae, config.binarize) == "dequantized"
    if config.dataset == "mnist":  # through the module's name load_mnist, which the tests memoize
        data = load_mnist(config.data_dir, config.binarize, device, config.train_examples, config.eval_examples,
                          dequantize_levels=dequantize_levels)
    else:
        data = load_dataset(config.dataset, config.data_dir, config.binarize, device, config.train_examples,
                            config.eval_examples, dequantize_levels=dequantize_levels,
                            expected_sha256=config.dataset_sha256)
    # One check of the whole data against the likelihood's support, instead of one per step (programs without
    # a likelihood module are checked on their first batch, by ppl_vae.evaluate, in check_first_batch).
    check = getattr(getattr(vae, "likelihood", None), "check_data", None)
    for split in ("train", "val", "test") if check is not None else ():
        check(data.split(split))
    if config.labels and data.labels("train") is None:
        raise PplVaeError(f"--labels: the dataset {config.dataset} has no labels to condition on")
    return data


def conditioning(data: MNISTData, split: str, config: TrainConfig) -> tuple[torch.Tensor, ...]:
    """The conditioning data the programs take after x for ``split``: its labels with ``labels``, else nothing."""
    return (data.labels(split),) if config.labels else ()


def _check_arity(program: torch.nn.Module, given: int) -> None:
    """The programs take as many data arguments as the batches give: (x) or, with labels, (x, y)."""
    import inspect

    for name in ("model", "guide"):
        try:
            parameters = list(inspect.signature(getattr(program, name)).parameters.values())
        except (TypeError, ValueError):  # no signature to read: running the program will tell
            return
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in parameters)
        if len(required) > given:
            names = ", ".join(p.name for p in required)
            raise PplVaeError(f"the program's {name}({names}) takes {len(required)} data arguments, but the training "
                              f"batches give {given} (x{', y' if given > 1 else ''}): train with --labels to pass the "
                              "class labels after x")
        if not varargs and len(positional) < given:
            raise PplVaeError(f"--labels gives the programs (x, y), but the program's {name} takes "
                              f"{len(positional)} data argument(s): leave out --labels, or add y to its arguments")


def _check_batches(
    data: MNISTData, config: TrainConfig, probe: torch.Generator
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """Two training batches for the up-front checks, drawn with ``probe`` (the run's random stream is left alone).

    The second has the first's shape and other content (the compiled graph is replayed on it): the next batch,
    topped up with rows of the first when it is smaller; None when the training set is one batch.
    """
    batches = data.train_batches(config.batch_size, generator=probe, labels=config.labels)
    first = _as_tuple(next(batches))
    following = next(batches, None)
    if following is None:
        return first, None
    second = tuple(torch.cat([b, f])[: f.shape[0]] for b, f in zip(_as_tuple(following), first))
    return first, second


def check_first_batch(program: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> ProgramStructure:
    """Run the program once on a training batch: one-line errors for programs that fail, and their structure.

    Checks the structure :mod:`ppl_vae.evaluate` needs (data plate, observed and latent sites,
    the data within the likelihood's support) and that every parameter belongs to the module.
    """
    _check_arity(program, len(batch))
    try:
        with torch.no_grad():
            structure = inspect_program(program.model, program.guide, batch)
    except PplVaeError as error:
        shapes = ", ".join(f"{list(t.shape)} {t.dtype}" for t in batch)
        raise type(error)(f"the program failed on the first training batch ({shapes}): {error}") from error
    check_parameters_belong(program, *batch)
    return structure


def check_split_labels(program: torch.nn.Module, data: MNISTData) -> None:
    """Before training: every split has labels, within the program's ``num_classes`` where it has one, and the
    program runs on the datapoints with the smallest and the largest label of each split (two per split).

    Labels out of range only in the validation or test split would otherwise be met after an
    epoch, or after the whole training; the message names the split and the file they come from.
    """
    from .data.core import dequantize
    from .user_code import describe_user_error, first_line

    classes = getattr(program, "num_classes", None)
    for split in ("train", "val", "test"):
        labels, where = data.labels(split), _labels_source(data, split)
        if labels is None or labels.numel() == 0:
            raise InvalidDataError(f"--labels: the {split} split has no labels ({where}): every split needs them")
        low, high = int(labels.min()), int(labels.max())
        if isinstance(classes, int) and not 0 <= low <= high < classes:
            raise InvalidDataError(f"--labels: the {split} labels ({where}) lie in [{low}, {high}], outside the "
                                   f"program's classes 0 to {classes - 1} (num_classes={classes})")
        rows = torch.stack([labels.argmin(), labels.argmax()]).to(data.train.device)
        x = getattr(data, split)[rows]
        if split == "train" and data.binarize == "dynamic":
            x = x.round()  # one fixed draw is all a check needs
        elif split == "train" and data.dequantized:
            x = dequantize(x, torch.Generator(device=x.device).manual_seed(0))
        try:
            devices = [x.device.index or 0] if x.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):  # leaves the run's random streams alone
                guide_trace = poutine.trace(program.guide).get_trace(x, labels[rows])
                poutine.replay(program.model, trace=guide_trace)(x, labels[rows])
        except DEVICE_ERRORS:
            raise
        except Exception as error:  # the program's refusal of a label, in whatever words
            what = str(error) if isinstance(error, PplVaeError) else (
                describe_user_error(error) or f"{type(error).__name__}: {first_line(error)}")
            raise InvalidDataError(f"--labels: the program fails on the {split} labels ({where}, values {low} to "
                                   f"{high}): {what}") from error


def _labels_source(data: MNISTData, split: str) -> str:
    """Where a split's labels come from, for messages: ``y_test of FILE.npz``, or the dataset's name."""
    record = data.record
    if record.get("dataset") != "npz":
        return f"the {data.name} dataset's {split} labels"
    key = record.get("splits", {}).get(split, "")
    array = f"y_{key[2:]}" if key in ("x_train", "x_val", "x_test") else "y_train"
    return f"{array} of {record.get('path')}"


def train(
    run_dir: str | Path,
    config: TrainConfig | None = None,
    model_config: VAEConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    program: "ProgramSpec | torch.nn.Module | None" = None,
    processes: Any = None,
    trust_program: bool = False,
) -> dict[str, Any]:
    """Train a program into ``run_dir``; returns the final test evaluation.

    ``program`` is what is trained: None for the built-in VAE of ``model_config``; a
    :class:`~ppl_vae.programs.ProgramSpec` (a built-in name, or a user's FILE.py:NAME with
    keyword arguments, recorded in the run directory so that every command can rebuild it);
    or an ``nn.Module`` with ``model`` and ``guide`` methods (a Python object: resuming and
    evaluating the run then need the same object passed again). Every program goes through
    the same loop, engines, checkpoints and evaluation.

    With ``resume=True`` the configuration is read from the run directory and the
    run continues after its last checkpoint (see the module docstring for what
    interruptions, numerical faults and damaged checkpoints do). This is training in
    process by default; ``processes`` (a :class:`ppl_vae.distributed.Context`, through
    :func:`ppl_vae.distributed.train_distributed`) runs the same loop on several.
    Resuming imports the run's copy of its program file only if this user's key signed it
    (:mod:`ppl_vae.trust`), or with ``trust_program=True`` (for this call; nothing is signed).
    """
    run_dir = runs.check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    lock = runs.RunLock(run_dir)  # held while training (by rank 0): one writer per run
    try:
        return _train(run_dir, lock, config, model_config, resume, overwrite, progress, program, processes,
                      trust_program)
    finally:
        lock.release()


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


def _is_builtin_vae(program: Any) -> bool:
    return isinstance(program, ProgramSpec) and program.is_builtin and program.name == "vae"


class OneProcess:
    """What training in one process needs of the process group: nothing to share or agree on; it writes.

    The other implementation, :class:`ppl_vae.distributed.Context`, trains on several processes
    with DistributedDataParallel; :func:`_train` is the one loop both run. One process keeps one
    random stream for the whole run and saves its state in every checkpoint, so a resumed run
    continues it exactly.
    """

    rank, world_size, is_main = 0, 1, True

    def select_device(self, config: TrainConfig) -> torch.device:
        return resolve_device(config.device)

    def describe(self, device: torch.device) -> str:
        return str(device)

    def on_main(self, compute: Callable[[], Any]) -> Any:
        return compute()

    def agree_to_stop(self, requested: bool) -> bool:
        return requested

    def check_config(self, config: TrainConfig) -> None:
        """Nothing beyond TrainConfig's own checks."""

    def check_checkpoint(self, checkpoint: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
        check_single_process_checkpoint(checkpoint, ENGINE_CLASSES[config.engine].optimizer_format, run_dir)

    def make_engine(self, trained: torch.nn.Module, config: TrainConfig, max_plate_nesting: int) -> "Engine":
        return ENGINE_CLASSES[config.engine](trained, config, max_plate_nesting)

    def epoch_batches(self, data: MNISTData, config: TrainConfig, epoch: int) -> Iterable:
        return data.train_batches(config.batch_size, labels=config.labels)  # the run's one random stream

    def checkpoint_extra(self, device: torch.device) -> dict[str, Any]:
        return {"rng": _rng_state(device)}

    def restore(self, checkpoint: dict[str, Any], device: torch.device) -> None:
        _set_rng_state(checkpoint["rng"], device)


def _train(
    run_dir: Path, lock: runs.RunLock, config: TrainConfig | None, model_config: VAEConfig | None, resume: bool,
    overwrite: bool, progress: bool, program_arg: "ProgramSpec | torch.nn.Module | None" = None,
    processes: Any = None, trust_program: bool = False,
) -> dict[str, Any]:
    """The training loop, for any program and either engine, on one process or many (``processes``).

    :func:`train` calls it after the first check of ``run_dir``; every other check comes before
    anything is written. What differs between one process and several (the device, sharding,
    agreeing on faults and Ctrl-C, which random streams, rank 0 writing) is ``processes``:
    :class:`OneProcess`, or :class:`ppl_vae.distributed.Context`.
    """
    from .blocked_evaluation import evaluate_per_datapoint
    from .process_group import derive_seed

    processes = processes or OneProcess()
    given = program_arg if isinstance(program_arg, torch.nn.Module) else None

    def prepare() -> tuple[TrainConfig, VAEConfig, ProgramSpec | None, dict | None, dict | None]:
        """On rank 0: the configurations, the program, and (resuming) the checkpoint and the engine record, checked
        before use."""
        train_config, vae_config, engine_record = config, model_config, None
        if resume:
            lock.acquire()  # before the checkpoint is read: a fallback repairs it
            runs.remove_temporaries(run_dir, runs.TRAINING_FILES)
            train_config, vae_config = _saved_configs(run_dir, train_config)
            engine_record = runs.read_json(run_dir / runs.CONFIG_FILE).get("engine")
        spec = resolve_program(run_dir, resume, program_arg, trust_program)
        if not resume and _is_builtin_vae(program_arg) and program_arg.kwargs:  # recorded in config.json's model
            vae_config = vae_config_with(vae_config or VAEConfig(), program_arg.kwargs)
        # A program other than the built-in VAE takes from the VAE's configuration only the data's shape.
        train_config, vae_config = fit_to_dataset(train_config or TrainConfig(), vae_config or VAEConfig())
        processes.check_config(train_config)
        # Read onto the CPU: the saved RNG states must stay CPU byte tensors (torch.set_rng_state refuses a CUDA
        # one); load_state_dict moves weights and optimizer state.
        checkpoint = runs.load_checkpoint_for_resume(run_dir, map_location="cpu") if resume else None
        if checkpoint is not None:
            processes.check_checkpoint(checkpoint, train_config, run_dir)
            check_resume_epochs(checkpoint, train_config, run_dir)
        return train_config, vae_config, spec, checkpoint, engine_record

    config, model_config, spec, checkpoint, saved_engine = processes.on_main(prepare)
    description = model_config.describe() if spec is None else spec.describe()
    device, main = processes.select_device(config), processes.is_main
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    pyro.enable_validation(config.pyro_validation)
    if spec is None:
        vae = build_vae(model_config).to(device)
    else:
        data_info = {"data_dim": model_config.data_dim, "image_shape": model_config.image_shape}
        vae = given if given is not None else build_program(spec, run_dir if resume else None, data_info, trust_program)
        vae = vae.to(device)
    vae.train()  # a program object may come in eval mode: the checks below see the mode training steps run in
    data = load_data(config, vae, device)
    probe = torch.Generator(device=data.train.device).manual_seed(config.seed)  # leaves the random stream alone
    first, second = _check_batches(data, config, probe)
    structure = check_first_batch(vae, first)
    check_objective_sites(config.objective, structure)  # refused where the program's sites break its gradient
    if config.labels:
        check_split_labels(vae, data)
    if config.objective == "meanfield":  # refused where its analytic KL terms would not be the ELBO's
        check_meanfield(vae.model, vae.guide, *first)
    trained = Weighted(vae)  # the KL weight of every latent site, for any program
    # Checked, not assumed: rank 0 decides for all processes; the run records the engine that ran, and why.
    choice = processes.on_main(lambda: choose_engine(config, trained, first, structure.max_plate_nesting, device,
                                                     structure=structure, second_batch=second))
    choice = _resumed_engine_choice(choice, config, saved_engine, run_dir) if checkpoint is not None else choice
    if choice.requested == "jit" and choice.engine != "jit":
        warnings.warn(f"--engine jit: {choice.reason}; training with --engine svi instead", PplVaeWarning, stacklevel=3)
    elif progress and main:
        print(f"training engine: {choice.describe()}", flush=True)
    config = dataclasses.replace(config, engine=choice.engine)
    engine = processes.make_engine(trained, config, structure.max_plate_nesting)
    start_epoch, elapsed = 0, 0.0
    saved_config = {"model": model_config.to_dict() if spec is None else None, "train": asdict(config),
                    "engine": asdict(choice)}

    def save(epoch: int) -> str:
        state = {"epoch": epoch, "model": vae.state_dict(), **engine.state_dict(), **processes.checkpoint_extra(device),
                 "config": saved_config, "train_seconds": elapsed}
        return runs.save_checkpoint(run_dir, state)

    if checkpoint is not None:
        vae.load_state_dict(checkpoint["model"])
        engine.load_state_dict(checkpoint)
        processes.restore(checkpoint, device)
        start_epoch, elapsed = checkpoint["epoch"], checkpoint.get("train_seconds", 0.0)
        checkpoint_id = checkpoint.get("id")
        if main:
            # Rewritten on resume: with a raised --epochs, the run's record then says how far it was trained.
            runs.record_written(run_dir, runs.CONFIG_FILE, DATA_RECORD_FILE, runs.METRICS_FILE, *runs.CHECKPOINT_FILES)
            runs.write_json(run_dir / runs.CONFIG_FILE, saved_config)
            runs.write_json(run_dir / DATA_RECORD_FILE, data.record)
            runs.truncate_metrics(run_dir, start_epoch)
    else:
        def start() -> str:
            """On rank 0, every check passed (options, device, data, program): make the run directory, replacing
            an old run with overwrite; write the records and the checkpoint of epoch 0 (so a run stopped during its
            first epoch resumes too)."""
            created = runs.start_run_dir(run_dir, lock, overwrite=overwrite)
            try:
                runs.record_written(run_dir, runs.CONFIG_FILE, DATA_RECORD_FILE, runs.METRICS_FILE,
                                    *runs.CHECKPOINT_FILES, *program_entries(spec))  # before they are written
                runs.write_json(run_dir / runs.CONFIG_FILE, saved_config)
                runs.write_json(run_dir / DATA_RECORD_FILE, data.record)
                if spec is not None:
                    record_spec(run_dir, spec)
                return save(0)
            except BaseException:
                lock.release()
                runs.discard_unstarted_run(run_dir, created)  # a run that never started blocks no later one
                raise

        checkpoint_id = processes.on_main(start)

    with StopRequest() as stop:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            kept = f"the checkpoint of epoch {epoch - 1} in {run_dir}"  # the last good state while this epoch runs
            started = time.perf_counter()
            trained.kl_weight = kl_weight(config, epoch)
            batches = processes.epoch_batches(data, config, epoch)
            engine.begin_epoch(stop)
            vae.train()  # training steps in train mode (Dropout on, BatchNorm on batch statistics); evaluations switch
            train_elbo, steps = run_epoch(
                batches, engine.step, engine.stop_requested, math.ceil(data.train.shape[0] / config.batch_size),
                epoch, config.epochs, progress and main, kept,
            )
            lr = engine.learning_rate()
            engine.end_epoch()  # the learning-rate schedule steps once per epoch
            epoch_seconds = time.perf_counter() - started
            elapsed += epoch_seconds
            val = evaluate_per_datapoint(
                vae.model, vae.guide, data.val, *conditioning(data, "val", config), elbo_samples=config.val_samples,
                seed=derive_seed(config.seed, "validation", epoch),
            ).decomposition
            record = epoch_record(epoch, train_elbo, val, kept, lr=lr, kl_weight=trained.kl_weight,
                                  epoch_seconds=epoch_seconds, steps=steps, train_seconds=elapsed,
                                  device=processes.describe(device))
            record["world_size"] = processes.world_size
            if config.evidence_every and (epoch % config.evidence_every == 0 or epoch == config.epochs):
                record.update(_validation_evidence(vae, data, config, epoch))
            if main:
                runs.append_metrics(run_dir, record)
                checkpoint_id = save(epoch)
                if progress:
                    print_epoch(record, config)
        if processes.agree_to_stop(stop.requested):
            raise TrainingInterrupted(
                f"interrupted by Ctrl-C after the last epoch ({config.epochs}), which is saved in {run_dir}; "
                "the test evaluation was skipped: --resume runs it"
            )

    cond = conditioning(data, "test", config)
    per_datapoint = evaluate_per_datapoint(
        vae.model, vae.guide, data.test, *cond, num_samples=config.test_samples, elbo_samples=10,
        seed=derive_seed(config.seed, "test"), progress=progress and main,
    )
    result = evaluation_summary(
        vae.model, vae.guide, data.test, *cond, num_samples=config.test_samples, levels=levels_of(vae, config.binarize),
        evidence=per_datapoint.evidence, decomposition=per_datapoint.decomposition,
    )
    result.update({
        "split": "test", "epochs": config.epochs, "epoch": config.epochs, "checkpoint_id": checkpoint_id,
        "train_seconds": elapsed, "device": processes.describe(device), "world_size": processes.world_size,
        "model": description, "objective": describe_objective(config),
    })
    if main:
        runs.record_written(run_dir, runs.TEST_FILE)
        runs.write_json(run_dir / runs.TEST_FILE, result)
    return result


def program_entries(spec: ProgramSpec | None) -> tuple[str, ...]:
    """The run entries :func:`ppl_vae.programs.record_spec` writes for ``spec``: program.json, and the copy of its file."""
    if spec is None:
        return ()
    copy = (runs.PROGRAM_FOLDER, f"{runs.PROGRAM_FOLDER}/{Path(spec.path).name}") if spec.path is not None else ()
    return (runs.PROGRAM_FILE, *copy)


def epoch_record(
    epoch: int, train_elbo: float, val: dict, kept: str, *, lr: float, kl_weight: float, epoch_seconds: float,
    steps: int, train_seconds: float, device: torch.device | str,
) -> dict[str, Any]:
    """The line of ``metrics.jsonl`` for ``epoch``, from the validation ELBO decomposition ``val``.

    Raises :class:`NumericalFaultError` (naming ``kept``, the last good checkpoint) when
    the validation ELBO is not finite.
    """
    val_elbo, val_elbo_se = mean_and_stderr(val["elbo"])
    if not math.isfinite(val_elbo):
        raise NumericalFaultError(_fault_message(f"the validation ELBO became {val_elbo} after epoch {epoch}", kept))
    return {
        "epoch": epoch,
        "train_elbo": train_elbo,
        "val_elbo": val_elbo,
        "val_elbo_stderr": val_elbo_se,
        "val_reconstruction": mean_and_stderr(val["reconstruction"])[0],
        "val_kl": mean_and_stderr(sum(val["kl"].values()))[0],
        "learning_rate": lr,
        "kl_weight": kl_weight,
        "epoch_seconds": epoch_seconds,
        "steps_per_second": steps / epoch_seconds,
        "train_seconds": train_seconds,
        "device": str(device),
    }


def print_epoch(record: dict[str, Any], config: TrainConfig) -> None:
    print(
        f"epoch {record['epoch']}/{config.epochs}: train ELBO {record['train_elbo']:.2f}, validation ELBO "
        f"{record['val_elbo']:.2f} ± {record['val_elbo_stderr']:.2f} nats/image ({record['epoch_seconds']:.1f} s)",
        flush=True,
    )


# Checkpoints say how their optimizer state is stored: Pyro's optimizer (one torch optimizer per
# parameter, keyed by the param store's names; --engine svi in one process) or one torch optimizer and LR
# scheduler over the module's parameters (distributed training, and --engine jit). Checkpoints without the
# key are Pyro's.
OPTIMIZER_FORMAT_PYRO = "pyro"
OPTIMIZER_FORMAT_TORCH = "torch"


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


def _saved_configs(run_dir: Path, config: TrainConfig | None) -> tuple[TrainConfig, VAEConfig | None]:
    """The configurations of the run to resume, from its config.json (only ``epochs`` may be raised by ``config``).

    The model configuration is None for a program other than the built-in VAE (its spec is in program.json).
    """
    path = run_dir / runs.CONFIG_FILE
    saved = runs.read_json(path)
    try:
        model = VAEConfig(**saved["model"]) if saved["model"] is not None else None
        return TrainConfig(**{**saved["train"], **_resume_overrides(config)}), model
    except (KeyError, TypeError) as error:
        raise RunDirectoryError(
            f"{path} does not hold a configuration this version of ppl_vae can read ({type(error).__name__}: "
            f"{error}); resume it with the version that wrote it, or start again with --overwrite"
        ) from None


def describe_objective(config: TrainConfig) -> str:
    text = {"elbo": "Trace_ELBO", "meanfield": "TraceMeanField_ELBO", "iwae": "IWAE"}[config.objective]
    text += f", {config.particles} particle{'s' if config.particles > 1 else ''}"
    if config.beta != 1.0 or config.warmup_epochs:
        text += f", beta {config.beta:g}" + (f" (warm-up {config.warmup_epochs} epochs)" if config.warmup_epochs else "")
    return text


def build_run_program(
    run_dir: str | Path, config: dict[str, Any], program: torch.nn.Module | None = None, trust_program: bool = False,
) -> tuple[torch.nn.Module, str]:
    """The program of a run directory, untrained, and its description: the VAE of its config.json, or its program.json.

    A run trained from a Python object needs that object's class again: pass a fresh instance as ``program``.
    A run's program file is imported from the run's checked copy, only if this user's key signed it or with
    ``trust_program`` (:mod:`ppl_vae.trust`).
    """
    run_dir = Path(run_dir)
    spec = load_spec(run_dir)
    if spec is None:
        try:
            model_config = VAEConfig(**config["model"])
        except (KeyError, TypeError) as error:
            raise RunDirectoryError(f"{run_dir / runs.CONFIG_FILE} holds no model configuration this version can read "
                                    f"({error})") from None
        return build_vae(model_config), model_config.describe()
    if program is not None:
        return check_program(program), spec.describe()
    if spec.object:
        raise PplVaeError(f"{run_dir} was trained from a Python object ({spec.name}): load it in Python with "
                          "ppl_vae.train.load_run(run_dir, program=a_fresh_instance)")
    shape = dataset_image_shape(config["train"].get("dataset", "mnist"))
    built = build_program(spec, run_dir, {"data_dim": math.prod(shape), "image_shape": shape}, trust_program)
    if note := changed_source_note(run_dir, spec):  # once the copy is checked and trusted
        warnings.warn(note, PplVaeWarning, stacklevel=3)
    return built, spec.describe()


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's ``config.json``, checked: ``train`` and ``model`` (or null) hold only fields this version knows."""
    path = Path(run_dir) / runs.CONFIG_FILE
    config = runs.read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict) or not (
            config.get("model") is None or isinstance(config.get("model"), dict)):
        raise RunDirectoryError(f"{path} is not a run configuration: it needs an object 'train' and an object (or "
                                "null) 'model', as `ppl-vae train` writes")
    for section, kind in (("train", TrainConfig), ("model", VAEConfig)):
        if config.get(section) is None:
            continue
        known = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(config[section]) - known)
        if unknown:
            raise RunDirectoryError(f"{path}: '{section}' has key(s) {unknown} that this version of ppl_vae does not "
                                    f"know (it knows {', '.join(sorted(known))}): was it written by another version, "
                                    "or edited?")
        try:
            kind(**config[section])
        except (PplVaeError, TypeError, ValueError) as error:
            raise RunDirectoryError(f"{path}: '{section}' is not a configuration this version can use ({error})") from None
    return config


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", program: torch.nn.Module | None = None,
    trust_program: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """The trained program of a run directory (in eval mode) and its configuration, plus ``"epoch"``,
    ``"checkpoint_id"`` and ``"description"``.

    A run with a program file of its own is refused unless this user's key signed it (runs made by this user
    are) or ``trust_program`` is given: importing the file runs its code (:mod:`ppl_vae.trust`)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)  # checked: a config.json handed over may hold anything
    checkpoint = runs.load_checkpoint(run_dir, map_location=device)
    vae, description = build_run_program(run_dir, config, program, trust_program)
    vae = vae.to(device)
    vae.load_state_dict(checkpoint["model"])
    vae.eval()
    return vae, {**config, "epoch": checkpoint["epoch"], "checkpoint_id": checkpoint.get("id"), "description": description}


def _as_tuple(batch: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    """A minibatch as the programs' positional data: (x,) or (x, y)."""
    return batch if isinstance(batch, tuple) else (batch,)


def _validation_evidence(vae: torch.nn.Module, data: MNISTData, config: TrainConfig, epoch: int) -> dict[str, float]:
    """log p̂(x) with K = evidence_samples on the first evidence_examples validation images: the learning curve.

    Seeded from (seed, "evidence", epoch) and shared between the processes (:func:`ppl_vae.distributed.evaluate_per_datapoint`).
    """
    from .blocked_evaluation import evaluate_per_datapoint
    from .process_group import derive_seed

    n = config.evidence_examples
    cond = tuple(c[:n] for c in conditioning(data, "val", config))
    estimate = evaluate_per_datapoint(vae.model, vae.guide, data.val[:n], *cond, num_samples=config.evidence_samples,
                                      seed=derive_seed(config.seed, "evidence", epoch)).evidence
    return learning_curve_point(estimate.log_evidence, config)


def learning_curve_point(log_evidence: torch.Tensor, config: TrainConfig) -> dict[str, float]:
    """The metrics.jsonl entries of one learning-curve point from per-image log p̂(x) (nats)."""
    mean, stderr = mean_and_stderr(log_evidence)
    return {"val_log_px": mean, "val_log_px_stderr": stderr, "val_log_px_images": log_evidence.shape[0],
            "val_log_px_samples": config.evidence_samples}


def _resume_overrides(config: TrainConfig | None) -> dict:
    """On resume, only the number of epochs may be raised from the command line; the rest is the run's own."""
    return {"epochs": config.epochs} if config is not None else {}


def run_epoch(
    batches: Iterable[torch.Tensor],
    step: Callable[[torch.Tensor], float],
    stop_requested: Callable[[], bool],
    num_steps: int,
    epoch: int,
    epochs: int,
    progress: bool,
    kept: str,
) -> tuple[float, int]:
    """Run ``step`` (returning the loss, nats summed over the minibatch) on every minibatch of one epoch.

    Returns the mean training objective (nats/image, the negative mean loss) and the
    number of steps. Raises :class:`TrainingInterrupted` before a step when
    ``stop_requested()``, and re-raises a step's :class:`NumericalFaultError` naming the
    step; both messages name ``kept``, the checkpoint that holds the last good state.
    Shared by single-process SVI training and :mod:`ppl_vae.distributed`.
    """
    from tqdm.auto import tqdm

    total_loss, seen = 0.0, 0
    bar = tqdm(batches, total=num_steps, desc=f"epoch {epoch}/{epochs}", unit="step", disable=not progress, leave=False)
    try:
        for step_number, batch in enumerate(bar, start=1):
            where = f"epoch {epoch}, step {step_number} of {num_steps}"
            if stop_requested():
                raise TrainingInterrupted(
                    f"interrupted by Ctrl-C at {where}; --resume continues from {kept}, running epoch {epoch} again "
                    "from its start"
                )
            try:
                loss = step(batch)
            except NumericalFaultError as fault:
                raise NumericalFaultError(_fault_message(f"{fault} at {where}", kept)) from None
            except (PplVaeError, *DEVICE_ERRORS):
                raise
            except Exception as error:
                fault = _program_step_error(error, where, kept)
                if fault is None:  # not the program's: the package's bug keeps its traceback
                    raise
                raise fault from error
            total_loss += loss
            seen += _as_tuple(batch)[0].shape[0]
            if step_number % 10 == 0 or step_number == num_steps:
                bar.set_postfix_str(f"ELBO {-total_loss / seen:.2f} nats/image")
    finally:
        bar.close()
    return -total_loss / seen, num_steps


def _program_step_error(error: Exception, where: str, kept: str) -> PplVaeError | None:
    """A training step's exception as one line when it came from the user's program (its traceback passes through
    the user's code, e.g. a raise in its model); None for anything else."""
    from .user_code import describe_user_error

    described = describe_user_error(error)
    if described is None:
        return None
    return PplVaeError(f"the program raised {described} at {where}; the last good state is kept: {kept}")


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
        loss = float(svi.loss_and_grads(svi.model, svi.guide, *_as_tuple(batch)))
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
    (:func:`ppl_vae.distributed.checked_ddp_step`). ``params``: the module's trainable parameters, when the
    caller keeps the list (found on every call otherwise).
    """
    if params is None:
        params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    with _faults_as_errors():
        local_loss = loss_module(*_as_tuple(batch))
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


class Engine:
    """How a training step is computed and applied; every engine reads the same Pyro programs.

    ``step(batch)`` returns the loss (nats summed over the minibatch) after a checked update;
    ``stop_requested()`` says, before a step, whether to stop (Ctrl-C) -- on several processes,
    what all of them agreed on.
    """

    optimizer_format = OPTIMIZER_FORMAT_TORCH

    def begin_epoch(self, stop: "StopRequest") -> None:
        self.stop = stop

    def stop_requested(self) -> bool:
        return self.stop.requested


class SviEngine(Engine):
    """Training steps with ``SVI(model, guide, Pyro's Adam, objective)``: the reference path (``--engine svi``).

    Pyro's optimizer keeps one torch Adam per parameter, with the learning-rate schedule
    of :func:`make_optimizer`; checkpoints hold its state (format "pyro").
    """

    optimizer_format = OPTIMIZER_FORMAT_PYRO

    def __init__(self, vae: torch.nn.Module, config: TrainConfig, max_plate_nesting: int = 1):
        self.config = config
        self.optimizer = make_optimizer(config)
        objective = make_objective(config.objective, config.particles, max_plate_nesting)
        self.svi = SVI(vae.model, vae.guide, self.optimizer, loss=objective)

    def step(self, batch: torch.Tensor) -> float:
        return checked_svi_step(self.svi, batch, self.config.clip_norm)

    def learning_rate(self) -> float:
        return current_learning_rate(self.optimizer, self.config)

    def end_epoch(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.get_state(), "optimizer_format": self.optimizer_format}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        # Pyro's optimizer applies saved state by parameter name, lazily, and ignores names it never meets:
        # a checkpoint of another naming would silently restart Adam's moments, so it is refused.
        names = list(checkpoint["optimizer"])
        if names and not all(name.startswith("program$$$") for name in names):
            raise RunDirectoryError(
                "the checkpoint's optimizer state names its parameters as earlier versions of ppl_vae did "
                f"(e.g. {names[0]!r}): resume it with the version that wrote it, or start a new run"
            )
        self.optimizer.set_state(checkpoint["optimizer"])


class ModuleEngine(Engine):
    """Training steps on the loss as a torch module (:func:`ppl_vae.objectives.make_loss_module`) with one
    ``torch.optim.Adam`` over all parameters and the schedule of :func:`make_torch_optimizer` (Adam works
    elementwise: the same updates as Pyro's per-parameter Adam). Checkpoints hold the torch optimizer and
    scheduler (format "torch")."""

    def __init__(self, vae: torch.nn.Module, config: TrainConfig, max_plate_nesting: int = 1, compiled: bool = True):
        self.config = config
        self.loss = make_loss_module(vae, config.objective, config.particles, compiled=compiled,
                                     max_plate_nesting=max_plate_nesting)
        self.optimizer, self.scheduler = make_torch_optimizer(vae.parameters(), config)
        self.params = [p for p in self.loss.parameters() if p.requires_grad]

    def step(self, batch: torch.Tensor) -> float:
        return checked_module_step(self.loss, self.optimizer, batch, self.config.clip_norm, params=self.params)

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def end_epoch(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "optimizer_format": self.optimizer_format}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])


class CompiledEngine(ModuleEngine):
    """Training steps on the compiled loss (``--engine jit``): the fast path.

    The loss is :class:`ppl_vae.objectives.CompiledVAELoss`, the VAE programs' ELBO
    compiled by Pyro's ``JitTrace_ELBO``; one ``torch.optim.Adam`` over all parameters with
    the schedule of :func:`make_torch_optimizer` (Adam works elementwise: the same updates
    as Pyro's per-parameter Adam). Checkpoints hold the torch optimizer and scheduler
    (format "torch"). ``ppl-vae bench`` measures the gain (variant ``module-jit``).
    """

    def __init__(self, vae: torch.nn.Module, config: TrainConfig, max_plate_nesting: int = 1):
        super().__init__(vae, config, max_plate_nesting, compiled=True)


ENGINE_CLASSES = {"svi": SviEngine, "jit": CompiledEngine}

COMPILED_LOSS_RTOL = 1e-4  # of the first-batch check: the compiled loss and gradients against Trace_ELBO's


@dataclass(frozen=True)
class EngineChoice:
    """Which engine a run trains with (``engine``: svi or jit), what was asked for, and why; in config.json."""

    requested: str
    engine: str
    reason: str
    check_seconds: float = 0.0  # of the first-batch comparison (it compiles a throw-away loss), 0 when not run

    def describe(self) -> str:
        return f"{self.engine} ({'--engine ' + self.requested + ': ' if self.requested != self.engine else ''}{self.reason})"


def choose_engine(
    config: TrainConfig, program: torch.nn.Module, first_batch: tuple[torch.Tensor, ...], max_plate_nesting: int,
    device: torch.device, *, structure: ProgramStructure | None = None,
    second_batch: tuple[torch.Tensor, ...] | None = None,
) -> EngineChoice:
    """The engine for ``config.engine`` on ``program``: the compiled loss where it is checked, SVI otherwise.

    ``auto`` takes the compiled loss (``jit``) when the objective has a working compiled version
    (``--objective elbo``), Pyro's validation is off (its checks run on the SVI path), the device is
    the CPU (where it is measured faster; on CUDA it is not yet measured, so SVI stays the default
    there), every guide site is reparameterized and none is marked for enumeration
    (:func:`ppl_vae.objectives.site_kind_problem`; ``structure`` is the program's, traced on
    ``first_batch`` when not given) and, on ``first_batch`` with the draws held fixed, its loss and
    gradients equal ``Trace_ELBO``'s to relative tolerance :data:`COMPILED_LOSS_RTOL`, with a
    faithful trace (no ``TracerWarning`` from the program, no Python state it changes, and equal
    again when replayed on ``second_batch``: :func:`ppl_vae.objectives.compiled_loss_problem`).
    ``jit`` is checked the same way: an unfaithful trace is refused with its reason
    (:class:`~ppl_vae.errors.ModelStructureError`), a first-batch difference falls back to SVI with a
    warning; ``svi`` is taken as asked.
    """
    requested = config.engine
    if requested == "svi":
        return EngineChoice(requested, "svi", "as asked")
    if requested == "auto":
        if config.objective not in COMPILED_OBJECTIVES:
            return EngineChoice(requested, "svi", f"--objective {config.objective} has no working compiled loss in "
                                                  f"Pyro {pyro.__version__}")
        if config.pyro_validation:
            return EngineChoice(requested, "svi", "Pyro's validation is on, and its checks run on the SVI path only")
        if device.type != "cpu":
            return EngineChoice(requested, "svi", f"the compiled loss is not yet measured on {device.type}; "
                                                  "--engine jit uses it there")
    if structure is None:
        with torch.no_grad():
            structure = inspect_program(program.model, program.guide, first_batch)
    started = time.perf_counter()
    statistics = running_statistics_problem(program)
    problem = site_kind_problem(structure) or (UnfaithfulTrace(statistics) if statistics else None) or compiled_loss_problem(
        program, first_batch, config.particles, max_plate_nesting, rtol=COMPILED_LOSS_RTOL, second_batch=second_batch)
    seconds = time.perf_counter() - started
    if isinstance(problem, UnfaithfulTrace) and requested == "jit":
        raise ModelStructureError(f"--engine jit cannot train this program faithfully: {problem}. Train it with "
                                  "--engine svi (or auto, which chooses svi for it)")
    if problem:
        return EngineChoice(requested, "svi", problem, seconds)
    second = ", and on a second batch through the same graph" if second_batch is not None else ""
    return EngineChoice(requested, "jit", f"the compiled loss and its gradients equal Trace_ELBO's on the first batch "
                                          f"with the same draws, to rtol {COMPILED_LOSS_RTOL:g}{second}", seconds)


def _fault_message(what: str, kept: str) -> str:
    return (
        f"{what}: training diverged and was stopped before that update was applied. Likely causes: a learning "
        "rate too high (try a smaller --lr), exploding gradients (try --clip-norm, e.g. 100), data outside the "
        "likelihood's support, or an encoder or decoder scale collapsing to 0 or overflowing. "
        f"The last good state is kept: {kept}. Resuming would repeat the same steps, so start a new run (or "
        "--overwrite) with changed settings."
    )


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a request to stop before the next training step.

    Training then stops with its run directory consistent (see :func:`train`); a
    second Ctrl-C raises ``KeyboardInterrupt`` at once. Where a handler cannot be set
    (outside the main thread) or SIGINT is ignored, nothing changes.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping before the next training step (press again to stop at once)", file=sys.stderr, flush=True)

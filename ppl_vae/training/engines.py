r"""Engines: how a training step is computed and applied. Every engine reads the same Pyro programs.

* :class:`SviEngine` -- ``SVI(model, guide, Pyro's Adam, objective)``: the reference path (``--engine svi``).
* :class:`ModuleEngine` -- the objective as a torch module (Pyro's ``ELBOModule``, or with ``compiled=True``
  the loss compiled by ``JitTrace_ELBO``: ``--engine jit``, the fast path) and one torch Adam.
* :class:`DdpEngine` -- the module engine in ``DistributedDataParallel`` on several processes: every process
  draws the same global minibatch B and back-propagates W L(B_r) for its contiguous share B_r, W the number
  of processes; DDP averages the gradients, which gives the gradient of L(B) (:mod:`ppl_vae.distributed`).

:func:`choose_engine` decides which engine a run uses for ``--engine auto`` (the compiled loss where it is
checked equal to ``Trace_ELBO``'s), and :class:`EngineChoice` records the choice and its reason in config.json.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyro
import torch
import torch.distributed as dist
from pyro.infer import SVI
from torch.nn.parallel import DistributedDataParallel

from ..errors import ModelStructureError, PplVaeError, RunDirectoryError
from ..evaluate import ProgramStructure, inspect_program
from ..gradient_estimators import make_gradient_objective
from ..modes import running_statistics_problem
from ..objectives import (
    COMPILED_OBJECTIVES,
    UnfaithfulTrace,
    compiled_loss_problem,
    make_loss_module,
    ProgramLoss,
    make_objective,
    site_kind_problem,
)
from ..process_group import ProcessGroup, agree_to_stop
from .config import (
    OPTIMIZER_FORMAT_PYRO,
    OPTIMIZER_FORMAT_TORCH,
    TrainConfig,
    current_learning_rate,
    make_optimizer,
    set_learning_rate,
)
from .interrupts import StopRequest
from .steps import checked_module_step, checked_svi_step


def training_objective(config: TrainConfig, max_plate_nesting: int = 1, enumerated: bool = False) -> Any:
    """The Pyro ELBO a run trains with: ``--objective`` with the ``--gradient`` estimator (STL, DReG: see
    :mod:`ppl_vae.gradient_estimators`; standard: :func:`ppl_vae.objectives.make_objective`, ``TraceEnum_ELBO``
    when ``enumerated``: the guide marks sites for enumeration)."""
    if config.gradient != "standard":
        return make_gradient_objective(config.gradient, config.objective, config.particles, max_plate_nesting)
    return make_objective(config.objective, config.particles, max_plate_nesting, enumerated=enumerated)


class Engine(Protocol):
    """What the training loop needs of an engine.

    ``step(batch)`` returns the loss (nats summed over the minibatch) after a checked update;
    ``stop_requested()`` says, before a step, whether to stop (Ctrl-C) -- on several processes,
    what all of them agreed on. ``set_learning_rate(lr)`` sets the rate of the steps that follow (the loop's
    :func:`ppl_vae.training.config.learning_rate_at`, before each epoch and before each checkpoint);
    ``state_dict()`` is the optimizer's part of a checkpoint, in ``optimizer_format``.
    """

    optimizer_format: str

    def begin_epoch(self, stop: StopRequest) -> None: ...
    def stop_requested(self) -> bool: ...
    def step(self, batch: torch.Tensor | tuple) -> float: ...
    def learning_rate(self) -> float: ...
    def set_learning_rate(self, lr: float) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, checkpoint: dict[str, Any]) -> None: ...


class _LocalStop:
    """Ctrl-C as this process saw it: what one process stops on."""

    def begin_epoch(self, stop: StopRequest) -> None:
        self.stop = stop

    def stop_requested(self) -> bool:
        return self.stop.requested


class SviEngine(_LocalStop):
    """Training steps with ``SVI(model, guide, Pyro's Adam, objective)``: the reference path (``--engine svi``).

    Pyro's optimizer keeps one torch Adam per parameter, with the learning-rate schedule
    of :func:`ppl_vae.training.config.make_optimizer`; checkpoints hold its state (format "pyro").
    """

    optimizer_format = OPTIMIZER_FORMAT_PYRO

    def __init__(self, program: torch.nn.Module, config: TrainConfig, max_plate_nesting: int = 1,
                 enumerated: bool = False):
        self.config = config
        self.optimizer = make_optimizer(config)
        # enumerated: the guide marks sites for enumeration, summed out by TraceEnum_ELBO
        objective = training_objective(config, max_plate_nesting, enumerated)
        self.svi = SVI(program.model, program.guide, self.optimizer, loss=objective)
        self.restored: dict[str, Any] | None = None  # a checkpoint's optimizer state, until Pyro takes it

    def step(self, batch: torch.Tensor | tuple) -> float:
        return checked_svi_step(self.svi, batch, self.config.clip_norm)

    def learning_rate(self) -> float:
        return current_learning_rate(self.optimizer, self.config)

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)
        if self.restored is not None:
            # Pyro loads a checkpoint's Adam state (rate included) when it first meets each parameter, after this
            # call: the rate goes into that state too, so the rate of the schedule applies from the first step.
            self.optimizer.set_state({name: _with_rate(state, lr) for name, state in self.restored.items()})
            self.restored = None

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
        self.restored = checkpoint["optimizer"]


def _with_rate(state: dict[str, Any], lr: float) -> dict[str, Any]:
    """A Pyro optimizer state of one parameter (its Adam's under "optimizer", beside its scheduler's) at rate ``lr``."""
    adam = state.get("optimizer", state)
    adam = {**adam, "param_groups": [{**group, "lr": lr} for group in adam["param_groups"]]}
    return {**state, "optimizer": adam} if "optimizer" in state else adam


class ModuleEngine(_LocalStop):
    """Training steps on the loss as a torch module (:func:`ppl_vae.objectives.make_loss_module`), one torch Adam.

    ``compiled``: the loss compiled by Pyro's ``JitTrace_ELBO`` (:class:`ppl_vae.objectives.CompiledProgramLoss`,
    ``--engine jit``, the fast path; ``ppl-vae bench`` measures the gain, variant ``module-jit``); otherwise
    Pyro's ``ELBOModule``. One ``torch.optim.Adam`` over all parameters with the schedule of
    :func:`ppl_vae.training.config.make_optimizer` (Adam works elementwise: the same updates as Pyro's
    per-parameter Adam). Checkpoints hold the torch optimizer and scheduler (format "torch").
    """

    optimizer_format = OPTIMIZER_FORMAT_TORCH

    def __init__(self, program: torch.nn.Module, config: TrainConfig, max_plate_nesting: int = 1,
                 compiled: bool = True, enumerated: bool = False):
        self.config = config
        if config.gradient != "standard":  # STL/DReG: Pyro ELBO classes with a differentiable_loss, not compiled
            self.loss = ProgramLoss(program, training_objective(config, max_plate_nesting))
        else:
            self.loss = make_loss_module(program, config.objective, config.particles, compiled=compiled,
                                         max_plate_nesting=max_plate_nesting, enumerated=enumerated)
        self.optimizer, self.scheduler = make_optimizer(config, program.parameters())
        self.params = [p for p in self.loss.parameters() if p.requires_grad]

    def step(self, batch: torch.Tensor | tuple) -> float:
        return checked_module_step(self.loss, self.optimizer, batch, self.config.clip_norm, params=self.params)

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        # "scheduler": the never-stepped scheduler's state, kept so that earlier versions can read the checkpoint
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "optimizer_format": self.optimizer_format}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])  # its param groups hold the next epoch's rate


def CompiledEngine(program: torch.nn.Module, config: TrainConfig, max_plate_nesting: int = 1,  # noqa: N802
                   enumerated: bool = False) -> ModuleEngine:
    """The ``--engine jit`` engine: :class:`ModuleEngine` with the compiled loss (a name kept for callers)."""
    return ModuleEngine(program, config, max_plate_nesting, compiled=True, enumerated=enumerated)


ENGINE_CLASSES = {"svi": SviEngine, "jit": CompiledEngine}  # the engines one process trains with, by name


def make_engine(engine: str, program: torch.nn.Module, config: TrainConfig, max_plate_nesting: int = 1,
                enumerated: bool = False) -> Engine:
    """The one-process engine named ``engine`` (svi or jit) over ``program``; ``enumerated``: TraceEnum_ELBO."""
    return ENGINE_CLASSES[engine](program, config, max_plate_nesting, enumerated=enumerated)


def optimizer_format_of(engine: str) -> str:
    """The optimizer format of the checkpoints the one-process engine ``engine`` writes."""
    return OPTIMIZER_FORMAT_PYRO if engine == "svi" else OPTIMIZER_FORMAT_TORCH


COMPILED_LOSS_RTOL = 1e-4  # of the first-batch check: the compiled loss and gradients against Trace_ELBO's


@dataclass(frozen=True)
class EngineChoice:
    """Which engine a run trains with (``engine``: svi or jit), what was asked for, and why; in config.json."""

    requested: str
    engine: str
    reason: str
    check_seconds: float = 0.0  # of the first-batch comparison (it compiles a throw-away loss), 0 when not run
    # On several processes: the parameters the first-batch check found without a gradient on some kind of step
    # (:func:`parameters_without_gradient`), so DistributedDataParallel looks for unused ones every step; the
    # reason, appended to ``reason``, says on which steps.
    unused_parameters: tuple[str, ...] = ()

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
    if requested == "auto" and config.gradient != "standard":
        return EngineChoice(requested, "svi", f"--gradient {config.gradient}: the compiled loss (JitTrace_ELBO) has no "
                                              f"{config.gradient.upper()} estimator, SVI runs it")
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
    enumerated = bool(structure.enumerated)  # then JitTraceEnum_ELBO, checked against TraceEnum_ELBO
    problem = site_kind_problem(structure, enumerated=enumerated) or (
        UnfaithfulTrace(statistics) if statistics else None) or compiled_loss_problem(
        program, first_batch, config.particles, max_plate_nesting, rtol=COMPILED_LOSS_RTOL, second_batch=second_batch,
        enumerated=enumerated)
    seconds = time.perf_counter() - started
    if isinstance(problem, UnfaithfulTrace) and requested == "jit":
        raise ModelStructureError(f"--engine jit cannot train this program faithfully: {problem}. Train it with "
                                  "--engine svi (or auto, which chooses svi for it)")
    if problem:
        return EngineChoice(requested, "svi", str(problem), seconds)  # text: checkpoints hold plain data only
    second = ", and on a second batch through the same graph" if second_batch is not None else ""
    reference = "TraceEnum_ELBO" if enumerated else "Trace_ELBO"
    return EngineChoice(requested, "jit", f"the compiled loss and its gradients equal {reference}'s on the first batch "
                                          f"with the same draws, to rtol {COMPILED_LOSS_RTOL:g}{second}", seconds)



def resumed_engine_choice(choice: EngineChoice, config: TrainConfig, saved: dict | None, run_dir: Path) -> EngineChoice:
    """A resumed run keeps its engine (its optimizer state is in that engine's format) and its record of why."""
    if choice.engine != config.engine:
        raise RunDirectoryError(
            f"{run_dir} was trained with --engine {config.engine}, which cannot continue it now ({choice.reason}); "
            "resume it with the version of ppl_vae (and torch, Pyro) that started it, or start a new run"
        )
    if saved and saved.get("engine") == choice.engine:
        # the unused parameters as found now (on this number of processes), the rest as recorded
        return dataclasses.replace(choice, requested=saved.get("requested", config.engine),
                                   reason=saved.get("reason", choice.reason))
    return choice



def check_trainable_on_processes(config: TrainConfig) -> None:
    """Refuse an objective that cannot be trained as a torch module (iwae), before anything is written."""
    objective = training_objective(config)
    if config.engine != "jit" and not callable(getattr(objective, "differentiable_loss", None)):
        raise PplVaeError(
            f"--objective {config.objective} cannot be trained on several processes: Pyro's {type(objective).__name__} "
            "has no differentiable_loss, which a torch module (and so DistributedDataParallel) needs; train it with "
            "--devices 1"
        )


def parameters_without_gradient(trained: torch.nn.Module, config: TrainConfig, batch: tuple[torch.Tensor, ...],
                                max_plate_nesting: int = 1, enumerated: bool = False,
                                program: torch.nn.Module | None = None) -> tuple[str, ...]:
    """The trainable parameters of ``trained`` that get no gradient from the run's loss on ``batch``, named as in
    ``program`` (the user's, which ``trained`` wraps; default ``trained``).

    DistributedDataParallel must be told of such parameters (``find_unused_parameters``), or it fails on the next
    step. The loss is the uncompiled one (a throw-away :func:`ppl_vae.objectives.make_loss_module`: the run's
    own compiles on its first call); the random streams and the module's buffers (running statistics) are left as
    they were, and no ``.grad`` is written.
    """
    if config.gradient != "standard":
        loss = ProgramLoss(trained, training_objective(config, max_plate_nesting))
    else:
        loss = make_loss_module(trained, config.objective, config.particles, compiled=False,
                                max_plate_nesting=max_plate_nesting, enumerated=enumerated)
    named = [(name, p) for name, p in trained.named_parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in trained.named_buffers()}
    device = batch[0].device
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            value = loss(*batch)
            # a loss that depends on no parameter at all leaves every one unused (autograd.grad would refuse it)
            grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True) if named and \
                value.requires_grad else [None] * len(named)
    finally:
        with torch.no_grad():
            for name, b in trained.named_buffers():
                b.copy_(buffers[name])
    names = {id(p): name for name, p in (program or trained).named_parameters()}
    return tuple(names.get(id(p), name) for (name, p), grad in zip(named, grads) if grad is None)


def shard_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Process ``rank``'s contiguous share of the rows of ``batch``: shares in rank order, sizes differing by at most 1."""
    return torch.tensor_split(batch, world_size)[rank]


def shard_batch(batch: torch.Tensor | tuple, rank: int, world_size: int) -> tuple[tuple[torch.Tensor, ...], float]:
    """Process ``rank``'s share of a global minibatch ``x`` or ``(x, *cond)`` and the weight of its loss.

    Every tensor of the batch (x, the labels, each conditioning array) is cut at the same rows
    (:func:`shard_rows`), so row i of each is still the same datapoint. A share with no rows (a minibatch
    smaller than the number of processes) is the first row at weight 0: every process must take part in the
    all-reduce of the step (:func:`checked_ddp_step`), and adds nothing to it.
    """
    data = batch if isinstance(batch, tuple) else (batch,)
    shard = tuple(shard_rows(t, rank, world_size) for t in data)
    if shard[0].shape[0] == 0:
        return tuple(t[:1] for t in data), 0.0
    return shard, 1.0


def checked_ddp_step(
    loss_module: DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    shard: torch.Tensor | tuple,
    world_size: int,
    clip_norm: float | None = None,
    stop_requested: bool = False,
    weight: float = 1.0,
) -> tuple[float, bool]:
    """One step of distributed training on this process's ``shard`` of a global minibatch B.

    Back-propagates ``world_size * L(shard)``; DDP averages the gradients over the
    processes, which gives the gradient of L(B) = sum_r L(shard_r) (:mod:`ppl_vae.distributed`).
    One all-reduce of two numbers then gives every process the global loss L(B) and
    whether any of them was asked to stop (Ctrl-C). As :func:`ppl_vae.training.steps.checked_svi_step`,
    the global gradient norm is computed (and clipped to ``clip_norm``); a NaN or infinite
    loss or norm zeroes the gradients and raises :class:`NumericalFaultError` before the
    update. The averaged gradients and the global loss are the same on every process, so
    all of them take the same decision. ``weight`` multiplies this process's loss: a process
    whose share of the minibatch is empty (a minibatch smaller than the number of processes)
    passes one row with weight 0, since every process must take part in the all-reduce.

    Returns L(B) (nats, summed over the global minibatch) and whether to stop before the next step.
    """
    agreed: dict[str, bool] = {}

    def total_loss(local_loss: torch.Tensor) -> float:
        totals = torch.stack([local_loss.float() * weight, local_loss.new_tensor(float(stop_requested))])
        dist.all_reduce(totals)
        agreed["stop"] = bool(totals[1] > 0)
        return float(totals[0])

    loss = checked_module_step(loss_module, optimizer, shard, clip_norm, loss_scale=world_size * weight,
                                        total_loss=total_loss)
    return loss, agreed["stop"]


class DdpEngine(ModuleEngine):
    """Training steps on several processes: the loss module (compiled with ``--engine jit``) in
    DistributedDataParallel, one torch Adam.

    Every process draws the same global minibatch and back-propagates its contiguous share
    (:func:`shard_rows`, :func:`checked_ddp_step`); the all-reduce of each step also carries the
    processes' Ctrl-C requests, so all of them stop before the same step.
    """

    def __init__(self, program: torch.nn.Module, config, max_plate_nesting: int, context: ProcessGroup,
                 enumerated: bool = False, unused_parameters: tuple[str, ...] = ()):
        super().__init__(program, config, max_plate_nesting, compiled=config.engine == "jit", enumerated=enumerated)
        self.context = context
        device = context.device
        # unused_parameters: what the first-batch check found without a gradient on some kind of step (e.g. the
        # classifier q(y | x) on labelled steps at --alpha 0), which DDP must then look for every step (an extra
        # pass over the graph, and torch warns when it finds none: so only then).
        self.ddp = DistributedDataParallel(self.loss, device_ids=[device.index] if device.type == "cuda" else None,
                                           find_unused_parameters=bool(unused_parameters))
        self.stopping = False

    def begin_epoch(self, stop) -> None:
        super().begin_epoch(stop)
        self.stopping = agree_to_stop(stop.requested, self.context.device)

    def stop_requested(self) -> bool:
        return self.stopping  # what the processes agreed on in the previous step's all-reduce

    def step(self, batch) -> float:
        world_size = self.context.world_size
        shard, weight = shard_batch(batch, self.context.rank, world_size)
        try:
            loss, self.stopping = checked_ddp_step(self.ddp, self.optimizer, shard, world_size, self.config.clip_norm,
                                                   self.stop.requested, weight)
        except RuntimeError as error:
            if "find_unused_parameters" not in str(error):
                raise
            # a parameter without a gradient on a step whose kind the first-batch check did not see
            raise ModelStructureError(
                "on several processes, a training step left some of the program's parameters without a gradient, "
                "although they had one on the first batches checked before training (the parameters a step uses "
                "depend on its data): train this program with --devices 1") from error
        return loss

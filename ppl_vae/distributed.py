r"""Scale-out: training and evaluation on several processes with ``torch.distributed``.

Processes are started by ``torchrun`` (``torch.distributed.run``, PyTorch's own launcher):
``ppl-vae train --devices N`` re-launches itself through it (:func:`launch`), or run
``torchrun ... -m ppl_vae train ...`` yourself. Each process reads its rank from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), uses ``cuda:LOCAL_RANK`` with the NCCL backend when CUDA is there and the
CPU with gloo otherwise (:func:`initialize`).

**Training** (:func:`train_distributed`) wraps the loss in ``DistributedDataParallel``;
no gradient is averaged by hand. The loss is Pyro's: :class:`~ppl_vae.objectives.VAELoss` is the
``ELBOModule`` that ``Trace_ELBO()(model, guide)`` returns, with the VAE registered as a
submodule so that its parameters are the module's (with ``--engine jit``, the compiled
:class:`~ppl_vae.objectives.CompiledVAELoss`). Every process draws the same global
minibatch B (same permutation, same dynamic binarization: a generator seeded with the run's
seed and the epoch) and keeps its contiguous share B_r (:func:`shard_rows`). With
L(B) = sum_{n in B} l_n the loss single-process SVI minimizes (the objective summed over
the minibatch), process r back-propagates W L(B_r), W the number of processes; DDP
averages gradients over processes, so every process applies

.. math::

    \frac{1}{W} \sum_{r=1}^{W} \nabla\big(W\, L(B_r)\big) = \nabla \sum_r L(B_r) = \nabla L(B),

the single-process gradient of the same global minibatch, whatever the shard sizes (the
scale is W for every process, also when W does not divide |B|). ``--batch-size`` is the
global minibatch. Only rank 0 writes ``config.json``, ``metrics.jsonl``, checkpoints and
``test.json``; it reads the checkpoint on ``--resume`` and sends it to every process, so
only rank 0 needs the run directory (every process needs MNIST).

Random streams: the data stream is seeded per epoch from (seed, epoch), the Monte Carlo
draws of process r from (seed, epoch, r). A resumed run therefore re-seeds at the start of
the epoch it continues with and ends exactly as an uninterrupted run with the same number
of processes (on the CPU); no RNG state is saved. With another number of processes the data
are the same but the draws are not.

**Evaluation** (:func:`evaluate_per_datapoint`, in :mod:`ppl_vae.blocked_evaluation`, importable from here) cuts the datapoints into fixed blocks of
consecutive indices, seeds block b from (seed, b) alone, deals the blocks round-robin to the
processes and all-gathers the per-datapoint results in datapoint order: the result does not
depend on the number of processes (exactly, on the CPU).

The communication itself (joining the process group, rank 0's work shared, gathering, agreeing to
stop, seeds, launching through torchrun) is :mod:`ppl_vae.process_group`, which knows nothing of
training; its functions are importable from here too.

Not supported on several processes: ``--objective iwae`` (Pyro's ``RenyiELBO`` has no
``differentiable_loss``, which a torch module needs).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyro
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import runs
from . import train as training
from .blocked_evaluation import (  # noqa: F401 -- re-exported: ppl_vae.distributed.evaluate_per_datapoint (tests, cli)
    EVALUATION_BLOCK_SIZE,
    PSIS_PER_DATAPOINT,
    PerDatapointEvaluation,
    evaluate_per_datapoint,
)
from .errors import PplVaeError, PplVaeWarning
from .model import VAEConfig
from .objectives import make_objective
from .process_group import (  # noqa: F401 -- re-exported: the process-group functions were first defined here
    DEFAULT_RDZV_ID,
    TORCHRUN_VARIABLES,
    ProcessGroup,
    agree_to_stop,
    all_gather_objects,
    check_launch,
    current,
    derive_seed,
    launch,
    launch_command,
    launched_by_torchrun,
    on_main,
    rank_and_size,
    seeded,
    should_launch,
    shutdown,
    usable_cores,
)
from .process_group import initialize as join_process_group

T = TypeVar("T")


# --- Processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context(ProcessGroup):
    """This process's place in the process group (:class:`ppl_vae.process_group.ProcessGroup`), with what the
    training loop needs of it: the training strategy of several processes."""

    # What the training loop (ppl_vae.train._train) needs of the process group; ppl_vae.train.OneProcess is the
    # other implementation.

    def select_device(self, config) -> torch.device:
        return self.device

    def on_main(self, compute: Callable[[], T]) -> T:
        return on_main(compute)

    def agree_to_stop(self, requested: bool) -> bool:
        return agree_to_stop(requested, self.device)

    def check_config(self, config) -> None:
        check_trainable_on_processes(config)

    def check_checkpoint(self, checkpoint: dict[str, Any], config, run_dir: Path) -> None:
        training.check_optimizer_format(checkpoint, training.OPTIMIZER_FORMAT_TORCH, run_dir)
        if checkpoint.get("world_size", 1) != self.world_size:
            warnings.warn(
                f"resuming a run saved by {checkpoint.get('world_size', 1)} process(es) on {self.world_size}: the data "
                "are the same, but the Monte Carlo draws differ from those of an uninterrupted run",
                PplVaeWarning,
                stacklevel=2,
            )

    def make_engine(self, program: torch.nn.Module, config, max_plate_nesting: int) -> "DdpEngine":
        return DdpEngine(program, config, max_plate_nesting, self)

    def epoch_batches(self, data, config, epoch: int):
        """The epoch's global minibatches, the same on every process: the data stream is seeded from (seed, epoch),
        this process's Monte Carlo draws from (seed, epoch, rank), so an epoch runs again exactly after a resume."""
        generator = torch.Generator(device=data.train.device).manual_seed(derive_seed(config.seed, "data", epoch))
        pyro.set_rng_seed(derive_seed(config.seed, "draws", epoch, self.rank))
        return data.train_batches(config.batch_size, generator=generator, labels=config.labels)

    def checkpoint_extra(self, device: torch.device) -> dict[str, Any]:
        return {"world_size": self.world_size}  # no RNG state: every epoch seeds its own streams

    def restore(self, checkpoint: dict[str, Any], device: torch.device) -> None:
        """Nothing to restore: the streams are seeded per epoch."""


def initialize(device: str = "auto") -> Context:
    """Join the process group described by torchrun's environment variables (:func:`ppl_vae.process_group.initialize`);
    returns this process's :class:`Context`. Calling it again returns the same context."""
    return join_process_group(device, kind=Context)


# --- Training -----------------------------------------------------------------------------------


def check_trainable_on_processes(config) -> None:
    """Refuse an objective that cannot be trained as a torch module (iwae), before anything is written."""
    objective = make_objective(config.objective, config.particles)
    if config.engine != "jit" and not callable(getattr(objective, "differentiable_loss", None)):
        raise PplVaeError(
            f"--objective {config.objective} cannot be trained on several processes: Pyro's {type(objective).__name__} "
            "has no differentiable_loss, which a torch module (and so DistributedDataParallel) needs; train it with "
            "--devices 1"
        )


def shard_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Process ``rank``'s contiguous share of the rows of ``batch``: shares in rank order, sizes differing by at most 1."""
    return torch.tensor_split(batch, world_size)[rank]


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
    processes, which gives the gradient of L(B) = sum_r L(shard_r) (module docstring).
    One all-reduce of two numbers then gives every process the global loss L(B) and
    whether any of them was asked to stop (Ctrl-C). As :func:`ppl_vae.train.checked_svi_step`,
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

    loss = training.checked_module_step(loss_module, optimizer, shard, clip_norm, loss_scale=world_size * weight,
                                        total_loss=total_loss)
    return loss, agreed["stop"]


def train_distributed(
    run_dir: str | Path,
    config=None,
    model_config: VAEConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`ppl_vae.train.train` on every process of the process group (:func:`initialize` first).

    The same loop, run directory, options and guarantees (resume, Ctrl-C, numerical faults,
    damaged checkpoints), with DistributedDataParallel (:class:`DdpEngine`) instead of ``SVI``;
    see the module docstring for the loss scaling and the random streams. The device is the
    process group's (see :func:`initialize`), not ``config.device``. Returns the final test
    evaluation on every process; rank 0 writes every file.
    """
    context = current()
    if context is None:
        raise PplVaeError("train_distributed needs a process group: call ppl_vae.distributed.initialize() under torchrun")
    return training.train(run_dir, config, model_config, resume=resume, overwrite=overwrite, progress=progress,
                          processes=context)


class DdpEngine(training.ModuleEngine):
    """Training steps on several processes: the loss module (compiled with ``--engine jit``) in
    DistributedDataParallel, one torch Adam.

    Every process draws the same global minibatch and back-propagates its contiguous share
    (:func:`shard_rows`, :func:`checked_ddp_step`); the all-reduce of each step also carries the
    processes' Ctrl-C requests, so all of them stop before the same step.
    """

    def __init__(self, program: torch.nn.Module, config, max_plate_nesting: int, context: "Context"):
        super().__init__(program, config, max_plate_nesting, compiled=config.engine == "jit")
        self.context = context
        device = context.device
        self.ddp = DistributedDataParallel(self.loss, device_ids=[device.index] if device.type == "cuda" else None)
        self.stopping = False

    def begin_epoch(self, stop) -> None:
        super().begin_epoch(stop)
        self.stopping = agree_to_stop(stop.requested, self.context.device)

    def stop_requested(self) -> bool:
        return self.stopping  # what the processes agreed on in the previous step's all-reduce

    def step(self, batch) -> float:
        data = batch if isinstance(batch, tuple) else (batch,)
        rank, world_size = self.context.rank, self.context.world_size
        shard, weight = tuple(shard_rows(t, rank, world_size) for t in data), 1.0
        if shard[0].shape[0] == 0:  # fewer rows than processes: take part in the all-reduce with nothing
            shard, weight = tuple(t[:1] for t in data), 0.0
        loss, self.stopping = checked_ddp_step(self.ddp, self.optimizer, shard, world_size, self.config.clip_norm,
                                               self.stop.requested, weight)
        return loss


def load_run_everywhere(
    run_dir: str | Path, device: torch.device, trust_program: bool = False
) -> tuple[torch.nn.Module, dict]:
    """:func:`ppl_vae.train.load_run` with the files read by rank 0 only and sent to every process."""
    def read() -> tuple[dict, dict, int, str | None]:
        config = training.read_run_config(Path(run_dir))  # checked: a config.json handed over may hold anything
        checkpoint = runs.load_checkpoint(run_dir, map_location="cpu")
        return config, checkpoint["model"], checkpoint["epoch"], checkpoint.get("id")

    config, state, epoch, checkpoint_id = on_main(read)
    # The program's record (program.json and the copy of its file) is read on every process: with a program
    # other than the built-in VAE, every process needs the run directory (one machine).
    vae, description = training.build_run_program(run_dir, config, trust_program=trust_program)
    vae = vae.to(device)
    vae.load_state_dict(state)
    vae.eval()
    return vae, {**config, "epoch": epoch, "checkpoint_id": checkpoint_id, "description": description}

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

**Evaluation** (:func:`evaluate_per_datapoint`) cuts the datapoints into fixed blocks of
consecutive indices, seeds block b from (seed, b) alone, deals the blocks round-robin to the
processes and all-gathers the per-datapoint results in datapoint order: the result does not
depend on the number of processes (exactly, on the CPU).

Not supported on several processes: ``--objective iwae`` (Pyro's ``RenyiELBO`` has no
``differentiable_loss``, which a torch module needs).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import runs
from . import train as training
from .errors import (
    PplVaeError,
    PplVaeWarning,
)
from .evaluate import (
    EvidenceEstimate,
    check_data,
    elbo_decomposition,
    evidence_estimate,
)
from .model import VAEConfig
from .objectives import make_objective

# Datapoints per evaluation block: the unit of seeding and of work sharing (see evaluate_per_datapoint).
EVALUATION_BLOCK_SIZE = 100
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE")
DEFAULT_RDZV_ID = "ppl-vae"

T = TypeVar("T")


# --- Processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def describe(self, device: torch.device | None = None) -> str:
        return f"{self.device.type}, {self.world_size} process{'es' if self.world_size != 1 else ''} ({self.backend})"

    # What the training loop (ppl_vae.train._train) needs of the process group; ppl_vae.train.OneProcess is the
    # other implementation.

    def select_device(self, config) -> torch.device:
        return self.device

    def on_main(self, compute: Callable[[], T]) -> T:
        return on_main(compute)

    def agree_to_stop(self, requested: bool) -> bool:
        return _agree_to_stop(requested, self.device)

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


_CONTEXT: Context | None = None


def launched_by_torchrun() -> bool:
    """Whether this process runs under torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def initialize(device: str = "auto") -> Context:
    """Join the process group described by torchrun's environment variables; returns this process's context.

    The device is ``cuda:LOCAL_RANK`` with the NCCL backend when CUDA is available and
    ``device`` is ``"auto"`` or ``"cuda"``, else the CPU with gloo. Calling it again
    returns the same context.
    """
    global _CONTEXT
    if _CONTEXT is not None and dist.is_initialized():
        return _CONTEXT
    if not launched_by_torchrun():
        raise PplVaeError(
            "not started by torchrun: RANK and WORLD_SIZE are not set (use --devices N, or torchrun --nproc-per-node N "
            "-m ppl_vae ...)"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PplVaeError("--device cuda was asked for, but torch sees no CUDA GPU: use --device cpu or auto")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise PplVaeError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device != "cpu" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise PplVaeError(
                f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; start at most that "
                "many processes per machine (--devices)"
            )
        torch.cuda.set_device(local_rank)
        chosen, backend = torch.device("cuda", local_rank), "nccl"
    else:
        chosen, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    _CONTEXT = Context(rank, world_size, local_rank, chosen, backend)
    return _CONTEXT


def current() -> Context | None:
    """The context of this process when :func:`initialize` joined a process group, else None."""
    return _CONTEXT if _CONTEXT is not None and dist.is_initialized() else None


def shutdown() -> None:
    """Leave the process group (a no-op outside one)."""
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def _rank_and_size() -> tuple[int, int]:
    context = current()
    return (context.rank, context.world_size) if context is not None else (0, 1)


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its value sent to every process; an error there is raised on every process.

    For the work only rank 0 may do (creating the run directory, reading and repairing
    checkpoints). Outside a process group it is just ``compute()``.
    """
    context = current()
    if context is None or context.world_size == 1:
        return compute()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if context.is_main:
        try:
            payload = [("value", compute())]
        except PplVaeError as error:
            failure, payload = error, [("error", error)]
        except BaseException as error:  # noqa: BLE001 -- a bug, or Ctrl-C: the others must not wait forever
            failure = error
            payload = [("error", PplVaeError(f"rank 0 failed ({type(error).__name__}: {error})"))]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise value
    return value


def all_gather_objects(value: T) -> list[T]:
    """Every process's ``value``, in rank order (``[value]`` outside a process group)."""
    context = current()
    if context is None or context.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def derive_seed(*parts: int | str) -> int:
    """A seed in [0, 2**32) that depends on ``parts`` alone (e.g. the run's seed, a purpose, an epoch)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with Pyro's random streams (torch, CUDA, ``random``, NumPy) seeded by ``seed``; restore them after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        pyro.set_rng_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# --- Launching ----------------------------------------------------------------------------------


def check_launch(devices: int | None, num_nodes: int, rdzv_endpoint: str | None, device: str) -> None:
    """Refuse scale-out options that cannot work, before any process is started."""
    if devices is not None and devices < 1:
        raise PplVaeError(f"--devices must be at least 1, got {devices}")
    if num_nodes < 1:
        raise PplVaeError(f"--num-nodes must be at least 1, got {num_nodes}")
    if num_nodes > 1 and not rdzv_endpoint:
        raise PplVaeError(
            "--num-nodes above 1 needs --rdzv-endpoint HOST:PORT, an address of one of the machines that every "
            "machine can reach (the same on all of them)"
        )
    if launched_by_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if devices is not None and (devices != local or devices * num_nodes != world_size):
            raise PplVaeError(
                f"--devices {devices} --num-nodes {num_nodes} disagree with torchrun, which started {local} process(es) "
                f"on this machine and {world_size} in all: give the same numbers, or leave --devices out under torchrun"
            )
        return
    if device != "cpu" and torch.cuda.is_available() and devices is not None and devices > torch.cuda.device_count():
        raise PplVaeError(
            f"--devices {devices} asks for more GPUs than this machine has ({torch.cuda.device_count()}); "
            "one process per GPU"
        )
    cores = usable_cores()
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if on_cpu and num_nodes == 1 and devices is not None and devices > cores:
        raise PplVaeError(
            f"--devices {devices} asks for {devices} CPU processes on this machine, which has {cores} core(s) for this "
            f"process: give --devices {cores} or fewer (more processes than cores only wait for each other), or "
            "--num-nodes with --rdzv-endpoint where the processes run on several machines"
        )


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the system has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity mask
        return max(1, os.cpu_count() or 1)


def should_launch(devices: int | None, num_nodes: int) -> bool:
    """Whether ``ppl-vae`` must start itself through torchrun: several processes asked for, and not under torchrun yet."""
    return not launched_by_torchrun() and ((devices or 1) > 1 or num_nodes > 1)


def launch_command(
    argv: list[str], devices: int, num_nodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str = DEFAULT_RDZV_ID
) -> list[str]:
    """The torchrun command (``python -m torch.distributed.run``) that runs ``ppl-vae ARGV`` on ``devices`` processes per machine.

    One machine: ``--standalone`` (a local rendezvous on a free port). Several: the c10d
    rendezvous at ``rdzv_endpoint``, where every machine runs the same command.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices)]
    if num_nodes == 1:
        command.append("--standalone")
    else:
        command += ["--nnodes", str(num_nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(rdzv_endpoint),
                    "--rdzv-id", rdzv_id]
    return [*command, "-m", "ppl_vae", *argv]


def launch(argv: list[str], devices: int, num_nodes: int = 1, rdzv_endpoint: str | None = None,
           rdzv_id: str = DEFAULT_RDZV_ID) -> int:
    """Run ``ppl-vae ARGV`` under torchrun (:func:`launch_command`) and return its exit status.

    While it runs, this process ignores Ctrl-C: torchrun receives it too and stops its
    workers (``--resume`` continues from the last saved epoch).
    """
    command = launch_command(argv, devices, num_nodes, rdzv_endpoint, rdzv_id)
    print(f"launching: {' '.join(command)}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        code = process.wait()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code


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


def _agree_to_stop(requested: bool, device: torch.device) -> bool:
    """Whether any process was asked to stop (one all-reduce)."""
    flag = torch.tensor([float(requested)], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


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
        self.stopping = _agree_to_stop(stop.requested, self.context.device)

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


# --- Evaluation ---------------------------------------------------------------------------------


@dataclass
class PerDatapointEvaluation:
    """Per-datapoint results over all of ``x``, in datapoint order (float64 CPU tensors [N]).

    * ``decomposition`` -- as :func:`ppl_vae.evaluate.elbo_decomposition` returns (None when not asked for);
    * ``evidence`` -- an :class:`~ppl_vae.evaluate.EvidenceEstimate` (None when not asked for);
    * ``psis`` -- as the second value of :func:`ppl_vae.diagnostics.evidence_with_psis` (None unless asked for).
    """

    decomposition: dict | None
    evidence: EvidenceEstimate | None
    psis: dict | None


PSIS_PER_DATAPOINT = ("khat", "unreliable", "ess", "log_evidence", "psis_log_evidence")


def evaluate_per_datapoint(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *cond: torch.Tensor,
    num_samples: int | None = None,
    elbo_samples: int | None = None,
    seed: int = 0,
    psis: bool = False,
    chunk_size: int | None = None,
    block_size: int = EVALUATION_BLOCK_SIZE,
    progress: bool = False,
) -> PerDatapointEvaluation:
    """Importance-sampled log p(x) with ``num_samples`` draws and the ELBO decomposition with ``elbo_samples``, per datapoint.

    Positional tensors after x are per-datapoint conditioning data (as in
    :func:`ppl_vae.evaluate.elbo_decomposition`), cut into the same blocks as x.
    The datapoints are cut into blocks of ``block_size`` consecutive indices (the last may
    be smaller). Block b is evaluated on its own with Pyro's random streams seeded by
    ``derive_seed(seed, "block", b)``: first the evidence (with PSIS diagnostics when
    ``psis``), then the decomposition. Its draws therefore depend on (seed, b) alone, never
    on the process evaluating it. In a process group (:func:`initialize`) block b goes to
    rank b mod W, and the results are all-gathered and put back in datapoint order, so
    every process returns the same tensors as a single process would, exactly on the CPU
    (on GPUs, up to the determinism of CUDA kernels). The caller's random streams are
    restored afterwards. An error in any block (say, a non-finite evidence estimate) is
    raised on every process.
    """
    from .diagnostics import evidence_with_psis

    if num_samples is None and elbo_samples is None:
        raise PplVaeError("evaluate_per_datapoint needs num_samples (log p(x)) or elbo_samples (the ELBO), or both")
    if not isinstance(block_size, int) or block_size < 1:
        raise PplVaeError(f"block_size must be a positive integer, got {block_size!r}")
    data = check_data(x, cond)
    rank, world_size = _rank_and_size()
    n = x.shape[0]
    mine = range(rank, math.ceil(n / block_size), world_size)
    bar = _progress_bar(progress, sum(min(block_size, n - block * block_size) for block in mine))
    done: list[tuple[int, dict[str, Any]]] = []
    for block in mine:
        rows = slice(block * block_size, min(n, (block + 1) * block_size))
        block_data = tuple(value[rows] for value in data)
        result: dict[str, Any] = {}
        try:
            with seeded(derive_seed(seed, "block", block)):
                if num_samples is not None and psis:
                    result["evidence"], result["psis"] = evidence_with_psis(
                        model, guide, *block_data, num_samples=num_samples, chunk_size=chunk_size)
                elif num_samples is not None:
                    result["evidence"] = evidence_estimate(
                        model, guide, *block_data, num_samples=num_samples, chunk_size=chunk_size)
                if elbo_samples is not None:
                    result["decomposition"] = elbo_decomposition(
                        model, guide, *block_data, num_samples=elbo_samples, chunk_size=chunk_size)
        except PplVaeError as error:
            done.append((block, {"error": type(error)(f"{error} (in datapoints {rows.start} to {rows.stop - 1} of x)")}))
            break
        done.append((block, result))
        if bar is not None:
            bar.update(rows.stop - rows.start)
    if bar is not None:
        bar.close()
    blocks = sorted((item for items in all_gather_objects(done) for item in items), key=lambda item: item[0])
    for _, result in blocks:
        if "error" in result:
            raise result["error"]
    parts = [result for _, result in blocks]
    return PerDatapointEvaluation(
        decomposition=_join_decompositions([p["decomposition"] for p in parts]) if elbo_samples is not None else None,
        evidence=_join_evidence([p["evidence"] for p in parts]) if num_samples is not None else None,
        psis=_join_psis([p["psis"] for p in parts]) if num_samples is not None and psis else None,
    )


def _progress_bar(progress: bool, total: int):
    """A bar over this process's share of the datapoints."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluating", unit="image", leave=False)


def _join_decompositions(parts: list[dict]) -> dict:
    first = parts[0]
    return {
        "elbo": torch.cat([p["elbo"] for p in parts]),
        "reconstruction": torch.cat([p["reconstruction"] for p in parts]),
        "reconstruction_by_site": {name: torch.cat([p["reconstruction_by_site"][name] for p in parts])
                                   for name in first["reconstruction_by_site"]},
        "observed_data": dict(first["observed_data"]),
        "quantity": first["quantity"],
        "kl": {name: torch.cat([p["kl"][name] for p in parts]) for name in first["kl"]},
        "kl_method": dict(first["kl_method"]),
        "kl_reason": dict(first.get("kl_reason", {})),
        "num_samples": first["num_samples"],
    }


def _join_evidence(parts: list[EvidenceEstimate]) -> EvidenceEstimate:
    return EvidenceEstimate(
        torch.cat([p.log_evidence for p in parts]), torch.cat([p.stderr for p in parts]),
        torch.cat([p.ess for p in parts]), parts[0].num_samples,
    )


def _join_psis(parts: list[dict]) -> dict:
    joined: dict[str, Any] = {key: torch.cat([p[key] for p in parts]) for key in PSIS_PER_DATAPOINT}
    joined.update(
        unreliable_share=joined["unreliable"].double().mean().item(), khat_threshold=parts[0]["khat_threshold"],
        num_samples=parts[0]["num_samples"],
    )
    return joined


def load_run_everywhere(
    run_dir: str | Path, device: torch.device, trust_program: bool = False
) -> tuple[torch.nn.Module, dict]:
    """:func:`ppl_vae.train.load_run` with the files read by rank 0 only and sent to every process."""
    def read() -> tuple[dict, dict, int, str | None]:
        from .run_readers import read_run_config

        config = read_run_config(Path(run_dir))  # checked: a config.json handed over may hold anything
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

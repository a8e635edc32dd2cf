"""Strategies: what differs between training on one process and on a process group, and nothing else.

The loop (:mod:`ppl_vae.training.loop`) asks its :class:`Strategy` for the device, for rank 0's work shared
with every process (``on_main``), for an agreement to stop (Ctrl-C), for the epoch's minibatches and for the
engine; :class:`OneProcess` answers alone (one random stream for the whole run, saved in every checkpoint),
:class:`ProcessGroupStrategy` through ``torch.distributed`` (:mod:`ppl_vae.process_group`; the data stream seeded
per epoch, DistributedDataParallel). Like Lightning's single-device strategy, one process communicates nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyro
import torch

from .. import process_group
from ..data import ImageData
from ..errors import PplVaeError, PplVaeWarning
from ..process_group import ProcessGroup, derive_seed
from .config import OPTIMIZER_FORMAT_TORCH, TrainConfig
from .engines import DdpEngine, Engine, check_trainable_on_processes, make_engine, optimizer_format_of
from .resume import check_optimizer_format, check_single_process_checkpoint
from .semi import semi_supervised_epoch

T = TypeVar("T")


class Strategy(Protocol):
    """What the training loop needs of the processes it runs on (one, or a torch.distributed process group)."""

    rank: int
    world_size: int
    is_main: bool

    def select_device(self, config: TrainConfig) -> torch.device: ...
    def describe(self, device: torch.device) -> str: ...
    def on_main(self, compute: Callable[[], T]) -> T: ...
    def agree_to_stop(self, requested: bool) -> bool: ...
    def check_same_data(self, digest: str) -> None: ...
    def check_config(self, config: TrainConfig) -> None: ...
    def check_checkpoint(self, checkpoint: dict[str, Any], config: TrainConfig, run_dir: Path) -> None: ...
    def make_engine(self, trained: torch.nn.Module, config: TrainConfig, max_plate_nesting: int,
                    enumerated: bool = False, unused_parameters: tuple[str, ...] = ()) -> Engine: ...
    def epoch_batches(self, data: ImageData, config: TrainConfig, epoch: int) -> Iterable: ...
    def checkpoint_extra(self, device: torch.device) -> dict[str, Any]: ...
    def restore(self, checkpoint: dict[str, Any], device: torch.device) -> None: ...


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


def rng_state(device: torch.device) -> dict:
    """Python's, NumPy's and torch's CPU generators, and the training GPU's own (only that one: a run may
    resume where fewer GPUs are visible, and a CPU run on a GPU machine should not touch CUDA at all)."""
    state = pyro.util.get_rng_state()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved (the GPU's only when training on that GPU)."""
    state = dict(state)
    cuda_state = state.pop("cuda", None)
    pyro.util.set_rng_state(state)
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


class OneProcess:
    """What training in one process needs of the process group: nothing to share or agree on; it writes.

    The other implementation, :class:`ProcessGroupStrategy`, trains on several processes
    with DistributedDataParallel; :func:`ppl_vae.training.loop.train` is the one loop both run. One process keeps one
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

    def check_same_data(self, digest: str) -> None:
        """One process: its data are the run's."""

    def check_config(self, config: TrainConfig) -> None:
        """Nothing beyond TrainConfig's own checks."""

    def check_checkpoint(self, checkpoint: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
        check_single_process_checkpoint(checkpoint, optimizer_format_of(config.engine), run_dir)

    def make_engine(self, trained: torch.nn.Module, config: TrainConfig, max_plate_nesting: int,
                    enumerated: bool = False, unused_parameters: tuple[str, ...] = ()) -> Engine:
        # unused_parameters: what DDP must look for on several processes; one process needs nothing for them
        return make_engine(config.engine, trained, config, max_plate_nesting, enumerated=enumerated)

    def epoch_batches(self, data: ImageData, config: TrainConfig, epoch: int) -> Iterable:
        if config.labelled is not None:  # labelled (x, y) and unlabelled (x,) batches, from the same stream
            return semi_supervised_epoch(data, config)
        return data.train_batches(config.batch_size, labels=config.labels, cond=config.cond)  # the run's one random stream

    def checkpoint_extra(self, device: torch.device) -> dict[str, Any]:
        return {"rng": rng_state(device)}

    def restore(self, checkpoint: dict[str, Any], device: torch.device) -> None:
        set_rng_state(checkpoint["rng"], device)


@dataclass(frozen=True)
class ProcessGroupStrategy(ProcessGroup):
    """This process's place in the process group (:class:`ppl_vae.process_group.ProcessGroup`), with what the
    training loop needs of it: the training strategy of several processes."""

    def select_device(self, config: TrainConfig) -> torch.device:
        return self.device

    def on_main(self, compute: Callable[[], T]) -> T:
        return process_group.on_main(compute)

    def agree_to_stop(self, requested: bool) -> bool:
        return process_group.agree_to_stop(requested, self.device)

    def check_same_data(self, digest: str) -> None:
        """Refuse data given from Python (``data=`` tensors, by their SHA-256 ``digest``) that differ between the
        processes: each would train on its own data while rank 0 records its own. Every process gets the same
        one-line error (the digests are gathered, so all decide alike and none waits on the others)."""
        digests = process_group.all_gather_objects(digest)
        differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
        if differing:
            raise PplVaeError(
                f"data=: the tensors given to process(es) {', '.join(map(str, differing))} differ from those of "
                f"process 0 (SHA-256 of their tensors.npz): every process must be given the same tensors (make them "
                "with a fixed seed, or read them from one file)"
            )

    def check_config(self, config: TrainConfig) -> None:
        check_trainable_on_processes(config)

    def check_checkpoint(self, checkpoint: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
        check_optimizer_format(checkpoint, OPTIMIZER_FORMAT_TORCH, run_dir)
        if checkpoint.get("world_size", 1) != self.world_size:
            warnings.warn(
                f"resuming a run saved by {checkpoint.get('world_size', 1)} process(es) on {self.world_size}: the data "
                "are the same, but the Monte Carlo draws differ from those of an uninterrupted run",
                PplVaeWarning,
                stacklevel=2,
            )

    def make_engine(self, program: torch.nn.Module, config: TrainConfig, max_plate_nesting: int,
                    enumerated: bool = False, unused_parameters: tuple[str, ...] = ()) -> DdpEngine:
        return DdpEngine(program, config, max_plate_nesting, self, enumerated=enumerated,
                         unused_parameters=unused_parameters)

    def epoch_batches(self, data: ImageData, config: TrainConfig, epoch: int) -> Iterable:
        """The epoch's global minibatches, the same on every process: the data stream is seeded from (seed, epoch),
        this process's Monte Carlo draws from (seed, epoch, rank), so an epoch runs again exactly after a resume.
        With ``--labelled``, the labelled and unlabelled batches of :func:`semi_supervised_epoch`, their order drawn
        on the CPU (where the index lists are) from a stream of its own; each is then sharded like any batch."""
        generator = torch.Generator(device=data.train.device).manual_seed(derive_seed(config.seed, "data", epoch))
        pyro.set_rng_seed(derive_seed(config.seed, "draws", epoch, self.rank))
        if config.labelled is not None:
            order = torch.Generator().manual_seed(derive_seed(config.seed, "labelled order", epoch))
            return semi_supervised_epoch(data, config, order, draws=generator)
        return data.train_batches(config.batch_size, generator=generator, labels=config.labels, cond=config.cond)

    def checkpoint_extra(self, device: torch.device) -> dict[str, Any]:
        return {"world_size": self.world_size}  # no RNG state: every epoch seeds its own streams

    def restore(self, checkpoint: dict[str, Any], device: torch.device) -> None:
        """Nothing to restore: the streams are seeded per epoch."""


def initialize(device: str = "auto") -> ProcessGroupStrategy:
    """Join the process group described by torchrun's environment variables (:func:`ppl_vae.process_group.initialize`);
    returns this process's :class:`ProcessGroupStrategy`. Calling it again returns the same context."""
    return process_group.initialize(device, kind=ProcessGroupStrategy)

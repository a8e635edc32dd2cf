r"""The process group, and nothing about training: joining the one torchrun describes, who is rank 0, sharing a value
computed there, gathering values, agreeing to stop, seeds derived from names, and starting ``ppl-vae`` under torchrun.

Communication only (in the manner of Lightning's strategies): on one process every function here is a no-op or
the plain computation. :mod:`ppl_vae.distributed` builds training on several processes on top of it, and the
evaluation that is the same on any number of processes (:mod:`ppl_vae.blocked_evaluation`) uses it; it imports
nothing from either, nor from the training loop.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np
import pyro
import torch
import torch.distributed as dist

from .errors import PplVaeError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE")
DEFAULT_RDZV_ID = "ppl-vae"

T = TypeVar("T")
G = TypeVar("G", bound="ProcessGroup")


# --- Processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessGroup:
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


_CONTEXT: ProcessGroup | None = None


def launched_by_torchrun() -> bool:
    """Whether this process runs under torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def initialize(device: str = "auto", kind: type[G] | None = None) -> G:
    """Join the process group described by torchrun's environment variables; returns this process's context.

    The device is ``cuda:LOCAL_RANK`` with the NCCL backend when CUDA is available and
    ``device`` is ``"auto"`` or ``"cuda"``, else the CPU with gloo. Calling it again
    returns the same context. ``kind`` is the class of the context made (a :class:`ProcessGroup`
    subclass, such as the training strategy :class:`ppl_vae.distributed.Context`).
    """
    global _CONTEXT
    kind = kind or ProcessGroup
    if _CONTEXT is not None and dist.is_initialized():
        if not isinstance(_CONTEXT, kind):  # joined before as a plainer kind: the same place, with kind's methods
            _CONTEXT = kind(**{f.name: getattr(_CONTEXT, f.name) for f in fields(ProcessGroup)})
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
    _CONTEXT = kind(rank, world_size, local_rank, chosen, backend)
    return _CONTEXT


def current() -> ProcessGroup | None:
    """The context of this process when :func:`initialize` joined a process group, else None."""
    return _CONTEXT if _CONTEXT is not None and dist.is_initialized() else None


def shutdown() -> None:
    """Leave the process group (a no-op outside one)."""
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def rank_and_size() -> tuple[int, int]:
    """(rank, number of processes) of this process: (0, 1) outside a process group."""
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


def agree_to_stop(requested: bool, device: torch.device) -> bool:
    """Whether any process was asked to stop (one all-reduce)."""
    flag = torch.tensor([float(requested)], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


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

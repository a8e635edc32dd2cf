"""Worker functions for tests/test_distributed.py, run in processes started by ``torch.multiprocessing.spawn``.

Each worker joins a gloo process group on the CPU through the environment variables torchrun would set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and
:func:`ppl_vae.distributed.initialize`, runs one task and writes what the test compares with ``torch.save``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pyro
import torch
import torch.multiprocessing as mp

TINY = {"data_dim": 20, "latent_dim": 4, "hidden_sizes": (16,)}
# AIS through the blocked evaluation (tests/test_ais_blocks.py): 3 blocks of 10 datapoints, dealt to 2 processes.
AIS = {"steps": 4, "chains": 3, "leapfrog_steps": 2}
AIS_OPTIONS = {"ais": AIS, "elbo_samples": 2, "seed": 7, "block_size": 4}


def tiny_vae_and_data(rows: int):
    """The TINY VAE at its seeded initial weights and ``rows`` seeded binary datapoints."""
    from ppl_vae.model import VAEConfig, build_vae

    pyro.set_rng_seed(3)
    vae = build_vae(VAEConfig(**TINY))
    return vae, torch.bernoulli(torch.full((rows, TINY["data_dim"]), 0.4), generator=torch.Generator().manual_seed(2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tasks: list[tuple], world_size: int) -> None:
    """Run every ``task(*args)`` of ``tasks`` (pairs), one after the other, in ``world_size`` processes of one gloo group.

    One group for several tasks: starting processes is what takes time here.
    """
    mp.spawn(_worker, args=(world_size, free_port(), tasks), nprocs=world_size, join=True)


def _worker(rank: int, world_size: int, port: int, tasks: list[tuple]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from ppl_vae import distributed

    distributed.initialize("cpu")
    try:
        for task, args in tasks:
            task(*args)
    finally:
        distributed.shutdown()


def fixed_noise(shape, dtype=None, device=None) -> torch.Tensor:
    """In place of torch's standard-normal draws: a value per latent dimension, the same for every datapoint.

    With it every datapoint gets the same draw whether its minibatch is split between processes or
    not, so one distributed step and one single-process step can be compared to round-off.
    """
    shape = torch.Size(shape)
    return torch.linspace(-1.0, 1.0, shape[-1], dtype=dtype, device=device).expand(shape).contiguous()


def one_step(path: Path, batch: torch.Tensor, learning_rate: float, clip_norm: float | None, kl_weight: float,
             compiled: bool = False) -> None:
    """One distributed step on this rank's share of ``batch``; every rank saves its parameters and the loss."""
    from ppl_vae import distributed

    context = distributed.current()
    path.mkdir(exist_ok=True)
    standard_normal = torch.distributions.normal._standard_normal
    torch.distributions.normal._standard_normal = fixed_noise
    try:
        _one_step(path, batch, learning_rate, clip_norm, kl_weight, context, compiled)
    finally:
        torch.distributions.normal._standard_normal = standard_normal


def _one_step(path, batch, learning_rate, clip_norm, kl_weight, context, compiled) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from ppl_vae import distributed
    from ppl_vae.model import VAEConfig, build_vae
    from ppl_vae.objectives import make_loss_module
    from ppl_vae.programs import Weighted

    pyro.clear_param_store()  # the compiled loss finds the parameters there, by name
    pyro.set_rng_seed(0)
    vae = build_vae(VAEConfig(**TINY))
    ddp = DistributedDataParallel(make_loss_module(Weighted(vae, kl_weight), compiled=compiled))
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    shard = distributed.shard_rows(batch, context.rank, context.world_size)
    # The last rank alone is asked to stop (Ctrl-C): every rank must learn it from the step.
    stop_requested = context.rank == context.world_size - 1
    loss, stop = distributed.checked_ddp_step(ddp, optimizer, shard, context.world_size, clip_norm, stop_requested)
    torch.save({"state": vae.state_dict(), "loss": loss, "stop": stop, "rows": shard.shape[0]},
               path / f"step-rank{context.rank}.pt")


def faulty_step(path: Path, batch: torch.Tensor) -> None:
    """A step whose gradient is NaN on the last rank only: every rank must refuse the update."""
    from torch.nn.parallel import DistributedDataParallel

    from ppl_vae import distributed
    from ppl_vae.errors import NumericalFaultError
    from ppl_vae.model import VAEConfig, build_vae
    from ppl_vae.objectives import ProgramLoss, make_objective

    context = distributed.current()
    pyro.set_rng_seed(0)
    vae = build_vae(VAEConfig(**TINY))
    before = {name: value.clone() for name, value in vae.state_dict().items()}
    if context.rank == context.world_size - 1:
        vae.decoder[0].weight.register_hook(lambda grad: grad * float("nan"))
    ddp = DistributedDataParallel(ProgramLoss(vae, make_objective("elbo")))
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    shard = distributed.shard_rows(batch, context.rank, context.world_size)
    try:
        distributed.checked_ddp_step(ddp, optimizer, shard, context.world_size)
        message = None
    except NumericalFaultError as fault:
        message = str(fault)
    unchanged = all(torch.equal(value, before[name]) for name, value in vae.state_dict().items())
    torch.save({"message": message, "unchanged": unchanged}, path / f"fault-rank{context.rank}.pt")


def evaluate(path: Path, options: dict) -> None:
    """evaluate_per_datapoint of the VAE and data saved in ``path``; every rank saves what it got back."""
    from ppl_vae import distributed
    from ppl_vae.model import VAEConfig, build_vae

    saved = torch.load(path / "model-and-data.pt")
    vae = build_vae(VAEConfig(**TINY))
    vae.load_state_dict(saved["state"])
    result = distributed.evaluate_per_datapoint(vae.model, vae.guide, saved["x"], **options)
    torch.save(vars(result), path / f"evaluation-rank{distributed.current().rank}.pt")

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


# --labelled on 2 processes: a tiny M2 on 37 images of 6 binary pixels, 20 of them labelled (2 per class).
LABELLED_M2 = {"data_dim": 6, "latent_dim": 2, "hidden_sizes": (8,)}


def labelled_data(cond: bool = False):
    """37 images whose pixels are the bits of their index, labelled 3 * index mod 10, the same on every split;
    ``cond``: with a float covariate c = f(index) [37, 3] (``--cond c``)."""
    import dataclasses

    from ppl_vae.data import tensor_data

    index = torch.arange(37)
    x = ((index[:, None] >> torch.arange(LABELLED_M2["data_dim"])) & 1).float()
    c = torch.stack([index / 37, torch.sin(index.float()), torch.cos(index.float())], -1)
    split = (x, c) if cond else x
    labels = index * 3 % 10
    return dataclasses.replace(tensor_data(split, split, split, cond=("c",) if cond else (), binarize="dynamic"),
                               train_labels=labels, val_labels=labels, test_labels=labels)


class CovariateVAE(torch.nn.Module):
    """p(z) p(x | z, y, c) with q(z | x, y, c): a program given the labels and a covariate (--labels --cond c)."""

    def __init__(self, data_dim: int = 6, latent: int = 2, hidden: int = 8):
        super().__init__()
        self.latent = latent
        self.encoder = torch.nn.Sequential(torch.nn.Linear(data_dim + 13, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, 2 * latent))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(latent + 13, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, data_dim))

    def model(self, x, y, c):
        import pyro.distributions as dist

        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            given = torch.cat([torch.nn.functional.one_hot(y, 10).to(x.dtype), c], -1)
            logits = self.decoder(torch.cat([z, given.expand(*z.shape[:-1], -1)], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x, y, c):
        import pyro.distributions as dist

        with pyro.plate("data", x.shape[0]):
            given = torch.cat([x, torch.nn.functional.one_hot(y, 10).to(x.dtype), c], -1)
            loc, raw = self.encoder(given).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))


def shifted_m2():
    """The tiny M2 with a parameter its model uses on unlabelled steps only (a shift of the image logits when y is
    summed out): on labelled steps it gets no gradient, whatever alpha, so DDP must look for unused parameters."""
    from ppl_vae.models.m2 import M2

    class ShiftedM2(M2):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.unlabelled_shift = torch.nn.Parameter(torch.zeros(self.data_dim))

        def model(self, x, y=None):
            import pyro.distributions as dist
            from ppl_vae.models.m2 import joined

            with pyro.plate("data", x.shape[0]):
                y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.num_classes)), obs=y)
                z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
                logits = self.decoder(joined(z, torch.nn.functional.one_hot(y, self.num_classes).to(x.dtype)))
                if y.dim() > 1:  # y enumerated: an unlabelled step
                    logits = logits + self.unlabelled_shift
                pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    return ShiftedM2(**LABELLED_M2)


def labelled_config(alpha: float | str | None):
    """``alpha``: --labelled 20 with that alpha ("shift": the default alpha, for :func:`shifted_m2`); "cond": no
    --labelled, --labels --cond c instead."""
    from ppl_vae.train import TrainConfig

    if alpha == "shift":
        alpha = None
    if alpha == "cond":
        return TrainConfig(batch_size=8, labels=True, cond=("c",), seed=5, learning_rate=1e-2)
    return TrainConfig(batch_size=8, labelled=20, labelled_batches=4, alpha=alpha, seed=5, learning_rate=1e-2)


def labelled_engine(config, data, make_engine, shifted: bool = False):
    """The tiny M2 (``shifted``: :func:`shifted_m2`; with --cond the covariate VAE; the same initial weights
    everywhere) and the engine ``make_engine(trained)`` that trains it."""
    from ppl_vae.models.m2 import M2
    from ppl_vae.programs import Weighted
    from ppl_vae.training.semi import trained_program

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    program = CovariateVAE() if config.cond else shifted_m2() if shifted else M2(**LABELLED_M2)
    engine = make_engine(Weighted(trained_program(program, data, config)))
    engine.set_learning_rate(config.learning_rate)
    engine.begin_epoch(type("NoStop", (), {"requested": False})())
    return program, engine


def labelled_epoch(path: Path, alpha: float | str | None) -> None:
    """One epoch of --labelled (or --labels --cond c) training through the DDP engine, with fixed draws, DDP told of
    the parameters the first-batch check finds unused (as setup does); every rank saves the weights, losses and
    those parameters."""
    from ppl_vae import distributed
    from ppl_vae.training.checks import check_batches, unused_parameters_choice
    from ppl_vae.training.engines import DdpEngine, EngineChoice

    context, config = distributed.current(), labelled_config(alpha)
    data = labelled_data(cond=bool(config.cond))
    found = {}

    def ddp_engine(trained):
        first = check_batches(data, config, torch.Generator().manual_seed(config.seed))[0]
        choice = unused_parameters_choice(EngineChoice("jit", "jit", "checked"), config, trained, None, data, first, 1,
                                          not config.cond)
        found["unused"] = choice.unused_parameters
        return DdpEngine(trained, config, 1, context, enumerated=not config.cond,
                         unused_parameters=choice.unused_parameters)

    standard_normal = torch.distributions.normal._standard_normal
    torch.distributions.normal._standard_normal = fixed_noise
    try:
        program, engine = labelled_engine(config, data, ddp_engine, shifted=alpha == "shift")
        losses = [engine.step(batch) for batch in context.epoch_batches(data, config, 1)]
    finally:
        torch.distributions.normal._standard_normal = standard_normal
    torch.save({"state": program.state_dict(), "losses": losses, "unused": found["unused"]},
               path / f"labelled-{alpha}-rank{context.rank}.pt")


def commands(path: Path, data_root: Path, argvs: list[list[str]]) -> None:
    """``ppl-vae ARGV`` for each of ``argvs`` on every process, as torchrun's processes run it (the environment
    already says RANK and WORLD_SIZE); each rank saves what it printed to ``path/commands-rank{rank}.txt``.

    The commands join the process group already made (``initialize`` returns it) and would leave it when done:
    here the group stays, for the next command and task, instead of new processes being started for each.
    """
    import contextlib
    import io

    from ppl_vae import cli, distributed

    os.environ["PPL_VAE_DATA"] = str(data_root)
    out, shutdown = io.StringIO(), distributed.shutdown
    distributed.shutdown = lambda: None
    try:
        with contextlib.redirect_stdout(out):
            codes = [cli.main([str(arg) for arg in argv]) for argv in argvs]
    finally:
        distributed.shutdown = shutdown
    assert codes == [0] * len(argvs), codes
    (path / f"commands-rank{distributed.current().rank}.txt").write_text(out.getvalue())


def tensors_runs(path: Path) -> None:
    """``train_distributed`` with a program object and tensors from Python (``data=``): the same tensors on every
    rank train one run; tensors that differ on the last rank are refused on every rank. Each rank saves its result
    or its error message."""
    from ppl_vae import distributed
    from ppl_vae.errors import PplVaeError
    from ppl_vae.model import VAEConfig, build_vae
    from ppl_vae.train import TrainConfig

    context = distributed.current()
    generator = torch.Generator().manual_seed(5)
    data = {split: torch.bernoulli(torch.full((rows, 1, 4, 5), 0.4), generator=generator)  # 20 = data_dim
            for split, rows in (("train", 40), ("val", 10), ("test", 10))}
    config = TrainConfig(epochs=1, batch_size=10, test_samples=3, binarize="none")
    outcome = {}
    for name, given in (("same", data), ("differ", dict(data))):
        if name == "differ" and context.rank == context.world_size - 1:
            given["train"] = 1 - data["train"]
        pyro.set_rng_seed(0)
        try:
            result = distributed.train_distributed(path / f"tensors-{name}", config, program=build_vae(VAEConfig(**TINY)),
                                                   data=given, progress=False)
            outcome[name] = {"elbo": result["elbo"]["mean"]}
        except PplVaeError as error:
            outcome[name] = {"error": str(error)}
    torch.save(outcome, path / f"tensors-rank{context.rank}.pt")

r"""Scale-out: training and evaluation on several processes with ``torch.distributed``.

Processes are started by ``torchrun`` (``torch.distributed.run``, PyTorch's own launcher):
``ppl-vae train --devices N`` re-launches itself through it (:func:`launch`), or run
``torchrun ... -m ppl_vae train ...`` yourself. Each process reads its rank from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), uses ``cuda:LOCAL_RANK`` with the NCCL backend when CUDA is there and the
CPU with gloo otherwise (:func:`initialize`).

**Training** (:func:`train_distributed`) wraps the loss in ``DistributedDataParallel``;
no gradient is averaged by hand. The loss is Pyro's: :class:`~ppl_vae.objectives.ProgramLoss` is the
``ELBOModule`` that ``Trace_ELBO()(model, guide)`` returns, with the VAE registered as a
submodule so that its parameters are the module's (with ``--engine jit``, the compiled
:class:`~ppl_vae.objectives.CompiledProgramLoss`). Every process draws the same global
minibatch B (same permutation, same dynamic binarization: a generator seeded with the run's
seed and the epoch) and keeps its contiguous share B_r (:func:`shard_rows`). With
L(B) = sum_{n in B} l_n the loss single-process SVI minimizes (the objective summed over
the minibatch), process r back-propagates W L(B_r), W the number of processes; DDP
averages gradients over processes, so every process applies

.. math::

    \frac{1}{W} \sum_{r=1}^{W} \nabla\big(W\, L(B_r)\big) = \nabla \sum_r L(B_r) = \nabla L(B),

the single-process gradient of the same global minibatch, whatever the shard sizes (the
scale is W for every process, also when W does not divide |B|). ``--batch-size`` is the
global minibatch. Every tensor of a batch is cut at the same rows (:func:`ppl_vae.training.engines.shard_batch`):
the labels of ``--labels`` and the arrays of ``--cond`` stay with their images. ``--labelled`` epochs (labelled
batches ``(x, y)`` among unlabelled ``(x,)``, :func:`ppl_vae.training.semi.semi_supervised_epoch`) are built the same
way on every process and each batch is sharded like any other; the classifier term
alpha / N_l sum_i log q(y_i | x_i) and a cycled labelled batch's scale are sums over the batch's rows, so every
process keeps the one-process weights and the sum over the shares is the one-process objective. Only rank 0 writes ``config.json``, ``metrics.jsonl``, checkpoints and
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
training; the training side is :mod:`ppl_vae.training` (the process-group strategy in
:mod:`ppl_vae.training.strategy`, the DDP engine and step in :mod:`ppl_vae.training.engines`). This module
re-exports both, under the names earlier versions defined here.

Not supported on several processes: ``--objective iwae`` (Pyro's ``RenyiELBO`` has no
``differentiable_loss``, which a torch module needs).
"""

from .blocked_evaluation import EVALUATION_BLOCK_SIZE, PSIS_PER_DATAPOINT, PerDatapointEvaluation, evaluate_per_datapoint
from .process_group import (
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
from .training.engines import DdpEngine, check_trainable_on_processes, checked_ddp_step, shard_rows
from .training.loop import train_distributed
from .training.run_loading import load_run_everywhere
from .training.strategy import ProcessGroupStrategy, initialize

Context = ProcessGroupStrategy  # the name earlier versions gave the process-group strategy

__all__ = [
    "DEFAULT_RDZV_ID", "EVALUATION_BLOCK_SIZE", "PSIS_PER_DATAPOINT", "TORCHRUN_VARIABLES", "Context", "DdpEngine",
    "PerDatapointEvaluation", "ProcessGroup", "ProcessGroupStrategy", "agree_to_stop", "all_gather_objects",
    "check_launch", "check_trainable_on_processes", "checked_ddp_step", "current", "derive_seed",
    "evaluate_per_datapoint", "initialize", "launch", "launch_command", "launched_by_torchrun", "load_run_everywhere",
    "on_main", "rank_and_size", "seeded", "shard_rows", "should_launch", "shutdown", "train_distributed",
    "usable_cores",
]

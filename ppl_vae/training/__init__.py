"""Training: stochastic variational inference on any program's Pyro model and guide.

A program is an ``nn.Module`` with ``model(x, *cond)`` and ``guide(x, *cond)``
(:mod:`ppl_vae.programs`): the built-in VAE, the other built-in programs, or a user's own.
:func:`train` runs one loop (:mod:`ppl_vae.training.loop`) for all of them, with either engine, on one
process or on several: what differs between one process and a process group (the device,
sharding the minibatch, agreeing on faults and Ctrl-C, the random streams, rank 0 writing)
is the :class:`~ppl_vae.training.strategy.Strategy`: ``OneProcess`` or ``ProcessGroupStrategy``. The KL weight (``beta``
and its warm-up) scales every latent site of the program (:class:`ppl_vae.programs.Weighted`).

Each step maximizes the ELBO of a minibatch through ``SVI(model, guide, optim,
Trace_ELBO())`` (or another objective of :mod:`ppl_vae.objectives`), or through the same
ELBO compiled by Pyro's ``JitTrace_ELBO`` and one torch Adam (:class:`~ppl_vae.training.engines.ModuleEngine`,
compiled; faster per step); on several processes, the loss module in DistributedDataParallel
(:class:`ppl_vae.training.engines.DdpEngine`). ``engine="auto"``, the default, takes the compiled
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

Modules, one job each (``ppl_vae.train`` re-exports the public names):

* :mod:`~ppl_vae.training.config` -- TrainConfig, the KL-weight and learning-rate schedules as pure functions of
  the epoch, the one optimizer builder (Pyro's or torch's Adam);
* :mod:`~ppl_vae.training.checks` -- the data a program is trained on, and the program run once on it;
* :mod:`~ppl_vae.training.resume` -- a run's saved configurations, and the checks of a checkpoint to resume;
* :mod:`~ppl_vae.training.setup` -- everything before epoch 1, as named steps returning a ``TrainingRun``;
* :mod:`~ppl_vae.training.steps` -- the checked step ("check, then apply"), an epoch of steps, numerical faults;
* :mod:`~ppl_vae.training.engines` -- the Engine protocol: SVI, the torch-module loss (compiled or not), DDP; the
  engine choice;
* :mod:`~ppl_vae.training.strategy` -- the Strategy protocol: one process, a torch.distributed process group;
* :mod:`~ppl_vae.training.records` -- the epoch records, printing, the learning-curve point;
* :mod:`~ppl_vae.training.interrupts` -- Ctrl-C as a request to stop before the next step;
* :mod:`~ppl_vae.training.run_loading` -- a finished run's configuration and program, for the other commands;
* :mod:`~ppl_vae.training.monitoring` -- the monitored quantity after each epoch: the plateau schedule, early
  stopping, the best checkpoint;
* :mod:`~ppl_vae.training.tracking` -- the experiment trackers of ``--log`` (TensorBoard, MLflow) as the loop drives them;
* :mod:`~ppl_vae.training.loop` -- the loop: :func:`train`, :func:`fit` (a program in memory), ``train_distributed``.
"""

from .config import ENGINES, LR_SCHEDULES, TrainConfig, kl_weight, learning_rate_at, make_optimizer
from .engines import EngineChoice, choose_engine
from .interrupts import StopRequest
from .loop import fit, train, train_distributed
from .run_loading import build_run_program, load_run, read_run_config

__all__ = [
    "ENGINES", "LR_SCHEDULES", "EngineChoice", "StopRequest", "TrainConfig", "build_run_program", "choose_engine", "fit",
    "kl_weight", "learning_rate_at", "load_run", "make_optimizer", "read_run_config", "train", "train_distributed",
]

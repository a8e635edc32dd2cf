"""Training settings as data: :class:`TrainConfig`, and the schedules it describes as pure functions of the epoch.

The KL weight (:func:`kl_weight`) and the learning rate (:func:`learning_rate_at`) of epoch e (1-based) depend on
the configuration and e only, so a resumed run sees the same values as an uninterrupted one. One builder
(:func:`make_optimizer`) makes the optimizer of both kinds a run can hold: Pyro's (one Adam per parameter, for
``SVI``) and torch's (one Adam over a module's parameters), with the same per-epoch schedule.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyro.optim
import torch

from ..data import check_dataset
from ..data.conditioning import check_cond_names
from ..errors import PplVaeError
from ..gradient_estimators import check_gradient
from ..objectives import check_objective
from ..schedules import LR_SCHEDULES, MONITORS, check_lr_schedule
from ..schedules import learning_rate as schedule_learning_rate
from ..trackers import TRACKERS

# How a step is computed (ppl_vae.training.engines); both read the same Pyro programs. "auto" chooses
# one of them for the run (choose_engine), and the run records which and why.
ENGINES = ("auto", "svi", "jit")
# Checkpoints say how their optimizer state is stored: Pyro's optimizer (one torch optimizer per
# parameter, keyed by the param store's names; --engine svi in one process) or one torch optimizer and LR
# scheduler over the module's parameters (distributed training, and --engine jit). Checkpoints without the
# key are Pyro's.
OPTIMIZER_FORMAT_PYRO = "pyro"
OPTIMIZER_FORMAT_TORCH = "torch"


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
    # Issue 26 item 4: conditioning arrays of a .npz (NAME_train, NAME_val, NAME_test), passed after x (and y) in
    # this order to both programs in training and every evaluation (ppl_vae.data.conditioning).
    cond: tuple[str, ...] = ()
    # Issue 28, stage 2: the monitored quantity, early stopping and the plateau schedule (ppl_vae.schedules).
    monitor: str = "elbo"  # what early stopping and "plateau" watch: elbo (validation ELBO) or evidence (val log p̂(x))
    min_delta: float = 0.0  # nats/image: an improvement of the monitored value is more than this
    early_stopping: int | None = None  # patience: stop after this many epochs without improvement; None: never
    plateau_factor: float = 0.1  # "plateau" multiplies the rate by this after plateau_patience bad measured epochs
    plateau_patience: int = 10  # measured epochs without improvement "plateau" tolerates (as ReduceLROnPlateau)
    # Issue 28: the gradient estimator (ppl_vae.gradient_estimators): standard, stl (--objective elbo), dreg (iwae).
    gradient: str = "standard"
    # Issue 28: experiment trackers (ppl_vae.trackers), started, resumed and closed by the loop on the main process.
    log: tuple[str, ...] = ()  # tensorboard and/or mlflow
    tracking_uri: str | None = None  # MLflow's tracking URI (a server); None: mlflow.db and mlruns/ in the run
    log_images_every: int = 0  # every this many epochs (and the last), images of samples and reconstructions; 0: none
    # Discrete latents and semi-supervised training (issue 26; ppl_vae.training.semi).
    enumerate: bool = False  # --enumerate: every discrete guide site marked for parallel enumeration (TraceEnum_ELBO)
    labelled: int | None = None  # --labelled N: N training images keep their labels (balanced per class, seed)
    alpha: float | None = None  # the classifier term's weight; None: 0.1 x the training images (Kingma et al.)
    label_site: str = "y"  # the guide's discrete site that is the class label
    labelled_batches: int | None = None  # labelled batches per epoch; None: each labelled image once

    def __post_init__(self) -> None:
        if not isinstance(self.labels, bool):
            raise PplVaeError(f"labels must be true or false, got {self.labels!r}")
        self.cond = check_cond_names(self.cond)
        check_semi_supervised(self)
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
        self.check_monitoring()
        check_gradient(self.gradient, self.objective)
        self.check_tracking()
        if self.gradient != "standard" and self.engine == "jit":
            raise PplVaeError(f"--engine jit compiles Pyro's JitTrace_ELBO, which has no {self.gradient.upper()} "
                              f"estimator: train --gradient {self.gradient} with --engine svi (or auto)")
        check_objective(self.objective, self.particles, compiled=self.engine == "jit")
        if not self.beta > 0 or self.warmup_epochs < 0 or not 0 < self.warmup_start <= max(self.beta, self.warmup_start):
            raise PplVaeError("beta must be positive, warmup_epochs >= 0 and warmup_start positive")
        if self.objective == "iwae" and (self.beta != 1.0 or self.warmup_epochs):
            raise PplVaeError("the IWAE objective has no KL term to weight: use beta 1 and no warm-up with --objective iwae")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise PplVaeError(f"the learning rate must be a positive finite number, got {self.learning_rate}")
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise PplVaeError(f"clip_norm must be a positive finite number or None, got {self.clip_norm}")


    def check_monitoring(self) -> None:
        """Early stopping and the plateau schedule: settings that cannot work are refused in one line."""
        check_lr_schedule(self.lr_schedule, factor=self.plateau_factor, patience=self.plateau_patience,
                          min_delta=self.min_delta)
        if self.monitor not in MONITORS:
            raise PplVaeError(f"unknown --monitor {self.monitor!r}: choose one of {', '.join(MONITORS)}")
        if self.early_stopping is not None and not (
                isinstance(self.early_stopping, numbers.Integral) and self.early_stopping >= 1):
            raise PplVaeError(f"--early-stopping is a patience in epochs, at least 1, got {self.early_stopping!r}")
        watched = self.early_stopping is not None or self.lr_schedule == "plateau"
        if self.monitor == "evidence" and watched and not self.evidence_every:
            raise PplVaeError("--monitor evidence watches the log p̂(x) of --evidence-every, which is off: give "
                              "--evidence-every N, or --monitor elbo")
        if not watched and (self.monitor != "elbo" or self.min_delta):
            raise PplVaeError("--monitor and --min-delta apply to --early-stopping and --lr-schedule plateau: give one "
                              "of them, or leave --monitor and --min-delta out")


    def check_tracking(self) -> None:
        """--log, --tracking-uri, --log-images-every: known names, and no option without the tracker it is for.
        Whether the trackers' packages are installed is checked when training starts (a run that logged can still
        be evaluated without them)."""
        self.log = tuple(self.log)
        unknown = sorted(set(self.log) - set(TRACKERS))
        if unknown:
            raise PplVaeError(f"unknown tracker(s) {unknown} for --log: choose from {', '.join(TRACKERS)}")
        if self.tracking_uri is not None and "mlflow" not in self.log:
            raise PplVaeError("--tracking-uri is MLflow's: give it with --log mlflow, or leave it out")
        if not (isinstance(self.log_images_every, numbers.Integral) and self.log_images_every >= 0):
            raise PplVaeError(f"--log-images-every must be an integer >= 0 (0: no images), got {self.log_images_every!r}")
        if self.log_images_every and not self.log:
            raise PplVaeError("--log-images-every sends images to the trackers of --log, and none is given: add "
                              "--log tensorboard or --log mlflow, or leave it out")


def check_semi_supervised(config: TrainConfig) -> None:
    """The enumeration and semi-supervised settings, each refused in one line (see :mod:`ppl_vae.training.semi`)."""
    if not isinstance(config.enumerate, bool):
        raise PplVaeError(f"enumerate must be true or false, got {config.enumerate!r}")
    for name in ("labelled", "labelled_batches"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise PplVaeError(f"{name} must be a positive integer (or None), got {value!r}")
    if config.alpha is not None and (isinstance(config.alpha, bool) or not isinstance(config.alpha, numbers.Real)
                                     or not math.isfinite(config.alpha) or config.alpha < 0):
        raise PplVaeError(f"alpha (the classifier term's weight) must be a finite number >= 0, got {config.alpha!r}")
    if not isinstance(config.label_site, str) or not config.label_site:
        raise PplVaeError(f"label_site must be the name of the guide's label site, got {config.label_site!r}")
    if config.labelled is None and (config.alpha is not None or config.labelled_batches is not None):
        raise PplVaeError("--alpha and --labelled-batches apply to semi-supervised training: give --labelled N too")
    if config.labelled is not None and config.cond:
        raise PplVaeError("--labelled batches are (x, y) and (x,): semi-supervised training takes no --cond arrays; "
                          "give one of the two")
    if config.labelled is not None and config.labels:
        raise PplVaeError("--labels passes every image's label and --labelled keeps only N of them: give one of the two")


def kl_weight(config: TrainConfig, epoch: int) -> float:
    """The KL weight of ``epoch`` (1-based): linear from warmup_start to beta over warmup_epochs, then beta.

    beta_e = warmup_start + (beta - warmup_start) * min(1, (e - 1) / warmup_epochs).
    """
    if config.warmup_epochs == 0:
        return config.beta
    progress = min(1.0, (epoch - 1) / config.warmup_epochs)
    return config.warmup_start + (config.beta - config.warmup_start) * progress


def learning_rate_at(config: TrainConfig, epoch: int, plateau: dict | None = None) -> float:
    """The learning rate of ``epoch`` (1-based) under ``config.lr_schedule``: :func:`ppl_vae.schedules.learning_rate`,
    the one pure function every engine's rate comes from (``plateau``: the state of that schedule).

    constant: lr; step: lr * gamma^(number of milestones m with m < e); cosine (T = epochs):
    lr_final + (lr - lr_final) * (1 + cos(pi (e - 1) / T)) / 2; burda: lr * 10^(-i/7) in stage i (3^i epochs);
    plateau: the rate of its state. Every schedule starts at lr in epoch 1.
    """
    return schedule_learning_rate(config.lr_schedule, epoch, config.learning_rate, config.epochs,
                                  milestones=config.lr_milestones, gamma=config.lr_gamma, final=config.lr_final,
                                  plateau=plateau)


def _constant_scheduler() -> tuple[type, dict[str, Any]]:
    """A scheduler that never changes the rate: kept only so that checkpoints keep their format (a "scheduler"
    entry); the rate is set each epoch from :func:`learning_rate_at` (:func:`set_learning_rate`), never stepped."""
    return torch.optim.lr_scheduler.MultiStepLR, {"milestones": [], "gamma": 1.0}


def make_optimizer(config: TrainConfig, params: Iterable[torch.Tensor] | None = None) -> Any:
    """Adam at the first epoch's rate, of either kind; :func:`set_learning_rate` then sets each epoch's rate.

    Without ``params``: Pyro's ``PyroLRScheduler`` (one torch Adam per parameter, made when ``SVI`` first meets
    it; format "pyro"). With ``params``: ``(torch.optim.Adam, scheduler)`` over them (format "torch"); Adam works
    elementwise, so one instance over all parameters updates them as Pyro's per-parameter instances do. The
    schedulers never step (:func:`_constant_scheduler`). On the CPU, torch's fused Adam (the same update to float
    rounding: ``tests/test_engine_choice.py`` checks it against Pyro's Adam) takes about 0.3 ms a step of the
    default VAE against 0.9 ms for the default implementation; elsewhere (CUDA: not measured here) torch's
    default implementation.
    """
    scheduler_class, schedule_args = _constant_scheduler()
    if params is None:
        return pyro.optim.PyroLRScheduler(scheduler_class, {
            "optimizer": torch.optim.Adam, "optim_args": {"lr": config.learning_rate}, **schedule_args})
    params = list(params)
    fused = bool(params) and all(p.device.type == "cpu" for p in params)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate, **({"fused": True} if fused else {}))
    return optimizer, scheduler_class(optimizer, **schedule_args)


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Set the rate of a :func:`make_optimizer` optimizer of either kind, for the steps that follow.

    Pyro's: every per-parameter Adam made so far, and those it makes later (its arguments); a checkpoint's Adam
    state, which Pyro loads when it first meets the parameter, holds the rate set before it was saved.
    """
    if isinstance(optimizer, pyro.optim.PyroOptim):
        optimizer.pt_optim_args["lr"] = lr
        groups = [group for scheduler in optimizer.optim_objs.values() for group in scheduler.optimizer.param_groups]
    else:
        groups = optimizer.param_groups
    for group in groups:
        group["lr"] = lr


def make_torch_optimizer(
    params: Iterable[torch.Tensor], config: TrainConfig
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LRScheduler]:
    """:func:`make_optimizer` with ``params``: one torch Adam and its scheduler."""
    return make_optimizer(config, params)


def current_learning_rate(optimizer: pyro.optim.PyroLRScheduler, config: TrainConfig) -> float:
    """The rate Pyro's optimizer applies now (the configured rate before its first step made an instance)."""
    for scheduler in optimizer.optim_objs.values():
        return scheduler.optimizer.param_groups[0]["lr"]
    return optimizer.pt_optim_args["lr"]


def describe_objective(config: TrainConfig, enumerated: bool | None = None) -> str:
    """The objective of a run in words, e.g. ``Trace_ELBO, 1 particle, beta 4 (warm-up 10 epochs)``.

    ``enumerated``: the program's guide marks sites for enumeration (TraceEnum_ELBO); None: ``config.enumerate``.
    """
    enumerated = config.enumerate if enumerated is None else enumerated
    text = "TraceEnum_ELBO" if enumerated and config.objective == "elbo" else \
        {"elbo": "Trace_ELBO", "meanfield": "TraceMeanField_ELBO", "iwae": "IWAE"}[config.objective]
    text += f", {config.particles} particle{'s' if config.particles > 1 else ''}"
    if config.beta != 1.0 or config.warmup_epochs:
        text += f", beta {config.beta:g}" + (f" (warm-up {config.warmup_epochs} epochs)" if config.warmup_epochs else "")
    if config.labelled is not None:
        alpha = "0.1 N" if config.alpha is None else f"{config.alpha:g}"
        text += f", semi-supervised: {config.labelled} labels, alpha {alpha}"
    return text

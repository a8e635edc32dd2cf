r"""Discrete latents and semi-supervised data in the training loop (issue 26): what the loop does differently for
a program whose guide marks discrete sites for enumeration, and for ``--labelled N``.

**Enumeration.** ``--enumerate`` (``TrainConfig.enumerate``) marks every discrete guide site of the program for
parallel enumeration (:func:`ppl_vae.objectives.enumerate_discrete_sites`) before its first run; the run records it
and every command that rebuilds the program re-applies it (:mod:`ppl_vae.training.run_loading`). A program whose
structure has enumerated sites then trains with ``TraceEnum_ELBO`` (``JitTraceEnum_ELBO`` where checked equal)
through the same loop, engines and checkpoints.

**Semi-supervised data** (Kingma et al. 2014). ``--labelled N`` keeps the labels of N training images, N / C per
class, chosen with the run's seed (:func:`labelled_indices`, recorded in ``data.json``); every epoch is
:func:`ppl_vae.data.labelled.semi_supervised_batches`: batches ``(x, y)`` of labelled images and ``(x,)`` of the
rest. The program, any with the ``model(x, y=None)`` / ``guide(x, y=None)`` convention, observes y on the first
and sums it out on the second; the trainer optimizes :class:`ppl_vae.semisupervised.SemiSupervised`, which adds
:math:`\alpha \, E_\text{labelled}[\log q(y | x)]` (alpha = 0.1 N by default). The labelled set comes from the
seed and the batch order from the run's random stream, so a resumed run continues exactly. On several processes
(``--devices N``) every process builds the same epoch from streams seeded by (seed, epoch) and trains on its share
of each batch, labelled or not (:meth:`ppl_vae.training.strategy.ProcessGroupStrategy.epoch_batches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from ..data import ImageData
from ..data.core import dequantize
from ..data.labelled import (
    choose_labelled,
    labelled_batch_count,
    labelled_record,
    labelled_scale,
    semi_supervised_batches,
)
from ..errors import InvalidDataError, ModelStructureError
from ..evaluate import ProgramStructure
from ..objectives import COMPILED_OBJECTIVES, UnfaithfulTrace, check_enumerate_found, compiled_loss_problem, \
    enumerate_discrete_sites
from ..semisupervised import SemiSupervised, classifier_weight
from .config import TrainConfig
from .engines import COMPILED_LOSS_RTOL, EngineChoice


def mark_enumeration(program: torch.nn.Module, config: TrainConfig) -> None:
    """``--enumerate``: every discrete guide site of ``program`` marked for parallel enumeration, in place."""
    if config.enumerate:
        enumerate_discrete_sites(program)


def check_enumeration(structure: ProgramStructure, config: TrainConfig) -> None:
    """``--enumerate`` that found nothing to sum out is refused (one line)."""
    if config.enumerate:
        check_enumerate_found(structure)


def labelled_indices(data: ImageData, config: TrainConfig) -> torch.Tensor:
    """The training-split indices whose labels ``--labelled N`` keeps: N / C per class, chosen with the seed."""
    labels = data.labels("train")
    if labels is None:
        raise InvalidDataError(f"--labelled: the dataset {data.name} has no labels to keep")
    return choose_labelled(labels, config.labelled, config.seed)


def with_labelled_record(data: ImageData, config: TrainConfig) -> ImageData:
    """``data`` with its record (``data.json``) naming the labelled images of ``--labelled`` (a copy: the data
    object may be shared)."""
    if config.labelled is None:
        return data
    record = {**data.record, "labelled": labelled_record(labelled_indices(data, config), config.seed)}
    return dataclasses.replace(data, record=record)


def trained_program(program: torch.nn.Module, data: ImageData, config: TrainConfig) -> torch.nn.Module:
    """What the engine optimizes before the KL weight: ``program``, or with ``--labelled`` the program plus the
    classifier term, ``weight = alpha / N_l`` (:func:`ppl_vae.semisupervised.classifier_weight`), each labelled
    batch scaled so an epoch counts every labelled image once (:func:`ppl_vae.data.labelled.labelled_scale`)."""
    if config.labelled is None:
        return program
    weight = classifier_weight(config.labelled, data.train.shape[0], config.alpha)
    scale = labelled_scale(config.labelled, config.batch_size, config.labelled_batches)
    return SemiSupervised(program, weight, config.label_site, labelled_scale=scale)


def steps_per_epoch(data: ImageData, config: TrainConfig) -> int:
    """Training steps in one epoch: batches of the training set, or unlabelled plus labelled batches."""
    if config.labelled is None:
        return -(-data.train.shape[0] // config.batch_size)
    unlabelled = data.train.shape[0] - config.labelled
    return -(-unlabelled // config.batch_size) + labelled_batch_count(config.labelled, config.batch_size,
                                                                       config.labelled_batches)


def batch_counts(config: TrainConfig) -> Callable[[tuple], float] | None:
    """How many images a batch counts for in the epoch's training objective per image: a labelled batch at its
    weight (:func:`ppl_vae.data.labelled.labelled_scale`, below 1 where the labelled set is cycled), so the mean is
    over the training images once each, as the objective is; None (its rows) without ``--labelled``."""
    if config.labelled is None:
        return None
    scale = labelled_scale(config.labelled, config.batch_size, config.labelled_batches)
    return lambda batch: batch[0].shape[0] * (scale if len(batch) > 1 else 1.0)


def semi_supervised_epoch(data: ImageData, config: TrainConfig, generator: torch.Generator | None = None,
                          draws: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch of ``(x, y)`` labelled and ``(x,)`` unlabelled batches in the order ``generator`` (a CPU one: the
    index lists are on the CPU) draws, each x drawn as the data's binarization (dynamic: a fresh Bernoulli draw) or
    dequantization says, from ``draws`` (on the data's device; default ``generator``). None: torch's global stream."""
    labels, indices = data.labels("train"), labelled_indices(data, config)
    draws = generator if draws is None else draws
    for batch in semi_supervised_batches(data.train, labels, indices, config.batch_size, generator,
                                         config.labelled_batches):
        x = batch[0]
        if data.binarize == "dynamic":
            x = torch.bernoulli(x, generator=draws)
        elif data.dequantized:
            x = dequantize(x, draws)
        yield (x, *batch[1:])


def labelled_check_batch(data: ImageData, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The first labelled batch of the up-front checks: the first min(batch size, N) labelled images (grey levels
    rounded to one fixed draw) and their labels."""
    rows = labelled_indices(data, config)[: config.batch_size].to(data.train.device)
    x = data.train[rows]
    if data.binarize == "dynamic":
        x = x.round()
    elif data.dequantized:
        x = dequantize(x, torch.Generator(device=x.device).manual_seed(0))
    return x, data.labels("train")[rows.to(data.labels("train").device)]


def labelled_engine_choice(choice: EngineChoice, config: TrainConfig, trained: torch.nn.Module, data: ImageData,
                           max_plate_nesting: int) -> EngineChoice:
    """The engine choice checked on a labelled batch too (its graph differs: y observed, the classifier term):
    the compiled loss is kept only where it equals ``TraceEnum_ELBO``'s there as well."""
    if config.labelled is None or choice.engine != "jit" or config.objective not in COMPILED_OBJECTIVES:
        return choice
    batch = labelled_check_batch(data, config)
    problem = compiled_loss_problem(trained, batch, config.particles, max_plate_nesting, rtol=COMPILED_LOSS_RTOL,
                                    enumerated=True)
    if problem is None:
        return dataclasses.replace(choice, reason=f"{choice.reason}; and on a labelled batch")
    if isinstance(problem, UnfaithfulTrace) and choice.requested == "jit":
        raise ModelStructureError(f"--engine jit cannot train this program faithfully on labelled batches: {problem}. "
                                  "Train it with --engine svi (or auto, which chooses svi for it)")
    return EngineChoice(choice.requested, "svi", f"on a labelled batch, {problem}", choice.check_seconds)

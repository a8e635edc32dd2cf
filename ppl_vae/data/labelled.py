"""Labelled subsets for semi-supervised training (``--labelled N``): which images keep their labels, and batches.

:func:`choose_labelled` picks N training images, N / C of each of the C classes, with the run's seed; the
indices (into the training split) go into ``data.json`` (:func:`labelled_record`) so the run says which labels it
saw. :func:`semi_supervised_batches` yields one epoch of batches: labelled ones ``(x, y)`` and unlabelled ones
``(x,)`` (every other training image, its label dropped), interleaved evenly, each image once per epoch.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ..errors import InvalidDataError


def choose_labelled(labels: torch.Tensor, count: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Indices of ``count`` images whose labels are kept, ``count / C`` per class, chosen with ``seed``: int64, sorted.

    ``labels``: the training split's int64 labels; C = ``num_classes`` (default: the number of classes present).
    Refused in one line: ``count`` not a positive multiple of C, more than the split holds, or more of a class than
    it has.
    """
    classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidDataError(f"--labelled must be a positive integer, got {count!r}")
    if count > labels.shape[0]:
        raise InvalidDataError(f"--labelled {count}: the training split has only {labels.shape[0]} images; give at "
                               f"most {labels.shape[0] - labels.shape[0] % classes}")
    if count % classes:
        raise InvalidDataError(f"--labelled {count} is not divisible by the {classes} classes: the labelled images are "
                               f"balanced per class, so give a multiple of {classes} (e.g. {count - count % classes or classes})")
    per_class = count // classes
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(classes):
        members = (labels.cpu() == c).nonzero().flatten()
        if members.numel() < per_class:
            raise InvalidDataError(f"--labelled {count} needs {per_class} images of class {c}, and the training split "
                                   f"has {members.numel()}: give at most {members.numel() * classes}")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def labelled_record(indices: torch.Tensor, seed: int) -> dict:
    """What ``data.json`` records of the labelled subset: its size, the seed, and the training-split indices."""
    return {"count": int(indices.numel()), "seed": int(seed), "indices": [int(i) for i in indices]}


def labelled_batch_count(num_labelled: int, batch_size: int, labelled_batches: int | None = None) -> int:
    """Labelled batches per epoch: ``labelled_batches``, or enough to visit each labelled image once."""
    once = math.ceil(num_labelled / min(batch_size, max(1, num_labelled)))
    if labelled_batches is None:
        return once
    if isinstance(labelled_batches, bool) or not isinstance(labelled_batches, int) or labelled_batches < once:
        raise InvalidDataError(f"labelled batches per epoch must be an integer of at least {once} (each labelled image "
                               f"once), got {labelled_batches!r}")
    return labelled_batches


def labelled_scale(num_labelled: int, batch_size: int, labelled_batches: int | None = None) -> float:
    """The weight of each labelled batch's terms so that one epoch's objective counts each labelled image once:
    N_l / (labelled images visited per epoch). 1 when each is visited once; below 1 when the labelled set is cycled
    (``labelled_batches`` more than once through it): the same objective per epoch, more frequent, smaller steps."""
    size = min(batch_size, max(1, num_labelled))
    count = labelled_batch_count(num_labelled, batch_size, labelled_batches)
    return 1.0 if labelled_batches is None else num_labelled / (count * size)


def semi_supervised_batches(
    x: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor, batch_size: int,
    generator: torch.Generator | None = None, labelled_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch: every unlabelled image once in batches ``(x,)``, labelled images in batches ``(x, y)``.

    Both sets are shuffled with ``generator``; labelled batches (of ``min(batch_size, N_l)`` images) are spread
    evenly among the unlabelled ones, so each stretch of training sees some, as Pyro's ss_vae example interleaves
    them. By default each labelled image comes once; ``labelled_batches`` (e.g. the number of unlabelled batches,
    one labelled step after each unlabelled one, as Kingma et al.'s code pairs them) cycles through the labelled
    set, reshuffled at each pass, and the trainer then weights the labelled batches by :func:`labelled_scale`.
    ``labelled``: indices from :func:`choose_labelled`.
    """
    if batch_size < 1:
        raise InvalidDataError(f"batch_size must be positive, got {batch_size}")
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[labelled.cpu()] = True
    unlabelled = (~mask).nonzero().flatten()
    labelled = labelled.cpu()

    def batches(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
        order = indices[torch.randperm(indices.numel(), generator=generator)]
        return list(order.split(size)) if indices.numel() else []

    plain = batches(unlabelled, batch_size)
    size = min(batch_size, max(1, labelled.numel()))
    count = labelled_batch_count(labelled.numel(), batch_size, labelled_batches) if labelled.numel() else 0
    with_labels: list[torch.Tensor] = []
    while len(with_labels) < count:  # whole shuffled passes; the last pass is cut at the count
        with_labels += batches(labelled, size)
    with_labels = with_labels[:count]
    total = len(plain) + len(with_labels)
    # Labelled batch j goes at position floor((j + 1/2) * total / count): evenly spread through the epoch.
    positions = {math.floor((j + 0.5) * total / len(with_labels)): j for j in range(len(with_labels))} if with_labels else {}
    plain_iter = iter(plain)
    for position in range(total):
        if position in positions:
            rows = with_labels[positions[position]].to(x.device)
            yield x[rows], labels[rows.to(labels.device)]
        else:
            yield (x[next(plain_iter).to(x.device)],)

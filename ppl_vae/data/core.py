r"""Image datasets as whole-split tensors, with the binarization protocols of the VAE literature.

Every loader (:mod:`.mnist`, :mod:`.cifar10`, :mod:`.npz`) reads 8-bit images as uint8
``[N, C, H, W]`` and hands them to :func:`make_splits`, which turns them into an
:class:`ImageData`: float tensors ``[N, C, H, W]`` on one device, grey levels k/255 in [0, 1].
Images keep that shape through the pipeline: MLPs flatten them, convolutional networks do not.

Binarization (``binarize``), for grey images (C = 1) only:

* ``"dynamic"`` -- every training minibatch is a fresh Bernoulli draw with pixel
  probabilities equal to the grey levels (the protocol of the IWAE paper);
* ``"static"`` -- one fixed Bernoulli draw of the training set (fixed seed);
* ``"none"`` -- grey levels in [0, 1] (the only choice for colour images).

Validation and test images are binarized once with a fixed seed (unless
``"none"``), so test numbers compare across runs and across sessions.

With ``"none"`` and ``dequantize_levels=True`` (what continuous likelihoods need), the
8-bit levels k are turned into y = (k + u) / 256 with u ~ U(0, 1): a fresh draw per
training minibatch, one fixed draw for validation and test. Then
log P(k) >= E_u[log p(y)] - D log 256, which puts densities and probabilities on
one scale (bits/dim).

A whole split lives as one tensor on the training device and is indexed by a
random permutation each epoch: no per-item ``DataLoader`` work in the hot loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import InvalidDataError
from .conditioning import describe_cond

BINARIZATIONS = ("dynamic", "static", "none")
NUM_LEVELS = 256
# Fixed seeds: the same binarized validation/test sets in every run and session.
EVAL_BINARIZATION_SEED = 20151101
STATIC_TRAIN_BINARIZATION_SEED = 20130101


def default_data_dir() -> Path:
    """``$PPL_VAE_DATA`` if set, else a per-user cache folder (``$XDG_CACHE_HOME/ppl_vae``)."""
    env = os.environ.get("PPL_VAE_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ppl_vae"


def resolve_root(data_dir: str | os.PathLike | None) -> Path:
    """The absolute data folder: ``data_dir``, else :func:`default_data_dir`."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return root.resolve()


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Grey levels k/255 -> (k + u) / 256 with u ~ U(0, 1): a point in the level's cell of [0, 1)."""
    levels = torch.round(images * (NUM_LEVELS - 1))
    noise = torch.rand(images.shape, generator=generator, device=generator.device if generator is not None else images.device)
    return (levels + noise.to(images.device)) / NUM_LEVELS


def binarize_once(images: torch.Tensor, seed: int) -> torch.Tensor:
    """One Bernoulli draw of grey levels in [0, 1], reproducible from ``seed`` on any device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images.cpu(), generator=generator).to(images.device)


@dataclass
class ImageData:
    """The three splits as float tensors ``[N, C, H, W]`` on one device, and their labels (when the data have them).

    ``train`` holds grey levels for ``"dynamic"`` binarization (a draw is made per
    minibatch by :meth:`train_batches`) and fixed binary values otherwise.
    ``record`` describes the data for the run directory (``data.json``): the dataset
    (name, or file path and SHA-256), where each split comes from and how many images it has.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    val_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    binarize: str
    dequantized: bool = False
    name: str = "mnist"
    record: dict[str, Any] = field(default_factory=dict)
    # Per-datapoint conditioning arrays (--cond; ppl_vae.data.conditioning): name -> split -> [N, ...] tensor.
    cond: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def grey_levels(self) -> bool:
        """Whether the images are 8-bit grey levels (k/255, binarized or dequantized), which bits/dim presume; not
        tensors passed from Python (:mod:`ppl_vae.data.tensors`), whose values are used as given."""
        return self.record.get("dataset") != "tensors"

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.train.shape[1:])

    @property
    def data_dim(self) -> int:
        """Values per image, D = C H W (what bits/dim divides by)."""
        return self.train[0].numel()

    def flattened(self) -> "ImageData":
        """The same data with every image as a flat vector [N, D] (for code written for MNIST's [N, 784])."""
        return dataclasses.replace(self, **{name: getattr(self, name).flatten(1) for name in ("train", "val", "test")})

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val", "test"):
            raise InvalidDataError(f"unknown split {name!r}: choose 'train', 'val' or 'test'")
        images = getattr(self, name)
        # An evaluation of the training split needs fixed data too.
        if name == "train" and self.binarize == "dynamic":
            return binarize_once(images, EVAL_BINARIZATION_SEED)
        if name == "train" and self.dequantized:
            return dequantize(images, torch.Generator().manual_seed(EVAL_BINARIZATION_SEED))
        return images

    def labels(self, name: str) -> torch.Tensor | None:
        """The labels of split ``name`` (None when the dataset has none)."""
        if name not in ("train", "val", "test"):
            raise InvalidDataError(f"unknown split {name!r}: choose 'train', 'val' or 'test'")
        return getattr(self, f"{name}_labels")

    def conditioning(self, split: str, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """The data the programs take after x for ``split``, in the order of ``names``: ``"y"`` the labels, any
        other name a conditioning array (:mod:`ppl_vae.data.conditioning`). One line for a name the data lack."""
        arrays = []
        for name in names:
            if name == "y":
                if self.labels(split) is None:
                    raise InvalidDataError(f"these data have no labels for the {split} split to condition on")
                arrays.append(self.labels(split))
            elif name not in self.cond:
                held = ", ".join(self.cond) or "none"
                raise InvalidDataError(f"these data have no conditioning array {name!r} (they hold {held})")
            else:
                arrays.append(self.cond[name][split])
        return tuple(arrays)

    def train_batches(
        self, batch_size: int, generator: torch.Generator | None = None, labels: bool = False,
        cond: tuple[str, ...] = (),
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, ...]]:
        """One epoch of minibatches in a fresh random order; with ``labels`` and/or ``cond`` (names of conditioning
        arrays), tuples (images, labels, *arrays): each image's rows, in that order.

        The order and the per-minibatch draws (dynamic binarization, dequantization)
        come from torch's global RNG, or from ``generator`` (on the device of the
        data) when given: distributed training gives every process a generator with
        the same seed, so all of them see the same global minibatches.
        The last, smaller minibatch is kept so every image is seen once per epoch.
        """
        if labels and self.train_labels is None:
            raise InvalidDataError("these data have no labels to condition on")
        given = self.conditioning("train", (("y",) if labels else ()) + tuple(cond))  # checked once, not per batch
        order = torch.randperm(self.train.shape[0], device=self.train.device, generator=generator)
        for start in range(0, order.numel(), batch_size):
            rows = order[start : start + batch_size]
            batch = self.train[rows]
            if self.binarize == "dynamic":
                batch = torch.bernoulli(batch, generator=generator)
            elif self.dequantized:
                batch = dequantize(batch, generator)
            yield (batch, *(array[rows.to(array.device)] for array in given)) if given else batch


# Deprecated: the name the MNIST-only package used; every dataset now gives an ImageData.
MNISTData = ImageData


def check_binarization(binarize: str, channels: int, name: str) -> None:
    """Refuse an unknown binarization, and binarization of colour images (it is defined for grey levels)."""
    if binarize not in BINARIZATIONS:
        raise InvalidDataError(f"unknown binarization {binarize!r}: choose one of {', '.join(BINARIZATIONS)}")
    if binarize != "none" and channels != 1:
        raise InvalidDataError(
            f"{name} has {channels} colour channels, and binarization ({binarize!r}) applies to grey images only: "
            "use --binarize none with a grey-level likelihood (e.g. --likelihood logistic256 or logistic-mixture, "
            "or a continuous one on dequantized data), reported in bits/dim"
        )


def check_uint8_images(images: torch.Tensor, what: str) -> None:
    """Loaders hand :func:`make_splits` uint8 ``[N, C, H, W]``; anything else is a bug of the loader."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise InvalidDataError(f"{what}: expected non-empty uint8 images [N, C, H, W], got {images.dtype} {list(images.shape)}")


def make_splits(
    name: str,
    train: torch.Tensor,
    val: torch.Tensor,
    test: torch.Tensor,
    labels: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    binarize: str,
    device: str | torch.device,
    train_examples: int | None,
    eval_examples: int | None,
    dequantize_levels: bool,
    record: dict[str, Any],
    cond: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> ImageData:
    """uint8 ``[N, C, H, W]`` splits -> :class:`ImageData` with binarization or dequantization applied.

    ``train_examples`` keeps the first training images, ``eval_examples`` the first validation and
    test images; a subset holds exactly the same binary or dequantized images as the full set (the
    fixed-seed draws take one value per pixel, in order, so those of the first images do not depend
    on how many follow).
    Validation and test get independent draws (seeds differ). ``record`` is completed
    with the image shape, the binarization and the number of images of each split. ``cond``: conditioning arrays
    (name -> (train, val, test), checked by :mod:`ppl_vae.data.conditioning`), kept to the same images.
    """
    for images, what in ((train, "training images"), (val, "validation images"), (test, "test images")):
        check_uint8_images(images, f"{name} {what}")
    if not (train.shape[1:] == val.shape[1:] == test.shape[1:]):
        raise InvalidDataError(
            f"{name}: the splits hold images of different shapes: train {list(train.shape[1:])}, "
            f"val {list(val.shape[1:])}, test {list(test.shape[1:])}"
        )
    check_binarization(binarize, train.shape[1], name)

    def first(tensor: torch.Tensor | None, count: int | None) -> torch.Tensor | None:
        return tensor if tensor is None or count is None else tensor[:count]

    def to_float(images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32) / 255.0

    # Only the kept images are converted and drawn (seconds saved on 60,000 images): a seeded draw on the CPU
    # takes its values in order, one per pixel, so the first n images of a draw over the whole split are the
    # draw over its first n images (tests/test_data.py checks it) -- the same images as before the subsetting.
    train, labels_train = first(train, train_examples), first(labels[0], train_examples)
    val, labels_val = first(val, eval_examples), first(labels[1], eval_examples)
    test, labels_test = first(test, eval_examples), first(labels[2], eval_examples)
    kept = {name: {"train": first(t, train_examples), "val": first(v, eval_examples), "test": first(s, eval_examples)}
            for name, (t, v, s) in (cond or {}).items()}
    grey_train, grey_val, grey_test = to_float(train), to_float(val), to_float(test)
    if binarize == "none":
        train_x, val_x, test_x = grey_train, grey_val, grey_test
        if dequantize_levels:
            val_x = dequantize(grey_val, torch.Generator().manual_seed(EVAL_BINARIZATION_SEED))
            test_x = dequantize(grey_test, torch.Generator().manual_seed(EVAL_BINARIZATION_SEED + 1))
    else:
        val_x = binarize_once(grey_val, EVAL_BINARIZATION_SEED)
        test_x = binarize_once(grey_test, EVAL_BINARIZATION_SEED + 1)
        train_x = grey_train if binarize == "dynamic" else binarize_once(grey_train, STATIC_TRAIN_BINARIZATION_SEED)
    dequantized = binarize == "none" and dequantize_levels
    record = {
        **record,
        "image_shape": list(train.shape[1:]),
        "binarize": binarize,
        "dequantized": dequantized,
        "labels": labels_train is not None,
        **({"cond": describe_cond(kept)} if kept else {}),
        "images": {"train": int(train_x.shape[0]), "val": int(val_x.shape[0]), "test": int(test_x.shape[0])},
        "train_examples": train_examples,
        "eval_examples": eval_examples,
    }
    device = torch.device(device)
    return ImageData(
        train=train_x.to(device), val=val_x.to(device), test=test_x.to(device),
        train_labels=_labels_on(labels_train, device), val_labels=_labels_on(labels_val, device),
        test_labels=_labels_on(labels_test, device), binarize=binarize, dequantized=dequantized, name=name, record=record,
        cond={name: {split: array.to(device) for split, array in splits.items()} for name, splits in kept.items()},
    )


def _labels_on(labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Class labels as int64 beside the images (the programs index and one-hot them there)."""
    return None if labels is None else labels.to(device=device, dtype=torch.int64)

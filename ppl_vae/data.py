"""MNIST as whole-split tensors, with the binarization protocols of the VAE literature.

Splits: the first 50,000 images of the official training set are ``train``, the
last 10,000 are ``val``, and the official 10,000 test images are ``test``.

Binarization (``binarize``):

* ``"dynamic"`` -- every training minibatch is a fresh Bernoulli draw with pixel
  probabilities equal to the grey levels (the protocol of the IWAE paper);
* ``"static"`` -- one fixed Bernoulli draw of the training set (fixed seed);
* ``"none"`` -- grey levels in [0, 1].

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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import DataNotFoundError, InvalidDataError

MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
BINARIZATIONS = ("dynamic", "static", "none")
NUM_TRAIN = 50_000
IMAGE_SHAPE = (1, 28, 28)
# Fixed seeds: the same binarized validation/test sets in every run and session.
EVAL_BINARIZATION_SEED = 20151101
STATIC_TRAIN_BINARIZATION_SEED = 20130101
NUM_LEVELS = 256


def default_data_dir() -> Path:
    """``$PPL_VAE_DATA`` if set, else a per-user cache folder (``$XDG_CACHE_HOME/ppl_vae``)."""
    env = os.environ.get("PPL_VAE_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ppl_vae"


def _missing_raw_files(root: Path) -> list[str]:
    raw = root / "MNIST" / "raw"
    return [name for name in MNIST_RAW_FILES if not (raw / name).is_file()]


def _read_mnist_split(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey levels as uint8 [N, 28, 28] and labels [N], read by torchvision."""
    from torchvision.datasets import MNIST

    missing = _missing_raw_files(root)
    try:
        dataset = MNIST(str(root), train=train, download=download and bool(missing))
    except (RuntimeError, OSError) as error:
        raise DataNotFoundError(_missing_message(root, missing, download, error)) from None
    return dataset.data, dataset.targets


def _missing_message(root: Path, missing: list[str], download: bool, error: Exception) -> str:
    raw = root / "MNIST" / "raw"
    why = "downloading them failed (no internet?)" if download else "downloading is turned off"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"MNIST not found: the folder {raw} lacks {', '.join(missing) or 'readable files'}, "
        f"and {why} [{first_line}].\n"
        f"Put the four raw IDX files ({', '.join(MNIST_RAW_FILES)}; .gz archives also work) "
        f"in {raw}, or point --data-dir / PPL_VAE_DATA at the folder that holds MNIST/raw."
    )


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
class MNISTData:
    """The three splits as flat float tensors ``[N, 784]`` on one device.

    ``train`` holds grey levels for ``"dynamic"`` binarization (a draw is made per
    minibatch by :meth:`train_batches`) and fixed binary values otherwise.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    test_labels: torch.Tensor
    binarize: str
    dequantized: bool = False

    @property
    def data_dim(self) -> int:
        return self.train.shape[1]

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

    def train_batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """One epoch of minibatches in a fresh random order.

        The order and the per-minibatch draws (dynamic binarization, dequantization)
        come from torch's global RNG, or from ``generator`` (on the device of the
        data) when given: distributed training gives every process a generator with
        the same seed, so all of them see the same global minibatches.
        The last, smaller minibatch is kept so every image is seen once per epoch.
        """
        order = torch.randperm(self.train.shape[0], device=self.train.device, generator=generator)
        for start in range(0, order.numel(), batch_size):
            batch = self.train[order[start : start + batch_size]]
            if self.binarize == "dynamic":
                batch = torch.bernoulli(batch, generator=generator)
            elif self.dequantized:
                batch = dequantize(batch, generator)
            yield batch


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    binarize: str = "dynamic",
    device: str | torch.device = "cpu",
    train_examples: int | None = None,
    eval_examples: int | None = None,
    download: bool = True,
    dequantize_levels: bool = False,
) -> MNISTData:
    """Load MNIST into memory as :class:`MNISTData`.

    ``train_examples`` / ``eval_examples`` keep only the first images of the
    training / validation and test splits (for quick runs and tests).
    ``dequantize_levels`` (with ``binarize="none"``) dequantizes the grey levels.
    Raises :class:`DataNotFoundError` with the folder and file names when the raw
    files are missing and cannot be downloaded.
    """
    if binarize not in BINARIZATIONS:
        raise InvalidDataError(f"unknown binarization {binarize!r}: choose one of {', '.join(BINARIZATIONS)}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    root = root.resolve()
    train_images, train_labels = _read_mnist_split(root, train=True, download=download)
    test_images, test_labels = _read_mnist_split(root, train=False, download=download)

    def to_float(images: torch.Tensor) -> torch.Tensor:
        return images.reshape(images.shape[0], -1).to(torch.float32) / 255.0

    grey_train, grey_val = to_float(train_images[:NUM_TRAIN]), to_float(train_images[NUM_TRAIN:])
    grey_test = to_float(test_images)
    labels_train, labels_val = train_labels[:NUM_TRAIN], train_labels[NUM_TRAIN:]
    if binarize == "none":
        train, val, test = grey_train, grey_val, grey_test
        if dequantize_levels:
            val = dequantize(grey_val, torch.Generator().manual_seed(EVAL_BINARIZATION_SEED))
            test = dequantize(grey_test, torch.Generator().manual_seed(EVAL_BINARIZATION_SEED + 1))
    else:
        # Draws are made on the full splits before any subsetting, so a subset holds
        # exactly the same binary images as the full set. Validation and test seeds
        # differ so the two sets get independent draws.
        val = binarize_once(grey_val, EVAL_BINARIZATION_SEED)
        test = binarize_once(grey_test, EVAL_BINARIZATION_SEED + 1)
        train = grey_train if binarize == "dynamic" else binarize_once(grey_train, STATIC_TRAIN_BINARIZATION_SEED)
    if train_examples is not None:
        train, labels_train = train[:train_examples], labels_train[:train_examples]
    if eval_examples is not None:
        val, labels_val = val[:eval_examples], labels_val[:eval_examples]
        test, test_labels = test[:eval_examples], test_labels[:eval_examples]
    device = torch.device(device)
    return MNISTData(
        train=train.to(device),
        val=val.to(device),
        test=test.to(device),
        train_labels=labels_train,
        val_labels=labels_val,
        test_labels=test_labels,
        binarize=binarize,
        dequantized=binarize == "none" and dequantize_levels,
    )

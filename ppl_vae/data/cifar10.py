"""CIFAR-10: 32x32 colour images in the "python version" pickle batches.

The files are those of ``cifar-10-python.tar.gz`` unpacked in ``<data folder>/cifar-10-batches-py``:
``data_batch_1`` .. ``data_batch_5`` (50,000 training images) and ``test_batch`` (10,000), each a
pickled dict whose ``"data"`` is uint8 [10000, 3072] (the red, green and blue planes of a
32x32 image, row by row) and ``"labels"`` a list of class indices 0-9.

When the batches are missing, torchvision's ``CIFAR10(download=True)`` fetches and unpacks the
archive (verifying its MD5). The batches are then read here rather than by torchvision's class,
which re-checks every batch against the MD5 of the official file: reading them directly loads
the official files and any file written in the same format alike.

Splits: the first 45,000 training images are ``train``, the last 5,000 (one tenth) ``val``,
``test_batch`` is ``test``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataNotFoundError, InvalidDataError
from .core import ImageData, check_binarization, make_splits, resolve_root

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
IMAGE_SHAPE = (3, 32, 32)
VAL_SHARE = 0.1


def _missing(folder: Path) -> list[str]:
    return [name for name in TRAIN_FILES + TEST_FILES if not (folder / name).is_file()]


def _download(root: Path, folder: Path, missing: list[str], download: bool) -> None:
    why = "downloading is turned off"
    if download:
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(root), train=True, download=True)
            return
        except (RuntimeError, OSError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            why = f"downloading them failed (no internet?) [{first_line}]"
    raise DataNotFoundError(
        f"CIFAR-10 not found: the folder {folder} lacks {', '.join(missing)}, and {why}.\n"
        f"Unpack cifar-10-python.tar.gz (the CIFAR-10 python version: {', '.join(TRAIN_FILES + TEST_FILES)}) "
        f"into {folder}, or point --data-dir / PPL_VAE_DATA at the folder that holds {BASE_FOLDER}."
    )


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch -> (uint8 images [N, 3, 32, 32], labels [N])."""
    try:
        with open(path, "rb") as stream:
            entry = pickle.load(stream, encoding="latin1")  # the official batches were pickled by Python 2
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = torch.as_tensor(np.asarray(entry["labels"], dtype=np.int64))
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise InvalidDataError(f"{path} is not a CIFAR-10 batch (a pickled dict with 'data' and 'labels'): {error}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise InvalidDataError(f"{path}: expected 'data' uint8 [N, 3072] and N 'labels', got data {list(data.shape)} "
                               f"and {labels.shape[0]} labels")
    return torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy()), labels


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    binarize: str = "none",
    device: str | torch.device = "cpu",
    train_examples: int | None = None,
    eval_examples: int | None = None,
    download: bool = True,
    dequantize_levels: bool = False,
) -> ImageData:
    """Load CIFAR-10 into memory as :class:`ImageData` (images [N, 3, 32, 32], grey levels k/255 per channel).

    Raises :class:`DataNotFoundError` naming the folder and the batch files when they are
    missing and cannot be downloaded.
    """
    check_binarization(binarize, 3, "cifar10")  # before minutes of downloading
    root = resolve_root(data_dir)
    folder = root / BASE_FOLDER
    missing = _missing(folder)
    if missing:
        _download(root, folder, missing, download)
    train_parts = [read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = read_batch(folder / TEST_FILES[0])
    train_images = torch.cat([images for images, _ in train_parts])
    train_labels = torch.cat([labels for _, labels in train_parts])
    num_val = round(train_images.shape[0] * VAL_SHARE)
    num_train = train_images.shape[0] - num_val
    record = {
        "dataset": "cifar10",
        "folder": str(folder),
        "splits": {
            "train": f"the first {num_train} images of data_batch_1..5",
            "val": f"the last {num_val} images of data_batch_1..5",
            "test": "test_batch",
        },
    }
    return make_splits(
        "cifar10", train_images[:num_train], train_images[num_train:], test_images,
        (train_labels[:num_train], train_labels[num_train:], test_labels),
        binarize, device, train_examples, eval_examples, dequantize_levels, record,
    )

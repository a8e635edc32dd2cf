"""MNIST, Fashion-MNIST and KMNIST: 28x28 grey images in torchvision's raw IDX files.

Read from ``<data folder>/<Class>/raw``: when the four unpacked IDX files are there they are read
here (:func:`read_idx`, the format torchvision's ``MNIST`` reads, without importing torchvision,
which costs seconds per process); when any is missing, torchvision's dataset classes (``MNIST``,
``FashionMNIST``, ``KMNIST``) download them there (or unpack ``.gz`` archives found there) when the
internet is reachable. Like torchvision, only the files' format is checked (checksums are verified
on download), so files written elsewhere in the same format load as well.

Splits: the first 50,000 images of the official training set are ``train``, the last
10,000 are ``val`` (one sixth: with fewer images in the files, the last sixth), and the
official 10,000 test images are ``test``. Labels are the class indices 0-9.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import DataNotFoundError, InvalidDataError
from .core import ImageData, check_binarization, make_splits, resolve_root

MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
NUM_TRAIN = 50_000
IMAGE_SHAPE = (1, 28, 28)
# Validation share of the official training set: 10,000 of 60,000 (held out from the end, as is usual for MNIST).
VAL_SHARE = 1 / 6

# --dataset name -> (torchvision class name, which is also its folder, and a readable name)
MNIST_FAMILY = {
    "mnist": ("MNIST", "MNIST"),
    "fashion-mnist": ("FashionMNIST", "Fashion-MNIST"),
    "kmnist": ("KMNIST", "KMNIST"),
}


def raw_folder(root: Path, name: str = "mnist") -> Path:
    return root / MNIST_FAMILY[name][0] / "raw"


def missing_raw_files(root: Path, name: str = "mnist") -> list[str]:
    raw = raw_folder(root, name)
    return [file for file in MNIST_RAW_FILES if not (raw / file).is_file()]


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """A uint8 IDX file (LeCun's format) of ``ndim`` dimensions as a uint8 tensor of its shape.

    Layout: a 4-byte magic number (two zero bytes, the type 0x08 = unsigned byte, the number of
    dimensions), one big-endian 32-bit size per dimension, then the values, row-major. Anything else,
    or a byte count that does not match the sizes, is refused naming the file."""
    data = path.read_bytes()
    header = 4 * (ndim + 1)
    sizes = [int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim)]
    expected_magic = bytes((0, 0, 0x08, ndim))
    if data[:4] != expected_magic or len(data) != header + math.prod(sizes):
        raise InvalidDataError(
            f"{path} is not a {ndim}-dimensional uint8 IDX file (magic {data[:4].hex()}, expected "
            f"{expected_magic.hex()}; {len(data)} bytes for sizes {sizes}): replace it with the original file"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*sizes)


def _read_split(root: Path, name: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey levels as uint8 [N, 28, 28] and labels [N]: read here when the raw files are there, else by torchvision."""
    missing = missing_raw_files(root, name)
    if not missing:
        raw = raw_folder(root, name)
        prefix = "train" if train else "t10k"
        return read_idx(raw / f"{prefix}-images-idx3-ubyte", 3), read_idx(raw / f"{prefix}-labels-idx1-ubyte", 1).long()
    import torchvision.datasets  # only to download: importing it takes seconds

    cls = getattr(torchvision.datasets, MNIST_FAMILY[name][0])
    try:
        dataset = cls(str(root), train=train, download=download and bool(missing))
    except (RuntimeError, OSError) as error:
        raise DataNotFoundError(_missing_message(root, name, missing, download, error)) from None
    return dataset.data, dataset.targets


def _missing_message(root: Path, name: str, missing: list[str], download: bool, error: Exception) -> str:
    raw = raw_folder(root, name)
    title, folder = MNIST_FAMILY[name][1], MNIST_FAMILY[name][0]
    why = "downloading them failed (no internet?)" if download else "downloading is turned off"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"{title} not found: the folder {raw} lacks {', '.join(missing) or 'readable files'}, "
        f"and {why} [{first_line}].\n"
        f"Put the four raw IDX files ({', '.join(MNIST_RAW_FILES)}; .gz archives also work) "
        f"in {raw}, or point --data-dir / PPL_VAE_DATA at the folder that holds {folder}/raw."
    )


def load_mnist_family(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    binarize: str = "dynamic",
    device: str | torch.device = "cpu",
    train_examples: int | None = None,
    eval_examples: int | None = None,
    download: bool = True,
    dequantize_levels: bool = False,
) -> ImageData:
    """Load ``name`` (``mnist``, ``fashion-mnist`` or ``kmnist``) into memory as :class:`ImageData` [N, 1, 28, 28].

    Raises :class:`DataNotFoundError` with the folder and file names when the raw files are
    missing and cannot be downloaded.
    """
    check_binarization(binarize, 1, name)  # before minutes of downloading
    root = resolve_root(data_dir)
    train_images, train_labels = _read_split(root, name, train=True, download=download)
    test_images, test_labels = _read_split(root, name, train=False, download=download)
    num_val = round(train_images.shape[0] * VAL_SHARE)
    num_train = train_images.shape[0] - num_val
    record = {
        "dataset": name,
        "folder": str(raw_folder(root, name)),
        "splits": {
            "train": f"the first {num_train} images of train-images-idx3-ubyte",
            "val": f"the last {num_val} images of train-images-idx3-ubyte",
            "test": "t10k-images-idx3-ubyte",
        },
    }
    return make_splits(
        name, train_images[:num_train, None], train_images[num_train:, None], test_images[:, None],
        (train_labels[:num_train], train_labels[num_train:], test_labels),
        binarize, device, train_examples, eval_examples, dequantize_levels, record,
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    binarize: str = "dynamic",
    device: str | torch.device = "cpu",
    train_examples: int | None = None,
    eval_examples: int | None = None,
    download: bool = True,
    dequantize_levels: bool = False,
) -> ImageData:
    """Load MNIST into memory as :class:`ImageData` (images [N, 1, 28, 28]).

    ``train_examples`` / ``eval_examples`` keep only the first images of the
    training / validation and test splits (for quick runs and tests).
    ``dequantize_levels`` (with ``binarize="none"``) dequantizes the grey levels.
    Raises :class:`DataNotFoundError` with the folder and file names when the raw
    files are missing and cannot be downloaded.
    """
    return load_mnist_family("mnist", data_dir, binarize, device, train_examples, eval_examples, download,
                             dequantize_levels)

"""Image datasets for the VAEs: one module per source, one in-memory form (:class:`ImageData`).

``--dataset`` (``TrainConfig.dataset``) is a name or a file:

* ``mnist`` (the default), ``fashion-mnist``, ``kmnist`` -- 28x28 grey, torchvision's raw IDX
  files (:mod:`.mnist`);
* ``cifar10`` -- 32x32 colour, the python pickle batches (:mod:`.cifar10`);
* ``PATH.npz`` -- a user's own uint8 images (:mod:`.npz`).

:func:`load_dataset` reads any of them; images are float tensors [N, C, H, W] of grey levels
k/255, with the binarization (grey images only) or dequantization of :mod:`.core`.
Per-datapoint conditioning arrays (``--cond NAME``: ``NAME_train``, ... of a ``.npz``) are read and checked
by :mod:`.conditioning`; :func:`tensor_data` (:mod:`.tensors`) takes images and conditioning tensors from Python.
``ImageData.record`` describes what was read (name, or path and SHA-256; the splits), and
training writes it into the run directory as ``data.json``.
"""

from __future__ import annotations

import os

import torch

from ..errors import InvalidDataError
from . import cifar10 as _cifar10
from .cifar10 import load_cifar10
from .core import (
    BINARIZATIONS,
    EVAL_BINARIZATION_SEED,
    NUM_LEVELS,
    STATIC_TRAIN_BINARIZATION_SEED,
    ImageData,
    MNISTData,
    binarize_once,
    check_binarization,
    default_data_dir,
    dequantize,
    make_splits,
    sha256_of,
)
from .mnist import (
    IMAGE_SHAPE,
    MNIST_FAMILY,
    MNIST_RAW_FILES,
    NUM_TRAIN,
    load_mnist,
    load_mnist_family,
    missing_raw_files,
)
from .npz import is_npz, load_npz, npz_image_shape
from .tensors import TENSORS_FILE, in_run_directory, tensor_data, tensors_npz_bytes

DATASETS = (*MNIST_FAMILY, "cifar10")
DATA_RECORD_FILE = "data.json"

__all__ = [
    "BINARIZATIONS", "DATASETS", "DATA_RECORD_FILE", "EVAL_BINARIZATION_SEED", "IMAGE_SHAPE", "MNIST_RAW_FILES",
    "NUM_LEVELS", "NUM_TRAIN", "STATIC_TRAIN_BINARIZATION_SEED", "ImageData", "MNISTData", "binarize_once",
    "check_binarization", "check_dataset", "dataset_image_shape", "default_data_dir", "dequantize", "is_npz",
    "load_cifar10", "load_dataset", "load_run_data", "load_mnist", "load_mnist_family", "load_npz", "make_splits", "sha256_of",
    "missing_raw_files", "run_conditioning", "TENSORS_FILE", "in_run_directory", "tensor_data", "tensors_npz_bytes",
]


def check_dataset(dataset: str) -> None:
    """Refuse a ``--dataset`` that is neither a known name nor a ``.npz`` file name."""
    if dataset not in DATASETS and not is_npz(dataset):
        raise InvalidDataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}, or a file PATH.npz")


def dataset_image_shape(dataset: str) -> tuple[int, ...]:
    """(C, H, W) of the images of ``dataset``, without loading it (a ``.npz`` file's ``x_train`` is read)."""
    check_dataset(dataset)
    if is_npz(dataset):
        return npz_image_shape(dataset)
    return _cifar10.IMAGE_SHAPE if dataset == "cifar10" else IMAGE_SHAPE


def load_dataset(
    dataset: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    binarize: str = "dynamic",
    device: str | torch.device = "cpu",
    train_examples: int | None = None,
    eval_examples: int | None = None,
    download: bool = True,
    dequantize_levels: bool = False,
    expected_sha256: str | None = None,
    cond: tuple[str, ...] = (),
) -> ImageData:
    """Load ``dataset`` (a name of :data:`DATASETS` or a ``.npz`` path) as :class:`ImageData`.

    Named datasets are read from ``data_dir`` (else ``$PPL_VAE_DATA``, else ``~/.cache/ppl_vae``)
    and downloaded there when missing and the internet is reachable; a ``.npz`` path is read
    as given. ``expected_sha256`` (a run's record) refuses a ``.npz`` file whose bytes changed.
    Missing files raise :class:`~ppl_vae.errors.DataNotFoundError` naming the files and their folder.
    ``cond`` names conditioning arrays of a ``.npz`` file (:mod:`.conditioning`); named datasets have none.
    """
    check_dataset(dataset)
    if cond and not is_npz(dataset):
        raise InvalidDataError(f"--cond {' '.join(cond)}: conditioning arrays are read from a .npz file "
                               f"(NAME_train, NAME_val, NAME_test beside x_train, ...), and {dataset} is a named "
                               "dataset: give --dataset PATH.npz, or pass tensors from Python (ppl_vae.data.tensor_data)")
    if is_npz(dataset):
        if expected_sha256 is not None:
            found = sha256_of(dataset) if os.path.isfile(dataset) else None
            if found is not None and found != expected_sha256:
                raise InvalidDataError(
                    f"{dataset} has changed since the run was trained (SHA-256 {found[:12]}..., the run recorded "
                    f"{expected_sha256[:12]}...): its numbers would not be about the same images. Restore the file, "
                    "or train a new run on it"
                )
        return load_npz(dataset, binarize, device, train_examples, eval_examples, dequantize_levels, cond=cond)
    if dataset == "cifar10":
        return load_cifar10(data_dir, binarize, device, train_examples, eval_examples, download, dequantize_levels)
    return load_mnist_family(dataset, data_dir, binarize, device, train_examples, eval_examples, download,
                             dequantize_levels)


def load_run_data(
    train_config: dict,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    eval_examples: int | None = None,
    dequantize_levels: bool = False,
) -> ImageData:
    """The data of a run, from its ``config.json`` ``"train"`` record: the same dataset, binarization and splits.

    Every image of every split (``eval_examples`` keeps the first validation and test images);
    ``data_dir`` overrides the run's folder for named datasets. Runs made before datasets were
    recorded are MNIST runs. A ``.npz`` file must still have the SHA-256 the run recorded. The run's conditioning
    arrays (``"cond"``) are read again, checked as in training.
    """
    return load_dataset(
        train_config.get("dataset", "mnist"), data_dir or train_config.get("data_dir"), train_config["binarize"],
        device, eval_examples=eval_examples, dequantize_levels=dequantize_levels,
        expected_sha256=train_config.get("dataset_sha256"), cond=tuple(train_config.get("cond") or ()),
    )


def run_conditioning(train_config: dict) -> tuple[str, ...]:
    """The names of the data a run's programs take after x, in order: ``y`` (``--labels``), then its ``--cond``."""
    return (("y",) if train_config.get("labels") else ()) + tuple(train_config.get("cond") or ())

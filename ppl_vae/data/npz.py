"""A user's own images from one NumPy ``.npz`` file (``--dataset PATH.npz``).

The file holds uint8 arrays (grey levels 0-255):

* ``x_train`` and ``x_test`` (required), ``x_val`` (optional): [N, H, W] for grey images or
  [N, H, W, C] for colour (channels last, as NumPy and image tools write them); every array
  has the same image shape;
* ``y_train``, ``y_val``, ``y_test`` (optional): integer labels [N], one per image;
* for each conditioning array named with ``--cond NAME`` (``cond``): ``NAME_train``, ``NAME_test`` and, with
  ``x_val``, ``NAME_val``: numeric [N, ...], one row per image (:mod:`.conditioning`), passed to the programs
  after x (and the labels).

Without ``x_val``, a fixed share (``VAL_SHARE``, 10%) of ``x_train`` is held out as the
validation split, chosen by a permutation with a fixed seed (``SPLIT_SEED``), so every run
and ``ppl-vae evaluate`` get the same split; the labels and conditioning arrays of those images go with them (a
``NAME_val`` without ``x_val`` is refused: it would belong to no images). Images become [N, C, H, W] (C = 1 for grey).
Anything else (other dtypes, ranks, a channels-first array) is refused with a message saying
what was found and what is expected.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataNotFoundError, InvalidDataError
from ..npz_files import check_npz
from .conditioning import check_cond_names, conditioning_splits
from .core import ImageData, make_splits, sha256_of
from .tensors import TENSORS_MARKER, load_tensors_npz

VAL_SHARE = 0.1
SPLIT_SEED = 20240518
IMAGE_KEYS = ("x_train", "x_val", "x_test")
LABEL_KEYS = ("y_train", "y_val", "y_test")
EXPECTED = ("uint8 arrays x_train and x_test (and optionally x_val) of shape [N, H, W] (grey) or [N, H, W, C] "
            "(colour, channels last), with optional integer labels y_train / y_val / y_test of shape [N]")


def is_npz(dataset: str) -> bool:
    """Whether ``--dataset`` names a file (``*.npz``) rather than a dataset."""
    return str(dataset).lower().endswith(".npz")


def _open(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise DataNotFoundError(f"the dataset file {path} does not exist (--dataset PATH.npz expects {EXPECTED})")
    check_npz(path, f"expected {EXPECTED}")  # before NumPy allocates: object arrays, a .npy, a size the file cannot hold
    try:
        return np.load(path, allow_pickle=False)  # never unpickle objects from a user's file
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InvalidDataError(f"{path} is not a readable .npz file ({error}); expected {EXPECTED}") from None


def _read(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    """One array of the archive; a damaged member (bad CRC, cut short) is one line."""
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidDataError(f"{path}: the array {key!r} cannot be read ({type(error).__name__}: {error})") from None


def _images(path: Path, key: str, array: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> uint8 tensor [N, C, H, W]."""
    found = f"{path}: {key} is {array.dtype} of shape {list(array.shape)}"
    if array.dtype != np.uint8:
        raise InvalidDataError(f"{found}; expected uint8 grey levels 0-255 (convert with "
                               "np.clip(x, 0, 255).astype(np.uint8), or x * 255 for values in [0, 1])")
    if array.ndim not in (3, 4) or array.shape[0] == 0 or 0 in array.shape:
        raise InvalidDataError(f"{found}; expected a non-empty [N, H, W] (grey) or [N, H, W, C] (colour) array")
    if array.ndim == 3:
        array = array[..., None]
    elif array.shape[3] > 4 and array.shape[1] <= 4:  # [N, C, H, W]: a channels-first array
        raise InvalidDataError(f"{found}, which looks channels-first; expected channels last, [N, H, W, C]: "
                               "use np.transpose(x, (0, 2, 3, 1))")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def _labels(path: Path, key: str, array: np.ndarray, count: int) -> torch.Tensor:
    if not np.issubdtype(array.dtype, np.integer) or array.shape != (count,):
        raise InvalidDataError(f"{path}: {key} is {array.dtype} of shape {list(array.shape)}; expected integer labels "
                               f"of shape [{count}], one per image of x_{key[2:]}")
    return torch.from_numpy(array.astype(np.int64))


def load_npz(
    path: str | os.PathLike,
    binarize: str = "none",
    device: str | torch.device = "cpu",
    train_examples: int | None = None,
    eval_examples: int | None = None,
    dequantize_levels: bool = False,
    cond: tuple[str, ...] = (),
) -> ImageData:
    """Load a user's ``.npz`` file (see the module docstring) as :class:`ImageData` [N, C, H, W].

    ``record`` holds the file's absolute path and SHA-256, and where each split comes from. ``cond`` names the
    conditioning arrays to read (``NAME_train``, ...), each checked and refused in one line naming it.
    """
    path = Path(path).expanduser().resolve()
    cond = check_cond_names(cond)
    with _open(path) as archive:
        keys = set(archive.files)
        if TENSORS_MARKER in keys:  # a run's own tensors.npz passed from Python
            arrays = {key: _read(archive, path, key) for key in keys}  # a damaged member: one line naming it
            return load_tensors_npz(arrays, path, cond, binarize=binarize, device=device,
                                    train_examples=train_examples, eval_examples=eval_examples)
        missing = [key for key in ("x_train", "x_test") if key not in keys]
        if missing:
            raise InvalidDataError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(sorted(keys)) or 'nothing'}); "
                                   f"expected {EXPECTED}")
        images = {key: _images(path, key, _read(archive, path, key)) for key in IMAGE_KEYS if key in keys}
        labels = {
            key: _labels(path, key, _read(archive, path, key), images[f"x_{key[2:]}"].shape[0])
            for key in LABEL_KEYS if key in keys and f"x_{key[2:]}" in images
        }
        arrays = {key: _read(archive, path, key) for key in keys
                  if any(key == f"{name}_{split}" for name in cond for split in ("train", "val", "test"))}
    shapes = {key: list(x.shape[1:]) for key, x in images.items()}
    if len({tuple(shape) for shape in shapes.values()}) > 1:
        raise InvalidDataError(f"{path}: the arrays hold images of different shapes ({shapes}); expected one shape "
                               "[H, W] or [H, W, C] for all of them")
    x_train, y_train = images["x_train"], labels.get("y_train")
    splits = {"train": "x_train", "test": "x_test"}
    if "x_val" in images:
        x_val, y_val = images["x_val"], labels.get("y_val")
        splits["val"] = "x_val"
    else:
        num_val = max(1, round(VAL_SHARE * x_train.shape[0]))
        if num_val >= x_train.shape[0]:
            raise InvalidDataError(f"{path}: x_train holds {x_train.shape[0]} image(s), too few to hold out "
                                   f"{VAL_SHARE:.0%} for validation: add x_val, or more training images")
        order = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
        held_out, kept = order[:num_val], order[num_val:]
        x_val, y_val = x_train[held_out], None if y_train is None else y_train[held_out]
        x_train, y_train = x_train[kept], None if y_train is None else y_train[kept]
        arrays = _hold_out_cond(path, cond, arrays, x_train.shape[0] + num_val, held_out, kept)
        splits["train"] = f"x_train without the validation images ({x_train.shape[0]} images)"
        splits["val"] = (f"{num_val} images of x_train ({VAL_SHARE:.0%}) held out by a permutation with seed "
                         f"{SPLIT_SEED}")
    record = {"dataset": "npz", "path": str(path), "sha256": sha256_of(path), "splits": splits,
              "val_share": None if "x_val" in images else VAL_SHARE, "split_seed": None if "x_val" in images else SPLIT_SEED}
    counts = {"train": x_train.shape[0], "val": x_val.shape[0], "test": images["x_test"].shape[0]}
    checked = conditioning_splits(cond, arrays, counts, lambda key: f"{key} of {path}")
    return make_splits(
        path.name, x_train, x_val, images["x_test"], (y_train, y_val, labels.get("y_test")),
        binarize, device, train_examples, eval_examples, dequantize_levels, record,
        cond={name: (s["train"], s["val"], s["test"]) for name, s in checked.items()},
    )


def _hold_out_cond(path: Path, cond: tuple[str, ...], arrays: dict[str, np.ndarray], count: int,
                   held_out: torch.Tensor, kept: torch.Tensor) -> dict[str, np.ndarray]:
    """Without x_val: each ``NAME_train`` split as x_train is (its held-out rows become ``NAME_val``)."""
    arrays = dict(arrays)
    for name in cond:
        if f"{name}_val" in arrays:
            raise InvalidDataError(f"{path}: {name}_val is given but x_val is not, so the validation images are held "
                                   f"out of x_train and their {name} rows come from {name}_train: remove {name}_val, "
                                   "or add x_val")
        train = arrays.get(f"{name}_train")
        if train is None:
            continue  # named as missing by conditioning_splits
        if train.ndim == 0 or train.shape[0] != count:
            raise InvalidDataError(f"{name}_train of {path} has shape {list(train.shape)}: expected one row per image "
                                   f"of x_train, [{count}, ...]")
        arrays[f"{name}_val"], arrays[f"{name}_train"] = train[held_out.numpy()], train[kept.numpy()]
    return arrays


def npz_image_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """(C, H, W) of the images in a ``.npz`` file, from ``x_train`` (checked as :func:`load_npz` checks it)."""
    path = Path(path).expanduser().resolve()
    with _open(path) as archive:
        if "x_train" not in archive.files:
            raise InvalidDataError(f"{path} lacks x_train; expected {EXPECTED}")
        if TENSORS_MARKER in archive.files:  # a run's tensors.npz: any shape per datapoint
            return tuple(_read(archive, path, "x_train").shape[1:])
        return tuple(_images(path, "x_train", _read(archive, path, "x_train")).shape[1:])

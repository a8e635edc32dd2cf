"""Per-datapoint conditioning data: arrays beside the images that the programs take after x (``--cond NAME``).

A program ``model(x, c)`` / ``guide(x, c)`` is given, for every split, one row of each conditioning array per image:
``c[i]`` belongs to ``x[i]``. The arrays come from a ``.npz`` file (``c_train``, ``c_val``, ``c_test`` for
``--cond c``; :func:`ppl_vae.data.npz.load_npz`) or from tensors passed in Python (:func:`ppl_vae.data.tensor_data`),
and are passed after x in the order named. They are checked once, before training, each failure one line naming
the array (:func:`conditioning_tensor`): present for every split, numeric, one row per image, the same shape per
row in every split, and finite. Integer arrays become int64 (indices, labels); floating and boolean ones float32,
the dtype of the images and of the programs' networks.

``x`` names the images and ``y`` their class labels (``--labels``), so neither can name a conditioning array.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..errors import InvalidDataError

SPLITS = ("train", "val", "test")
RESERVED = {"x": "the images", "y": "the class labels (condition on them with --labels)"}


def check_cond_names(names: Any) -> tuple[str, ...]:
    """The conditioning arrays' names as a tuple, each a distinct identifier other than x and y; one line if not."""
    names = (names,) if isinstance(names, str) else names
    if not isinstance(names, Iterable):
        raise InvalidDataError(f"cond must be a list of array names, e.g. ['c'], got {names!r}")
    names = tuple(names)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidDataError(f"--cond {name!r}: a conditioning array's name is an identifier, e.g. c or "
                                   "age (the .npz then holds c_train, c_val, c_test)")
        if name in RESERVED:
            raise InvalidDataError(f"--cond {name}: {name} names {RESERVED[name]}; give the array another name")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidDataError(f"--cond names {', '.join(repeated)} more than once: each array is passed once")
    return names


def conditioning_tensor(value: Any, where: str, count: int, row_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """One split's conditioning array, checked, as a CPU tensor: int64 for integers, float32 for floats and bools.

    ``where`` names the array in messages (e.g. ``c_val of data.npz``); ``count`` is the number of images of the
    split (one row each); ``row_shape`` the shape of one row in the training split, which every split must share.
    """
    array = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    if not isinstance(array, torch.Tensor):
        array = np.asarray(array)
        if array.dtype.kind not in "biuf":
            raise InvalidDataError(f"{where} is {array.dtype}, not numeric: conditioning data must be integers, "
                                   "floats or booleans")
        array = torch.from_numpy(np.ascontiguousarray(array)).reshape(array.shape)  # keeps a 0-d array 0-d
    elif array.is_complex():
        raise InvalidDataError(f"{where} is {array.dtype}, not real: conditioning data must be integers, floats or "
                               "booleans")
    if array.dim() == 0 or array.shape[0] != count:
        raise InvalidDataError(f"{where} has shape {list(array.shape)}: expected one row per image, [{count}, ...]")
    if row_shape is not None and tuple(array.shape[1:]) != tuple(row_shape):
        raise InvalidDataError(f"{where} has rows of shape {list(array.shape[1:])}, the training split's "
                               f"{list(row_shape)}: every split needs the same shape per image")
    floating = array.is_floating_point()
    array = array.to(torch.float32 if floating or array.dtype == torch.bool else torch.int64)
    if floating and not bool(torch.isfinite(array).all()):
        bad = int((~torch.isfinite(array)).flatten(1).any(1).nonzero()[0]) if array.dim() > 1 else \
            int((~torch.isfinite(array)).nonzero()[0])
        raise InvalidDataError(f"{where} holds NaN or infinite values (first at row {bad}, "
                               f"{array[bad].flatten()[:4].tolist()}): every value must be finite")
    return array


def conditioning_splits(
    names: tuple[str, ...], arrays: dict[str, Any], counts: dict[str, int], where: Any,
) -> dict[str, dict[str, torch.Tensor]]:
    """Every named array of every split, checked: ``arrays[f"{name}_{split}"]``, ``counts[split]`` images each.

    ``where(key)`` names an array in messages (its file, or "the tensor"). A missing array is one line naming it.
    """
    result = {}
    for name in check_cond_names(names):
        result[name], row_shape = {}, None
        for split in SPLITS:
            key = f"{name}_{split}"
            if key not in arrays:
                raise InvalidDataError(f"--cond {name}: {where(key)} is missing: every split needs its {name} "
                                       f"({', '.join(f'{name}_{s}' for s in SPLITS)})")
            result[name][split] = conditioning_tensor(arrays[key], where(key), counts[split], row_shape)
            row_shape = tuple(result[name][split].shape[1:])
    return result


def describe_cond(cond: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """The record of the conditioning arrays for data.json: each one's dtype and the shape of one row."""
    return {name: {"dtype": str(splits["train"].dtype).removeprefix("torch."),
                   "row_shape": list(splits["train"].shape[1:])} for name, splits in cond.items()}

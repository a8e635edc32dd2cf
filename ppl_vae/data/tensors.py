"""Data passed from Python as tensors: images x and any conditioning tensors, per split (:func:`tensor_data`).

Each split is ``x`` or a tuple ``(x, *cond)``: x a float tensor ``[N, ...]`` (one datapoint per row, e.g.
``[N, C, H, W]`` or ``[N, D]``), then one tensor per name of ``cond`` in that order, one row per datapoint
(:mod:`.conditioning` checks them as it checks a ``.npz`` file's arrays). The binarization protocols of
:mod:`.core` apply to values in [0, 1]: ``"none"`` uses x as given (no dequantization), ``"static"`` and
``"dynamic"`` draw Bernoulli values with the same fixed seeds as for image files.

A run trained from tensors (``train(run_dir, data={"train": (x, c), ...})``) keeps them in the run directory as
``tensors.npz`` (:func:`tensors_npz_bytes`; float arrays and the marker ``ppl_vae_tensors``), recorded as its dataset
with its SHA-256, so ``evaluate``, ``--resume``, ``plot`` and ``audit`` read the same data again
(:func:`ppl_vae.data.npz.load_npz` reads such a file with :func:`tensor_data`), from wherever the run directory
now lies (:func:`in_run_directory`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidDataError
from .conditioning import SPLITS, check_cond_names, conditioning_splits, describe_cond
from .core import BINARIZATIONS, EVAL_BINARIZATION_SEED, STATIC_TRAIN_BINARIZATION_SEED, ImageData, binarize_once

TENSORS_MARKER = "ppl_vae_tensors"  # the key that marks a run's tensors.npz (float x, any shape)
TENSORS_FILE = "tensors.npz"  # where a run trained from tensors keeps them


def in_run_directory(train_record: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """A run's ``config.json`` ``"train"`` record with its tensors found in the run directory where it now lies.

    config.json records the path the run's ``tensors.npz`` had when training started; a run directory moved or
    copied since keeps the file, and its own copy is the dataset (the SHA-256 the run recorded is still checked
    when it is read). Any other dataset is left as recorded.
    """
    if not isinstance(train_record, dict):
        return train_record  # not a record: its reader refuses it
    dataset, own = train_record.get("dataset"), Path(run_dir).resolve() / TENSORS_FILE
    if isinstance(dataset, str) and Path(dataset).name == TENSORS_FILE and Path(dataset) != own and own.is_file():
        return {**train_record, "dataset": str(own)}
    return train_record


def split_tensors(splits: Mapping[str, Any], cond: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{"train": x or (x, *cond), "val": ..., "test": ...}`` as tuples (x, *cond), checked for their count."""
    if not isinstance(splits, Mapping) or set(splits) != set(SPLITS):
        keys = sorted(splits) if isinstance(splits, Mapping) else type(splits).__name__
        raise InvalidDataError(f"data from tensors is a dict of the splits 'train', 'val' and 'test', each x or "
                               f"(x, *cond); got {keys}")
    result = {}
    for split in SPLITS:
        given = splits[split]
        parts = tuple(given) if isinstance(given, (tuple, list)) else (given,)
        if len(parts) > 1 + len(cond):
            raise InvalidDataError(f"the {split} split gives x and {len(parts) - 1} more tensor(s), but cond names "
                                   f"{len(cond)} ({list(cond)}): name every tensor after x, in order, e.g. "
                                   "TrainConfig(cond=('c',)) or tensor_data(..., cond=('c',))")
        if len(parts) != 1 + len(cond):
            names = ", ".join(("x", *cond))
            raise InvalidDataError(f"the {split} split gives {len(parts)} tensor(s), but the programs take ({names}) "
                                   f"(cond={list(cond)}): give ({names}) for every split")
        result[split] = parts
    return result


def _images(value: Any, split: str, binarize: str) -> torch.Tensor:
    """x of a split: a finite float tensor [N, ...], N >= 1; in [0, 1] where it is binarized."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2 or value.shape[0] == 0:
        found = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise InvalidDataError(f"the {split} x is {found}: expected a float tensor [N, ...], one datapoint per row")
    x = value.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise InvalidDataError(f"the {split} x holds NaN or infinite values: every value must be finite")
    if binarize != "none" and not bool(((x >= 0) & (x <= 1)).all()):
        raise InvalidDataError(f"the {split} x has values outside [0, 1], which --binarize {binarize} draws as "
                               "Bernoulli probabilities: scale them to [0, 1], or use binarize='none'")
    return x


def tensor_data(
    train: Any, val: Any, test: Any, cond: Any = (), binarize: str = "none", device: str | torch.device = "cpu",
    train_examples: int | None = None, eval_examples: int | None = None, record: dict[str, Any] | None = None,
) -> ImageData:
    """Tensors per split (module docstring) as :class:`ImageData`, every one checked; each failure one line naming
    the tensor. ``cond`` names the conditioning tensors after x; ``train_examples`` / ``eval_examples`` keep the
    first datapoints, as for image files."""
    if binarize not in BINARIZATIONS:
        raise InvalidDataError(f"unknown binarization {binarize!r}: choose one of {', '.join(BINARIZATIONS)}")
    cond = check_cond_names(cond)
    parts = split_tensors({"train": train, "val": val, "test": test}, cond)
    x = {split: _images(parts[split][0], split, binarize) for split in SPLITS}
    if len({tuple(t.shape[1:]) for t in x.values()}) > 1:
        raise InvalidDataError("the splits' x have different shapes per datapoint: "
                               + ", ".join(f"{split} {list(t.shape[1:])}" for split, t in x.items()))
    arrays = {f"{name}_{split}": parts[split][1 + i] for split in SPLITS for i, name in enumerate(cond)}
    checked = conditioning_splits(cond, arrays, {s: t.shape[0] for s, t in x.items()}, lambda key: f"the tensor {key}")
    keep = {"train": train_examples, "val": eval_examples, "test": eval_examples}
    x = {split: t[: keep[split]] for split, t in x.items()}
    checked = {name: {split: t[: keep[split]] for split, t in splits.items()} for name, splits in checked.items()}
    if binarize != "none":
        x["val"] = binarize_once(x["val"], EVAL_BINARIZATION_SEED)
        x["test"] = binarize_once(x["test"], EVAL_BINARIZATION_SEED + 1)
        if binarize == "static":
            x["train"] = binarize_once(x["train"], STATIC_TRAIN_BINARIZATION_SEED)
    record = {"dataset": "tensors", **(record or {}), "image_shape": list(x["train"].shape[1:]), "binarize": binarize,
              "dequantized": False, "labels": False, **({"cond": describe_cond(checked)} if checked else {}),
              "images": {split: int(t.shape[0]) for split, t in x.items()},
              "train_examples": train_examples, "eval_examples": eval_examples}
    device = torch.device(device)
    return ImageData(train=x["train"].to(device), val=x["val"].to(device), test=x["test"].to(device),
                     train_labels=None, val_labels=None, test_labels=None, binarize=binarize, name="tensors",
                     record=record, cond={name: {s: t.to(device) for s, t in splits.items()}
                                          for name, splits in checked.items()})


def tensors_npz_bytes(splits: Mapping[str, Any], cond: tuple[str, ...]) -> bytes:
    """The tensors as given (before any binarization), as the bytes of a run's ``tensors.npz``."""
    parts = split_tensors(splits, tuple(cond))
    arrays = {TENSORS_MARKER: np.array(1)}
    for split in SPLITS:
        for name, value in zip(("x", *cond), parts[split]):
            arrays[f"{name}_{split}"] = torch.as_tensor(value).detach().cpu().numpy()
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    return stream.getvalue()


def load_tensors_npz(arrays: Mapping[str, np.ndarray], path: Any, cond: tuple[str, ...], **options: Any) -> ImageData:
    """The arrays of a run's ``tensors.npz`` (read by :func:`ppl_vae.data.npz.load_npz`) as :class:`ImageData`,
    checked as the tensors were when the run started (``options``: of :func:`tensor_data`)."""
    wanted = [f"{name}_{split}" for split in SPLITS for name in ("x", *cond)]
    missing = [key for key in wanted if key not in arrays]
    if missing:
        raise InvalidDataError(f"{path} (the tensors a run was trained on) lacks {', '.join(missing)}")
    splits = {split: tuple(torch.from_numpy(np.ascontiguousarray(arrays[f"{name}_{split}"])) for name in ("x", *cond))
              for split in SPLITS}
    return tensor_data(splits["train"], splits["val"], splits["test"], cond=cond, record={"path": str(path)},
                       **options)

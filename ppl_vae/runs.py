"""A run directory: its configuration, metrics log, checkpoints and results.

Layout of ``RUN_DIR``::

    config.json        the model and training configuration (plain data)
    metrics.jsonl      one JSON object per epoch (train and validation ELBO, ...)
    checkpoint.pt      the latest checkpoint, written atomically before the first epoch and after every epoch
    checkpoint.prev.pt the checkpoint before it (kept in case the latest is damaged)
    checkpoint.damaged.pt  a damaged latest checkpoint set aside by ``--resume`` (only then)
    test.json          the final test evaluation of ``ppl-vae train``
    evaluation.json    the table of ``ppl-vae evaluate``

Crash safety: every file but ``metrics.jsonl`` is written to a temporary file,
flushed to disk and renamed over its target, so a kill leaves the old or the new
version, never a mix. A new checkpoint is complete on disk before the latest one
becomes ``checkpoint.prev.pt``. ``metrics.jsonl`` is appended before each
checkpoint; resuming truncates it to the checkpoint's epoch, and a line cut short
by a crash is ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointFallbackWarning, RunDirectoryError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
DAMAGED_CHECKPOINT_FILE = "checkpoint.damaged.pt"
CHECKPOINT_FORMAT = 1


def check_run_dir(run_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """The checks of :func:`prepare_run_dir`, changing nothing: raises :class:`RunDirectoryError` where it would."""
    path = Path(run_dir)
    if resume and overwrite:
        raise RunDirectoryError("--resume and --overwrite contradict each other: give one of them")
    if resume:
        if not any((path / name).is_file() for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE)):
            raise RunDirectoryError(
                f"cannot resume: {path / CHECKPOINT_FILE} does not exist (the run stopped before its first "
                "checkpoint, or this is no run directory); start it again with --overwrite"
            )
    elif path.exists() and any(path.iterdir()) and not overwrite:
        raise RunDirectoryError(
            f"the run directory {path} already exists and is not empty: pass --resume to continue "
            "that run, --overwrite to replace it, or choose another --run-dir"
        )
    return path


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """Create ``run_dir`` for a new run, or check it holds a run to resume.

    An existing, non-empty folder is refused unless ``resume`` (continue it) or
    ``overwrite`` (delete it first) is given, so no earlier run is lost by accident.
    """
    path = check_run_dir(run_dir, resume, overwrite)
    if resume:
        return path
    if path.exists() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_temporary(path: Path, write: Callable) -> str:
    """Write through ``write(stream)`` into a new temporary file next to ``path``, flushed to disk; return its name."""
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes files private; run files are meant to be shared
    except BaseException:
        os.unlink(tmp_name)
        raise
    return tmp_name


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp_name = _write_temporary(path, write)
    try:
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    _atomic_write(Path(path), lambda stream: stream.write(text.encode()))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RunDirectoryError(f"{path} does not exist: is {path.parent} a ppl_vae run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunDirectoryError(f"{path} is not valid JSON ({error})") from None


def append_metrics(run_dir: str | os.PathLike, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as stream:
        stream.write(json.dumps(record) + "\n")
        stream.flush()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything before it is good
    return records


def truncate_metrics(run_dir: str | os.PathLike, last_epoch: int) -> None:
    """Drop metric records after ``last_epoch`` (written by a run that died before its next checkpoint)."""
    records = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= last_epoch]
    text = "".join(json.dumps(r) + "\n" for r in records)
    _atomic_write(Path(run_dir) / METRICS_FILE, lambda stream: stream.write(text.encode()))


def save_checkpoint(run_dir: str | os.PathLike, state: dict) -> Path:
    """Atomically write ``state`` as the latest checkpoint; the one before it becomes ``checkpoint.prev.pt``.

    The new checkpoint is written completely first, so a failure while writing it
    (a full disk, a kill) leaves both earlier checkpoints as they were.
    """
    run_dir = Path(run_dir)
    latest, previous = run_dir / CHECKPOINT_FILE, run_dir / PREVIOUS_CHECKPOINT_FILE
    state = {"format": CHECKPOINT_FORMAT, **state}
    tmp_name = _write_temporary(latest, lambda stream: torch.save(state, stream))
    try:
        if latest.is_file():
            os.replace(latest, previous)
        os.replace(tmp_name, latest)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return latest


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint in the file ``path``; a :class:`RunDirectoryError` naming the file if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise RunDirectoryError(f"no checkpoint at {path}: is {path.parent} a ppl_vae run directory?")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for a damaged zip/pickle
        raise RunDirectoryError(f"the checkpoint {path} is damaged or truncated ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunDirectoryError(f"{path} is not a ppl_vae checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def load_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The latest checkpoint of ``run_dir``; a clear error naming the file if it is missing or damaged.

    No fallback here: evaluating an older epoch without being asked would be a
    silent surprise. The error names ``checkpoint.prev.pt`` when it exists.
    """
    run_dir = Path(run_dir)
    try:
        return read_checkpoint(run_dir / CHECKPOINT_FILE, map_location)
    except RunDirectoryError as error:
        previous = run_dir / PREVIOUS_CHECKPOINT_FILE
        if not previous.is_file():
            raise
        raise RunDirectoryError(
            f"{error}; the checkpoint before it is kept at {previous} (`ppl-vae train --run-dir {run_dir} "
            "--resume` continues from it)"
        ) from None


def load_checkpoint_for_resume(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint to resume ``run_dir`` from: the latest, else (damaged or missing) the one before it.

    Falling back warns (:class:`CheckpointFallbackWarning`), sets the damaged file
    aside as ``checkpoint.damaged.pt`` and copies the good one to ``checkpoint.pt``, so
    the next save cannot rotate a damaged file over the good ``checkpoint.prev.pt``.
    The caller truncates ``metrics.jsonl`` to the epoch of the returned state. Raises
    when neither checkpoint can be read.
    """
    run_dir = Path(run_dir)
    latest, previous = run_dir / CHECKPOINT_FILE, run_dir / PREVIOUS_CHECKPOINT_FILE
    try:
        return read_checkpoint(latest, map_location)
    except RunDirectoryError as error:
        if not previous.is_file():
            raise
        problem = str(error) if latest.is_file() else f"{latest} is missing (the run stopped while saving it)"
    try:
        state = read_checkpoint(previous, map_location)
    except RunDirectoryError as error:
        raise RunDirectoryError(f"cannot resume: {problem}, and {error}; start the run again with --overwrite") from None
    set_aside = ""
    if latest.is_file():
        os.replace(latest, run_dir / DAMAGED_CHECKPOINT_FILE)
        set_aside = f"; the damaged file is kept as {run_dir / DAMAGED_CHECKPOINT_FILE}"
    good = previous.read_bytes()
    _atomic_write(latest, lambda stream: stream.write(good))  # both files good again until the next save
    warnings.warn(
        f"{problem}; resuming from the previous checkpoint {previous} (epoch {state.get('epoch')}) instead{set_aside}",
        CheckpointFallbackWarning,
        stacklevel=2,
    )
    return state

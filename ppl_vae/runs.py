"""A run directory: its configuration, metrics log, checkpoints and results.

Layout of ``RUN_DIR``::

    config.json        the model and training configuration (plain data)
    metrics.jsonl      one JSON object per epoch (train and validation ELBO, ...)
    checkpoint.pt      the latest checkpoint, written atomically before the first epoch and after every epoch
    checkpoint.prev.pt the checkpoint before it (kept in case the latest is damaged)
    checkpoint.damaged.pt  a damaged latest checkpoint set aside by ``--resume`` (only then)
    test.json          the final test evaluation of ``ppl-vae train``
    evaluation.json    the table of ``ppl-vae evaluate`` (``evaluation_per_datapoint.npz`` its per-image numbers)
    data.json, program.json, program/   the data's record; the program's spec and a copy of its file
    plots/             the figures of ``ppl-vae plot`` and ``diagnose``
    manifest.json      every file and folder above that the run wrote (name and kind), each recorded before it is written
    .ppl_vae.lock      the lock of the process training into the run (``.ppl_vae.lock.json`` names it);
                       ``.ppl_vae.evaluate.lock`` that of an evaluation writing into it

Crash safety: every file but ``metrics.jsonl`` is written to a temporary file,
flushed to disk and renamed over its target, so a kill leaves the old or the new
version, never a mix. A new checkpoint is complete on disk before the latest one
becomes ``checkpoint.prev.pt``. ``metrics.jsonl`` is appended before each
checkpoint; resuming truncates it to the checkpoint's epoch, and a last line cut
short by a crash is ignored; a damaged line elsewhere is skipped with a warning
(and set aside in ``metrics.damaged.jsonl`` on resume), never silently dropped with
the good records after it.

Run-directory safety: one process trains into a run at a time (:class:`RunLock`,
an OS file lock that a killed process releases; a lock that cannot be taken stops
the command); ``overwrite`` deletes only what the run's manifest records, checked
whole before anything is deleted and never through a symbolic link; a folder without
a manifest (not a run, or a run of a version before manifests) is refused
(:func:`check_run_dir`), and deleting waits until every other check has passed
(:func:`start_run_dir`). No command writes a run's files through a symbolic link
(:func:`record_written`). Checkpoints are read with ``torch.load(weights_only=True)``,
so a crafted file cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shlex
import socket
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import CheckpointFallbackWarning, DamagedMetricsWarning, RunDirectoryError, RunWriteError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
BEST_CHECKPOINT_FILE = "checkpoint.best.pt"  # the best epoch's checkpoint, with --early-stopping (keep_as_best)
CHECKPOINT_CHOICES = ("last", "best")  # --checkpoint of evaluate, plot, compare, diagnose
DAMAGED_CHECKPOINT_FILE = "checkpoint.damaged.pt"
DAMAGED_METRICS_FILE = "metrics.damaged.jsonl"
TEST_FILE = "test.json"
EVALUATION_FILE = "evaluation.json"
PER_DATAPOINT_FILE = "evaluation_per_datapoint.npz"  # the one name of evaluate's per-image file: import it from here
PLOTS_FOLDER = "plots"
LOCK_FILE = ".ppl_vae.lock"
EVALUATE_LOCK_FILE = ".ppl_vae.evaluate.lock"
CHECKPOINT_FORMAT = 1

DATA_FILE = "data.json"  # ppl_vae.data.DATA_RECORD_FILE: the dataset and splits of the run
PROGRAM_FILE = "program.json"  # the program's spec (ppl_vae.programs), for programs other than the built-in VAE
PROGRAM_FOLDER = "program"  # the copy of a user's program file
# The files and folders a run wrote, recorded before each is written: --overwrite deletes these and nothing else.
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
MANIFEST_LOCK_FILE = ".ppl_vae.manifest.lock"
CHECKPOINT_FILES = (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE)  # what save_checkpoint writes
LOCK_FILES = (LOCK_FILE, LOCK_FILE + ".json", EVALUATE_LOCK_FILE, EVALUATE_LOCK_FILE + ".json", MANIFEST_LOCK_FILE)
# The files training writes (their temporaries, left by a kill, are removed when training starts again).
TRAINING_FILES = (CONFIG_FILE, DATA_FILE, PROGRAM_FILE, METRICS_FILE, CHECKPOINT_FILE, TEST_FILE, LOCK_FILE + ".json")
EVALUATION_FILES = (EVALUATION_FILE, PER_DATAPOINT_FILE, EVALUATE_LOCK_FILE + ".json")


# --- Writing, and what a failed write says ------------------------------------------------------------

_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is larger than this process may write (a file size limit)",
}


def describe_os_error(error: OSError) -> str:
    """The cause of a failed file operation in words, e.g. ``the disk is full (No space left on device)``."""
    detail = error.strerror or str(error)
    reason = _WRITE_FAILURES.get(error.errno)
    return f"{reason} ({detail})" if reason else detail


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` of the block into a :class:`RunWriteError` naming ``path`` and the cause."""
    try:
        yield
    except RunWriteError:
        raise
    except OSError as error:
        raise RunWriteError(f"cannot {what} {path}: {describe_os_error(error)}") from None


# --- The manifest: what a run wrote, which is all --overwrite deletes ----------------------------------

FILE, FOLDER, TREE = "file", "folder", "tree"
RUN_FOLDERS = (PROGRAM_FOLDER, PLOTS_FOLDER)  # the folders a run holds (one level deep); every other entry is a file
# Folders written by other libraries (the experiment trackers: TensorBoard's event files, MLflow's artifacts), whose
# files and subfolders ppl_vae does not name one by one: --overwrite deletes their whole tree (never through a link).
RUN_TREES = ("tb", "mlruns")


def _entry_parts(name: object) -> tuple[str, ...] | None:
    """``NAME`` or ``FOLDER/NAME`` (FOLDER one of :data:`RUN_FOLDERS`) as its parts; None for any other name.

    No part is empty, ``.`` or ``..``: a name of the manifest never reaches outside the run.
    """
    parts = tuple(name.split("/")) if isinstance(name, str) else ()
    if not 1 <= len(parts) <= 2 or (len(parts) == 2 and parts[0] not in RUN_FOLDERS):
        return None
    if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        return None
    return parts


def _kind_of(name: str) -> str:
    return FOLDER if name in RUN_FOLDERS else TREE if name in RUN_TREES else FILE


def _link_refusal(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (f"{path} is a symbolic link (to {target}), which ppl_vae never makes: it writes a run's files only inside "
            "the run folder, never through a link (that could change files outside the run). Put what it links to "
            "in its place, or remove it, and run the command again")


def _damaged_manifest(path: Path, problem: str) -> str:
    return (f"{path} is damaged or was not written by ppl_vae: {problem}. It lists what the run wrote (all that "
            "--overwrite may delete), so nothing was deleted or added: delete the run folder yourself if it is no "
            "longer needed, or choose another --run-dir")


def _load_manifest(run_dir: Path) -> dict[str, str] | None:
    """The manifest's entries ``{name: "file" | "folder"}``; None where there is none (no run, or a run of a
    version before manifests). A link, or a file not of ppl_vae's form, is a :class:`RunDirectoryError`."""
    path = run_dir / MANIFEST_FILE
    if path.is_symlink():
        raise RunDirectoryError(_link_refusal(path))
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunDirectoryError(_damaged_manifest(path, f"it cannot be read ({error})")) from None
    entries = manifest.get("entries") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise RunDirectoryError(_damaged_manifest(path, f"it is no manifest of format {MANIFEST_FORMAT}"))
    for name, kind in entries.items():
        parts = _entry_parts(name)
        if parts is None or kind != _kind_of(name) or (len(parts) == 2 and entries.get(parts[0]) != FOLDER):
            raise RunDirectoryError(_damaged_manifest(path, f"it names {name!r} ({kind!r}), no file or folder of a run"))
    return entries


def _write_manifest(run_dir: Path, entries: dict[str, str]) -> None:
    write_json(run_dir / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "written_by": "ppl_vae",
                                         "entries": dict(sorted(entries.items()))})


@contextlib.contextmanager
def _manifest_lock(run_dir: Path) -> Iterator[None]:
    """One writer of the manifest at a time (training, and an evaluation or plot beside it, both add entries)."""
    from filelock import FileLock

    path = run_dir / MANIFEST_LOCK_FILE
    if path.is_symlink():
        raise RunDirectoryError(_link_refusal(path))
    lock = FileLock(str(path), timeout=60)
    with writing(path, "take the lock file"):
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _check_entry(run_dir: Path, name: str) -> None:
    """``run_dir/name`` and the run's folder it lies in are no links, and what is there has the entry's kind."""
    parts = name.split("/")
    for depth in range(1, len(parts) + 1):
        path = run_dir.joinpath(*parts[:depth])
        if path.is_symlink():
            raise RunDirectoryError(_link_refusal(path))
    path, kind = run_dir / name, _kind_of(name)
    if kind in (FOLDER, TREE) and path.exists() and not path.is_dir():
        raise RunDirectoryError(f"{path} is a file where a run keeps its folder {name}/: move it away and run the "
                                "command again")
    if kind == FILE and path.is_dir():
        raise RunDirectoryError(f"{path} is a folder where a run keeps its file {name}: move it away and run the "
                                "command again")


def record_written(run_dir: str | os.PathLike, *names: str) -> list[Path]:
    """Record ``names`` in the run's manifest before they are written; return their paths (folders are created).

    A name is ``NAME`` (``program`` and ``plots`` are folders) or ``program/NAME``, ``plots/NAME``
    (their folder recorded with them). Every writer of a run's files calls this first, so no file
    of the package is ever unrecorded (a kill in between leaves a recorded name without a file,
    which --overwrite skips). A run without a manifest (an older version's) is not given one.
    A name that is, or lies in, a symbolic link is refused (:class:`RunDirectoryError`): a run's
    files are never written through a link.
    """
    run_dir = Path(run_dir)
    wanted: dict[str, str] = {}
    for name in names:
        parts = _entry_parts(name)
        if parts is None:
            raise ValueError(f"{name!r} is no name of a run's file or folder")
        if len(parts) == 2:
            wanted[parts[0]] = FOLDER
        wanted[name] = _kind_of(name)
    for name in wanted:
        _check_entry(run_dir, name)
    if (run_dir / MANIFEST_FILE).exists() or (run_dir / MANIFEST_FILE).is_symlink():
        with _manifest_lock(run_dir):
            entries = _load_manifest(run_dir)
            if entries is not None and any(entries.get(name) != kind for name, kind in wanted.items()):
                _write_manifest(run_dir, {**entries, **wanted})
    for name, kind in wanted.items():
        if kind in (FOLDER, TREE):
            with writing(run_dir / name, "create the folder"):
                (run_dir / name).mkdir(exist_ok=True)
    return [run_dir / name for name in names]


class RunFolder:
    """A folder of a run (``plots``) as the figure functions take it: ``folder / "NAME.png"`` records
    ``plots/NAME.png`` in the manifest, after checking that neither is a link, and is the path to write."""

    def __init__(self, run_dir: str | os.PathLike, name: str):
        self.run_dir, self.name = Path(run_dir), name
        _check_entry(self.run_dir, name)  # a linked folder is refused before the first figure is drawn

    def __truediv__(self, filename: str) -> Path:
        return record_written(self.run_dir, f"{self.name}/{filename}")[0]


def _is_our_temporary(name: str, targets: tuple[str, ...]) -> bool:
    """``name`` is a temporary file of :func:`_write_temporary` for one of ``targets``."""
    return name.endswith(".tmp") and any(name.startswith(f".{target}.") for target in targets)


def _entries(path: Path) -> list[Path]:
    """The entries of the folder ``path``, its lock files (and their temporaries) left out."""
    return [entry for entry in sorted(path.iterdir(), key=lambda p: p.name)
            if entry.name not in LOCK_FILES and not _is_our_temporary(entry.name, LOCK_FILES)]


def _overwrite_plan(path: Path) -> list[Path]:
    """What ``--overwrite`` deletes in ``path``, in order: the files its manifest records (and temporary files of
    them that a kill left), then its recorded folders. Everything is checked first: either all of that can be
    deleted, or a :class:`RunDirectoryError` naming what is in the way and nothing is."""
    present = _entries(path)
    if not present:
        return []
    entries = _load_manifest(path)
    if entries is None:
        found = [entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else "") for entry in present]
        raise RunDirectoryError(
            f"--overwrite deletes only what a ppl_vae run lists in its {MANIFEST_FILE}, and {path} has none: it holds "
            f"{_list(found)} (files of yours, or a run of a ppl_vae version before manifests). Nothing was deleted: "
            "delete the folder yourself if none of it is needed, or choose another --run-dir"
        )
    files, folders, links, others = [], [], [], []

    def sort(entry: Path, name: str, siblings: list[str]) -> None:
        kind = entries.get(name)
        if entry.is_symlink():
            links.append(name)
        elif entry.is_file() and (kind == FILE or (kind is None and _is_our_temporary(entry.name, tuple(siblings)))):
            files.append(entry)
        elif kind == TREE and entry.is_dir():
            _sort_tree(entry, name, files, folders, links)
        elif kind == FOLDER and entry.is_dir():
            inside = [child.split("/")[1] for child in entries if child.startswith(name + "/")]
            for child in sorted(entry.iterdir(), key=lambda p: p.name):
                sort(child, f"{name}/{child.name}", inside)
            folders.append(entry)
        else:
            others.append(name + ("/" if entry.is_dir() else ""))

    top = [name for name, kind in entries.items() if kind == FILE and "/" not in name] + [MANIFEST_FILE]
    for entry in present:
        if entry.name != MANIFEST_FILE:
            sort(entry, entry.name, top)
    if links:
        raise RunDirectoryError(
            f"--overwrite never follows a symbolic link, and {path} holds {_list(links)}, which ppl_vae never makes "
            "(a link may lead out of the run). Nothing was deleted: remove the link yourself (what it links to is "
            "not touched), or choose another --run-dir"
        )
    if others:
        raise RunDirectoryError(
            f"--overwrite replaces only a ppl_vae run directory, and {path} holds files ppl_vae did not write: "
            f"{_list(others)}. Nothing was deleted: move them away, or choose another --run-dir"
        )
    return files + folders


def _sort_tree(folder: Path, name: str, files: list[Path], folders: list[Path], links: list[str]) -> None:
    """The files and folders of a recorded tree, deepest first (links, which are refused, named)."""
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        if child.is_symlink():
            links.append(f"{name}/{child.name}")
        elif child.is_dir():
            _sort_tree(child, f"{name}/{child.name}", files, folders, links)
        else:
            files.append(child)
    folders.append(folder)


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_run_dir(run_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """Check ``run_dir`` can take a new run (or, with ``resume``, holds one to continue), changing nothing.

    An existing, non-empty folder is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it) is given. ``overwrite`` deletes only what the run's
    manifest records, so it is refused for a folder without one (files of the user's,
    or a run of a version before manifests), for one holding anything else, and for a
    symbolic link where the run's files are: no earlier run and no other file is lost
    by accident. Raises :class:`RunDirectoryError`.
    """
    path = Path(run_dir)
    if resume and overwrite:
        raise RunDirectoryError("--resume and --overwrite contradict each other: give one of them")
    if resume:
        if not any((path / name).is_file() for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE)):
            raise RunDirectoryError(
                f"cannot resume: {path / CHECKPOINT_FILE} does not exist (the run stopped before its first "
                "checkpoint, or this is no run directory); start it again with --overwrite"
            )
    elif path.exists():
        if not path.is_dir():
            raise RunDirectoryError(f"--run-dir {path} is a file, not a folder: choose another --run-dir")
        if _entries(path) and not overwrite:
            raise RunDirectoryError(
                f"the run directory {path} already exists and is not empty: pass --resume to continue "
                "that run, --overwrite to replace it, or choose another --run-dir"
            )
        if overwrite:
            _overwrite_plan(path)
    return path


def start_run_dir(run_dir: str | os.PathLike, lock: "RunLock", overwrite: bool = False) -> bool:
    """Create ``run_dir`` for a new run, holding ``lock``; with ``overwrite``, delete the run in it first.

    Called once every other check has passed, so a mistake in the options never costs
    the old run. The checks of :func:`check_run_dir` are repeated under the lock; a
    run that is being evaluated is not deleted (the evaluation's lock is taken while
    deleting). Only what the run's manifest records is deleted, all of it checked
    before the first deletion (files with ``unlink``, folders with ``rmdir``: neither
    follows a link or takes anything unchecked with it). The new run starts an empty
    manifest. Returns whether the folder was created.
    """
    path = Path(run_dir)
    created = not path.exists()
    with writing(path, "create the run directory"):
        path.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    check_run_dir(path, overwrite=overwrite)
    if _entries(path):
        with RunLock(path, "evaluate"):  # no evaluation or plot is reading or writing the run being deleted
            for target in _overwrite_plan(path):  # checked again, under both locks
                with writing(target, "delete"):
                    target.rmdir() if target.is_dir() and not target.is_symlink() else target.unlink()
    remove_temporaries(path, TRAINING_FILES)
    with _manifest_lock(path):
        _write_manifest(path, {})
    return created


def discard_unstarted_run(run_dir: str | os.PathLike, created: bool) -> None:
    """Undo :func:`start_run_dir` for a run that failed before its first checkpoint, so it blocks no later run.

    Deletes what its manifest records (the run's first files), never through a link.
    """
    path = Path(run_dir)
    try:
        entries = _load_manifest(path) or {}
    except RunDirectoryError:
        entries = {}
    for name in sorted(entries, key=lambda name: entries[name] == FOLDER):  # files first, then their folders
        target = path / name
        if not target.is_symlink():
            with contextlib.suppress(OSError):
                target.rmdir() if target.is_dir() else target.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (path / MANIFEST_FILE).unlink(missing_ok=True)
    remove_temporaries(path, TRAINING_FILES + (MANIFEST_FILE,))
    if created:
        for name in LOCK_FILES:
            with contextlib.suppress(OSError):
                (path / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()


def remove_temporaries(run_dir: str | os.PathLike, targets: tuple[str, ...]) -> None:
    """Delete the half-written temporary files of ``targets`` that a killed process left in ``run_dir``."""
    path = Path(run_dir)
    for entry in path.iterdir():
        if entry.is_file() and _is_our_temporary(entry.name, targets):
            with contextlib.suppress(OSError):
                entry.unlink()


# --- The lock: one writer per run -----------------------------------------------------------------


def _command_line() -> str:
    program = Path(sys.argv[0]).name if sys.argv else "python"
    if program == "__main__.py":
        program = "python -m ppl_vae"
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


class RunLock:
    """The OS lock (``filelock``: ``flock`` on Linux) of one run directory, for ``"train"``, ``"evaluate"`` or ``"figures"``.

    One process trains into a run at a time, and one evaluates into it or writes its
    figures (``ppl-vae plot``, ``diagnose``) at a time: those two share the second lock
    (an evaluation or a plot may read a run while it trains: its result records the
    checkpoint's epoch); ``train --overwrite`` takes both. The holder's pid, host and command are written beside the
    lock file, so a refused process can name it. The operating system releases the
    lock when its holder dies, even by SIGKILL: a stale lock never blocks a run.
    """

    def __init__(self, run_dir: str | os.PathLike, purpose: str = "train"):
        self.run_dir = Path(run_dir)
        self.purpose = purpose
        self.path = self.run_dir / (LOCK_FILE if purpose == "train" else EVALUATE_LOCK_FILE)
        self.holder_path = self.path.with_name(self.path.name + ".json")
        self._lock = None

    def acquire(self) -> "RunLock":
        if self._lock is not None:
            return self
        from filelock import FileLock, Timeout

        for path in (self.path, self.holder_path):  # a lock taken through a link would lock (and write) elsewhere
            if path.is_symlink():
                raise RunDirectoryError(_link_refusal(path))
        lock = FileLock(str(self.path), timeout=0)
        held_by_another = False
        with writing(self.path, "create the lock file"):
            try:
                lock.acquire(timeout=0)
            except Timeout:  # a TimeoutError, hence an OSError: told apart from a failed write here
                held_by_another = True
        if held_by_another:
            raise RunDirectoryError(self._refusal())
        self._lock = lock
        try:
            write_json(self.holder_path, {
                "purpose": self.purpose, "pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            })
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            self.holder_path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _refusal(self) -> str:
        activity = _ACTIVITIES["evaluate"]
        try:
            holder = json.loads(self.holder_path.read_text())
            who = (f"process {holder['pid']} on {holder['host']} (`{holder['command']}`, since {holder['since']})")
            stop = f"stop it (kill {holder['pid']}"
            activity = _ACTIVITIES.get(holder.get("purpose"), activity)
        except (OSError, ValueError, KeyError, TypeError):
            who, stop = "another process (it has not written its details yet)", "stop it ("
        if self.purpose == "train":
            return (
                f"{self.run_dir} is in use: {who} is training into it. Two processes writing one run would mix their "
                f"epochs: wait for it to finish, or {stop}; then --resume), or choose another --run-dir"
            )
        return f"{self.run_dir} is in use: {who} {activity}: wait for it to finish, or {stop})"


# What the holder of a run's second lock (evaluations, and the figures of plot and diagnose) is doing there.
_ACTIVITIES = {"evaluate": "is evaluating it and writes its results there",
               "figures": "is writing figures into it (ppl-vae plot or diagnose)"}


def _write_temporary(path: Path, write: Callable) -> str:
    """Write through ``write(stream)`` into a new temporary file next to ``path``, flushed to disk; return its name.

    A failure removes the temporary file and raises :class:`RunWriteError` naming ``path``
    and the cause (disk full, permission denied, ...).
    """
    with writing(path):
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(tmp_name, 0o644)  # mkstemp makes files private; run files are meant to be shared
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
    return tmp_name


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp_name = _write_temporary(path, write)
    try:
        with writing(path):
            os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` (a :class:`RunWriteError` naming it when that fails)."""
    _atomic_write(Path(path), lambda stream: stream.write(data))


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
    path = Path(run_dir) / METRICS_FILE
    with writing(path), open(path, "a") as stream:
        stream.write(json.dumps(record) + "\n")
        stream.flush()


def _parse_metrics(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """The records of ``metrics.jsonl`` and its damaged lines as (line number, text).

    A last line without its newline is a record cut short by a crash (its epoch was
    never checkpointed): it is left out and not counted as damaged.
    """
    if not path.is_file():
        return [], []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records, damaged = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not a record of an epoch")
            records.append(record)
        except ValueError:
            if number == len(lines):  # no newline after it: cut short while being appended
                continue
            damaged.append((number, line))
    return records, damaged


def _describe_damage(path: Path, damaged: list[tuple[int, str]]) -> str:
    numbers = ", ".join(str(number) for number, _ in damaged[:10]) + (" ..." if len(damaged) > 10 else "")
    return f"{path}: line{'s' if len(damaged) > 1 else ''} {numbers} cannot be read (damaged)"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl``; a damaged line is skipped with a :class:`DamagedMetricsWarning`."""
    path = Path(run_dir) / METRICS_FILE
    records, damaged = _parse_metrics(path)
    if damaged:
        warnings.warn(f"{_describe_damage(path, damaged)} and skipped; the other {len(records)} records are used",
                      DamagedMetricsWarning, stacklevel=2)
    return records


def truncate_metrics(run_dir: str | os.PathLike, last_epoch: int) -> None:
    """Drop metric records after ``last_epoch`` (written by a run that died before its next checkpoint).

    Every good record up to ``last_epoch`` is kept. A damaged line is moved to
    ``metrics.damaged.jsonl`` with a :class:`DamagedMetricsWarning` naming it and the
    epochs whose records are missing.
    """
    path = Path(run_dir) / METRICS_FILE
    records, damaged = _parse_metrics(path)
    records = [r for r in records if r["epoch"] <= last_epoch]
    if damaged:
        aside = record_written(run_dir, DAMAGED_METRICS_FILE)[0]
        earlier = aside.read_bytes() if aside.is_file() else b""
        kept = earlier + "".join(line + "\n" for _, line in damaged).encode()
        _atomic_write(aside, lambda stream: stream.write(kept))
        present = {r["epoch"] for r in records}
        missing = [epoch for epoch in range(1, last_epoch + 1) if epoch not in present]
        lost = f"; the records of epoch{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} are missing" if missing else ""
        warnings.warn(
            f"{_describe_damage(path, damaged)}: set aside in {aside}, keeping the {len(records)} good records{lost}",
            DamagedMetricsWarning, stacklevel=2,
        )
    text = "".join(json.dumps(r) + "\n" for r in records)
    _atomic_write(path, lambda stream: stream.write(text.encode()))


def save_checkpoint(run_dir: str | os.PathLike, state: dict) -> str:
    """Atomically write ``state`` as the latest checkpoint; the one before it becomes ``checkpoint.prev.pt``.

    Returns the new checkpoint's id (saved in it as ``"id"``), which result files record.

    The new checkpoint is written completely first, so a failure while writing it
    (a full disk, a kill) leaves both earlier checkpoints as they were.
    """
    run_dir = Path(run_dir)
    latest, previous = run_dir / CHECKPOINT_FILE, run_dir / PREVIOUS_CHECKPOINT_FILE
    state = {"format": CHECKPOINT_FORMAT, "id": uuid.uuid4().hex, **state}
    buffer = io.BytesIO()  # serialized first, so that a failed write reports its OS error (torch's does not)
    torch.save(state, buffer)
    data = buffer.getvalue()
    tmp_name = _write_temporary(latest, lambda stream: stream.write(data))
    try:
        with writing(latest):
            if latest.is_file():
                _keep_as_previous(latest, previous)
            os.replace(tmp_name, latest)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return state["id"]


def _keep_as_previous(latest: Path, previous: Path) -> None:
    """Make ``previous`` the file ``latest`` is, while ``latest`` stays in place.

    A hard link, renamed over ``previous``: an evaluation reading a run while it trains
    always finds a complete ``latest`` (moving it away first left a moment without one).
    Where the file system has no hard links, the move.
    """
    link = latest.with_name(f".{latest.name}.link-{os.getpid()}.tmp")  # a temporary remove_temporaries knows
    try:
        os.link(latest, link)
    except OSError:
        os.replace(latest, previous)
        return
    os.replace(link, previous)


def _safe_globals() -> list:
    """The types beyond tensors and plain data that ppl_vae checkpoints hold: NumPy's RNG state (an array)."""
    import numpy

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, numpy.ndarray, numpy.dtype, type(numpy.dtype(numpy.uint32))]


def _last_words(message: str) -> str:
    """The informative line of torch's long weights_only message (e.g. ``Unsupported operand 110``)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                                     "Please file an issue"))]
    return (informative or lines or [message])[0][:200]


def _non_finite_weights(state: dict) -> list[str]:
    model = state.get("model")
    if not isinstance(model, dict):
        return []
    return [name for name, value in model.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint in the file ``path``; a :class:`RunDirectoryError` naming the file if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise RunDirectoryError(f"no checkpoint at {path}: is {path.parent} a ppl_vae run directory?")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses a class or function to call ("GLOBAL"): no damage makes that, only a crafted file
        # (or another program's). Anything else it cannot read is damage.
        lines = [line.strip() for line in str(error).splitlines() if "global" in line.lower()]
        if not lines:
            raise RunDirectoryError(
                f"the checkpoint {path} is damaged or truncated (UnpicklingError: {_last_words(str(error))})"
            ) from None
        found = lines[0]
        raise RunDirectoryError(
            f"the checkpoint {path} holds objects other than tensors and plain data ({found[:200]}), which ppl_vae "
            "never writes: it was not written by ppl_vae, and loading it could run code, so it is refused. "
            "Use a checkpoint written by `ppl-vae train`"
        ) from None
    except Exception as error:  # torch raises several types for a damaged zip/pickle
        raise RunDirectoryError(f"the checkpoint {path} is damaged or truncated ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunDirectoryError(f"{path} is not a ppl_vae checkpoint of format {CHECKPOINT_FORMAT}")
    bad = _non_finite_weights(state)
    if bad:
        raise RunDirectoryError(
            f"the checkpoint {path} holds NaN or infinite weights, in {_list(bad, 3)} (epoch {state.get('epoch')}): "
            "a model with them cannot be evaluated or trained on"
        )
    return state


def keep_as_best(run_dir: str | os.PathLike) -> None:
    """Make ``checkpoint.best.pt`` the file ``checkpoint.pt`` is now (recorded in the manifest first).

    A hard link renamed over the old best, so the best file is always complete and costs no copy (the next
    save replaces ``checkpoint.pt`` by a new file, which leaves the link's file alone); where the file system
    has no hard links, an atomic copy.
    """
    run_dir = Path(run_dir)
    latest, (best,) = run_dir / CHECKPOINT_FILE, record_written(run_dir, BEST_CHECKPOINT_FILE)
    link = latest.with_name(f".{latest.name}.link-{os.getpid()}.tmp")  # a temporary remove_temporaries knows
    with writing(best):
        try:
            os.link(latest, link)
        except OSError:
            write_bytes(best, latest.read_bytes())
            return
        os.replace(link, best)


def which_checkpoint(run_dir: str | os.PathLike, which: str | None = None) -> str:
    """``which`` of :data:`CHECKPOINT_CHOICES` the run has; None: "best" when the run kept one, else "last"."""
    run_dir = Path(run_dir)
    if which is None:
        return "best" if (run_dir / BEST_CHECKPOINT_FILE).is_file() else "last"
    if which not in CHECKPOINT_CHOICES:
        raise RunDirectoryError(f"unknown checkpoint {which!r}: choose one of {', '.join(CHECKPOINT_CHOICES)}")
    if which == "best" and not (run_dir / BEST_CHECKPOINT_FILE).is_file():
        raise RunDirectoryError(f"{run_dir} has no best checkpoint ({BEST_CHECKPOINT_FILE}: it is kept by training "
                                "with --early-stopping): use --checkpoint last")
    return which


def load_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                    which: str = "last") -> dict:
    """The latest checkpoint of ``run_dir`` (``which="best"``: ``checkpoint.best.pt``); a clear error naming the
    file if it is missing or damaged.

    No fallback here: evaluating an older epoch without being asked would be a
    silent surprise. The error names ``checkpoint.prev.pt`` when it exists.
    """
    run_dir = Path(run_dir)
    if which_checkpoint(run_dir, which) == "best":
        return read_checkpoint(run_dir / BEST_CHECKPOINT_FILE, map_location)
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
        os.replace(latest, record_written(run_dir, DAMAGED_CHECKPOINT_FILE)[0])
        set_aside = f"; the damaged file is kept as {run_dir / DAMAGED_CHECKPOINT_FILE}"
    good = previous.read_bytes()
    write_bytes(latest, good)  # both files good again until the next save
    warnings.warn(
        f"{problem}; resuming from the previous checkpoint {previous} (epoch {state.get('epoch')}) instead{set_aside}",
        CheckpointFallbackWarning,
        stacklevel=2,
    )
    return state

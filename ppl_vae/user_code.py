"""Errors raised by a user's code (a program's constructor, model or guide), told apart from the package's own.

A program is the user's code: when it raises, the user gets one line naming the exception and
where in their file it was raised, instead of a traceback through Pyro and torch. An exception
whose traceback never passes through a file outside the installed libraries and ``ppl_vae``
itself is not the user's: it is a bug, and keeps its traceback.
"""

from __future__ import annotations

import sysconfig
import traceback
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _library_folders() -> tuple[str, ...]:
    """Folders whose files are not the user's: the standard library, site-packages, this package, torch and Pyro."""
    import pyro
    import torch

    paths = sysconfig.get_paths()
    folders = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    folders |= {str(Path(module.__file__).resolve().parent) for module in (torch, pyro)}
    folders.add(str(Path(__file__).resolve().parent))  # ppl_vae
    return tuple(str(Path(folder).resolve()) for folder in folders)


def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen ...>, <string>: not a file of the user's
        return False
    resolved = str(Path(filename).resolve())
    return not any(resolved == folder or resolved.startswith(folder + "/") for folder in _library_folders())


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (Pyro re-raises a program's error with trace shapes added)."""
    seen: list[BaseException] = []
    while error is not None and all(error is not other for other in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the user's code in ``error``'s traceback (or its causes'), None when there is none."""
    for link in reversed(_chain(error)):  # the original error first: it holds the deepest frames
        frames = [frame for frame in traceback.extract_tb(link.__traceback__) if _is_user_file(frame.filename)]
        if frames:
            return frames[-1]
    return None


def first_line(error: BaseException) -> str:
    """The first line of the original error's message (Pyro appends pages of trace shapes to later lines)."""
    original = _chain(error)[-1]
    return (str(original).strip().splitlines() or [""])[0]


def describe_user_error(error: BaseException) -> str | None:
    """``"ValueError: message (file.py, line 7, in model)"`` when ``error`` passed through the user's code, else None."""
    frame = user_frame(error)
    if frame is None:
        return None
    original = _chain(error)[-1]
    return f"{type(original).__name__}: {first_line(error)} ({Path(frame.filename).name}, line {frame.lineno}, in {frame.name})"


def raised_by_user_code(error: BaseException) -> bool:
    """Whether the original error comes from a ``raise`` statement of the user's code (its own check), not from an
    operation of torch or Pyro that the user's code called (a shape or dtype mismatch: a question of the data)."""
    frames = traceback.extract_tb(_chain(error)[-1].__traceback__)
    return bool(frames) and _is_user_file(frames[-1].filename) and (frames[-1].line or "").startswith("raise")

"""Reading ``.npz`` files someone else may have written (a dataset, a run's per-image results) without trusting them.

:func:`check_npz` looks at a file before NumPy allocates anything: it must be a zip archive of
``.npy`` members, each with a numeric (never object, i.e. pickled) dtype, and the size its
header declares must be what the member holds. A tiny file whose header claims a huge shape
is refused before the array is allocated: the declared bytes must equal the member's
uncompressed size, and that may be at most :data:`MAX_COMPRESSION_RATIO` times its compressed
size (deflate cannot do better), so memory stays bounded by the file's size.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .errors import InvalidDataError, PplVaeError

MAX_COMPRESSION_RATIO = 1100  # deflate's limit is about 1032:1
NPY_MAGIC = b"\x93NUMPY"


def check_npz(path: Path, what: str, error: type[PplVaeError] = InvalidDataError) -> None:
    """Refuse, as one line naming ``path`` (``what`` says what it should be), a file that is not a safe ``.npz``."""
    path = Path(path)
    with open(path, "rb") as stream:
        start = stream.read(len(NPY_MAGIC))
    if start == NPY_MAGIC:
        raise error(f"{path} is a .npy file (one array), not a .npz archive: {what}; save it with numpy.savez")
    if not zipfile.is_zipfile(path):
        raise error(f"{path} is not a readable .npz file (not a zip archive of .npy arrays): {what}")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_member(archive, info, path, error)
    except PplVaeError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as problem:
        raise error(f"{path} is not a readable .npz file ({type(problem).__name__}: {problem}): {what}") from None


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, error: type[PplVaeError]) -> None:
    """One ``.npy`` member: a header NumPy can read, a numeric dtype, and a declared size that the member holds."""
    name = info.filename.removesuffix(".npy")
    if info.file_size > max(info.compress_size, 1) * MAX_COMPRESSION_RATIO:
        raise error(f"{path}: the array {name!r} claims {info.file_size} bytes from {info.compress_size} compressed "
                    "bytes, more than compression can give: the file is damaged or crafted")
    with archive.open(info) as member:
        try:
            version = npy_format.read_magic(member)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, dtype = read_header(member, max_header_size=10_000)
        except ValueError as problem:
            raise error(f"{path}: {info.filename} is not a .npy array ({problem})") from None
        header_bytes = member.tell()
    if dtype.hasobject:
        raise error(f"{path}: the array {name!r} holds Python objects ({dtype}), which are never loaded (they would be "
                    "unpickled, running code): save numeric arrays")
    declared = math.prod(shape) * dtype.itemsize
    if declared != info.file_size - header_bytes:
        raise error(f"{path}: the array {name!r} declares shape {list(shape)} of {dtype} ({declared} bytes), but the "
                    f"file holds {info.file_size - header_bytes} bytes for it: the file is damaged or crafted")


def load_npz(path: Path, what: str, error: type[PplVaeError] = InvalidDataError) -> dict[str, np.ndarray]:
    """Every array of a checked ``.npz`` file (:func:`check_npz`), read at once; a failure is one line."""
    check_npz(path, what, error)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as problem:
        raise error(f"{path} is not a readable .npz file ({type(problem).__name__}: {problem}): {what}") from None

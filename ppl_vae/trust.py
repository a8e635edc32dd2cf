r"""Which program code a run directory may run: its own verified copy, and only when this user trusts it.

A run directory trained from a user's file (``--program FILE.py:NAME``) keeps a copy of that
file (``program/FILE.py``) and records it in ``program.json``. Rebuilding the program
(``evaluate``, ``plot``, ``train --resume``, :func:`ppl_vae.train.load_run`) imports that copy:
it runs Python code that came with the run directory, which may have come from someone else.
The rule, in the style of Jupyter's notebook trust:

* **Only the copy inside the run is imported**: ``"source"`` must be ``program/NAME.py``,
  resolving inside the run directory (no absolute path, ``..`` or symlink out of it), and the
  copy's bytes must match the recorded ``"sha256"``; those very bytes are then executed (read
  once: the file cannot change between the check and the import). Nothing ``program.json``
  names outside the run (its ``"path"``, the user's original file) is ever imported.
* **Runs this user made on this machine are trusted automatically**: when a run is created,
  :func:`sign` records in ``program.json`` a ``"signature"``: HMAC-SHA256, keyed with a per-user
  secret (:func:`key_path`, 32 random bytes from :mod:`secrets`, a file of mode 0600), of every
  other field of ``program.json`` (the program's name, keyword arguments, copy, the copy's sha256,
  the original file's path). Nobody without the key can make a signature that verifies, so a run
  from elsewhere, or one whose program.json or copy was changed, is not trusted.
* **Any other run is refused** (:class:`~ppl_vae.errors.UntrustedProgramError`, one line naming
  the file and its sha256) unless the user trusts it: for one command with ``--trust-program``
  (``trust_program=True`` in Python), which signs nothing; or for good with
  ``ppl-vae trust RUN_DIR`` (:func:`ppl_vae.programs.trust_run`), which signs the run with this user's key after
  showing what it signs.

Built-in programs have no file and need no trust; commands that import no program
(``diagnose``, ``compare``) read an untrusted run as they read any other.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import warnings
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import PplVaeError, PplVaeWarning, RunDirectoryError, UntrustedProgramError
from .runs import PROGRAM_FILE as SPEC_FILE, PROGRAM_FOLDER as SOURCE_DIR

if TYPE_CHECKING:
    from .programs import ProgramSpec

CONFIG_DIR_ENV = "PPL_VAE_CONFIG_DIR"
KEY_FILE = "program_signing_key"
_KEY_BYTES = 32
_VERSION = "ppl_vae program signature 1"


# --- The user's key ------------------------------------------------------------------------------


def config_dir() -> Path:
    """``$PPL_VAE_CONFIG_DIR``; else ``$XDG_CONFIG_HOME/ppl_vae``; else ``~/.config/ppl_vae``."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "ppl_vae"


def key_path() -> Path:
    """The file holding this user's signing key (hex text, mode 0600)."""
    return config_dir() / KEY_FILE


def _read_key(path: Path) -> bytes | None:
    """The key in ``path``; None where there is no such file; a one-line error where it is unreadable."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None  # never made (creating it says why it cannot be)
    except (OSError, UnicodeDecodeError) as error:
        raise PplVaeError(f"cannot read the program-signing key {path} ({error}): fix its permissions, or delete it to "
                          "make a new one (runs signed with it then need `ppl-vae trust`)") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise PplVaeError(f"the program-signing key {path} is not {_KEY_BYTES} bytes in hex: delete it to make a new "
                          "one (runs signed with it then need `ppl-vae trust`)")
    if os.name == "posix" and mode & 0o077:  # another user who can read it can sign runs you would then trust
        raise PplVaeError(f"the program-signing key {path} can be read or written by other users (mode "
                          f"{stat.S_IMODE(mode):o}): `chmod 600 {path}`, or delete it to make a new one")
    return key


def _create_key(path: Path) -> bytes:
    """Make this user's key, readable by this user only. Written to a temporary file and hard-linked into place,
    so that of two processes creating it at once, both end up with the one that was linked first, complete."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(secrets.token_hex(_KEY_BYTES) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        temporary.unlink(missing_ok=True)
    return _read_key(path)


def user_key(create: bool) -> bytes | None:
    """This user's signing key; made when missing and ``create``; None when missing otherwise."""
    path = key_path()
    key = _read_key(path)
    if key is None and create:
        try:
            key = _create_key(path)
        except OSError as error:
            raise PplVaeError(f"cannot create the program-signing key {path} ({error.strerror or error}): set "
                              f"${CONFIG_DIR_ENV} to a folder you can write") from None
    return key


# --- Signatures ----------------------------------------------------------------------------------


def _message(spec: "ProgramSpec") -> bytes:
    fields = {name: value for name, value in asdict(spec).items() if name != "signature"}
    return (_VERSION + "\n" + json.dumps(fields, sort_keys=True, separators=(",", ":"))).encode()


def signature(spec: "ProgramSpec", key: bytes) -> str:
    """HMAC-SHA256 (hex), keyed with ``key``, of every field of ``spec`` but the signature (as canonical JSON)."""
    return hmac.new(key, _message(spec), hashlib.sha256).hexdigest()


def sign(spec: "ProgramSpec") -> str | None:
    """The signature of ``spec`` with this user's key (made if need be). Where no key can be made (say, a read-only
    home), a warning and None: the run is then not trusted automatically, and ``ppl-vae trust`` or
    ``--trust-program`` open it."""
    try:
        return signature(spec, user_key(create=True))
    except PplVaeError as error:
        warnings.warn(f"{error}; the run's program is recorded unsigned, so evaluate, plot and --resume will need "
                      "--trust-program (or `ppl-vae trust` once the key can be made)", PplVaeWarning, stacklevel=3)
        return None


def is_signed_by_user(spec: "ProgramSpec") -> bool:
    """``spec`` carries a signature made with this user's key over exactly its current fields."""
    if spec.signature is None:
        return False
    key = user_key(create=False)
    return key is not None and hmac.compare_digest(signature(spec, key), spec.signature)


# --- The run's copy ------------------------------------------------------------------------------


def copy_path(run_dir: Path, spec: "ProgramSpec") -> Path:
    """The run's copy of its program file, checked to be ``program/NAME.py`` inside ``run_dir`` (never elsewhere)."""
    record = run_dir / SPEC_FILE
    if spec.source is None or spec.sha256 is None:
        raise RunDirectoryError(
            f"{record} records the program {spec.name} from {spec.path} with no copy of it in the run (\"source\" or "
            "\"sha256\" is null): a program is only imported from the run's own checked copy, never from elsewhere; "
            "train the run again"
        )
    name = PurePosixPath(spec.source).name
    if spec.source != f"{SOURCE_DIR}/{name}" or not name.endswith(".py") or name.startswith(".") or "\\" in name:
        raise RunDirectoryError(f"{record}: \"source\" is {spec.source!r}, not {SOURCE_DIR}/NAME.py: a program is only "
                                "imported from its copy inside the run directory, never from elsewhere")
    path = run_dir / SOURCE_DIR / name
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise RunDirectoryError(f"{path} resolves to {path.resolve()} (through a symbolic link), outside the run "
                                "directory: a program is only imported from its copy inside the run directory")
    if not path.is_file():
        raise RunDirectoryError(f"{path}, the run's copy of its program recorded in {record}, is missing")
    return path


def verified_source(run_dir: Path, spec: "ProgramSpec", trust: bool = False) -> tuple[Path, bytes]:
    """The run's copy of its program and its bytes, read once: refused unless they match the recorded sha256, and
    (without ``trust``) unless this user's key signed the record.

    The bytes returned are the ones checked: the caller executes them, not the file again.
    """
    run_dir = Path(run_dir)
    path = copy_path(run_dir, spec)
    try:
        source = path.read_bytes()
    except OSError as error:
        raise RunDirectoryError(f"cannot read {path}, the run's copy of its program ({error.strerror or error})") from None
    digest = hashlib.sha256(source).hexdigest()
    if digest != spec.sha256:
        raise RunDirectoryError(
            f"{path} has sha256 {digest}, not the {spec.sha256} recorded in {run_dir / 'program.json'}: the copy was "
            "changed after the run recorded it, so it is not imported"
        )
    if not trust and not is_signed_by_user(spec):
        why = ("program.json is not signed" if spec.signature is None else
               "program.json's signature is not one made with your key (another user or machine made the run, or its "
               "program record was changed since)")
        raise UntrustedProgramError(
            f"{path} (sha256 {digest}) comes with the run and would run as Python code, and it is not trusted: "
            f"{why}. Read the file; to run it, add --trust-program to this command (trust_program=True in Python), "
            f"or trust the run for good with `ppl-vae trust {run_dir}`"
        )
    return path, source

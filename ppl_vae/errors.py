"""Errors and warnings that carry a message meant for the user.

The CLI prints the message of a :class:`PplVaeError` and exits with status 2,
without a traceback; anything else is a bug and keeps its traceback. It prints a
:class:`PplVaeWarning` as one line, ``ppl-vae COMMAND: warning: MESSAGE``.
"""


class PplVaeError(Exception):
    """Base class: something the user can fix (bad input, missing files, bad options)."""


class DataNotFoundError(PplVaeError):
    """The dataset files are not where they were looked for and cannot be downloaded."""


class InvalidDataError(PplVaeError, ValueError):
    """Data of the wrong shape, dtype or support for the model it is given to."""


class ModelStructureError(PplVaeError, ValueError):
    """A model/guide pair the evaluation cannot handle (say, no observed site)."""


class RunDirectoryError(PplVaeError):
    """A run directory that is missing, already used, or holds a broken checkpoint."""


class UntrustedProgramError(RunDirectoryError):
    """A run's program file would run as code, and this user has not trusted it (see :mod:`ppl_vae.trust`)."""


class RunWriteError(PplVaeError, OSError):
    """A file of a run could not be written (disk full, permission denied, ...); the message names the file and the cause."""


class NumericalFaultError(PplVaeError):
    """Training met a NaN or infinite loss, gradient or validation ELBO; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training between two steps; the run directory is consistent and ``--resume`` continues it."""


class PplVaeWarning(UserWarning):
    """Base class of the warnings meant for the user (the CLI prints them as one line)."""


class CheckpointFallbackWarning(PplVaeWarning):
    """The latest checkpoint was damaged or missing, and the run resumes from the one before it."""


class DamagedMetricsWarning(PplVaeWarning):
    """A line in the middle of metrics.jsonl could not be read; it is skipped (and set aside on resume), never dropped silently."""


class EvaluationMemoryWarning(PplVaeWarning):
    """An evaluation chunk ran out of memory and is retried with smaller chunks."""

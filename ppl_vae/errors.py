"""Errors that carry a message meant for the user.

The CLI prints the message of a :class:`PplVaeError` and exits with status 2,
without a traceback; anything else is a bug and keeps its traceback.
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

"""Errors a user can cause. The CLI prints their message (no traceback) and exits with status 2.

Wrong data, settings and arguments are also `ValueError`s, as scikit-learn users expect (an
``except ValueError`` catches them); a damaged file or a full disk is not a wrong value."""


class FirmadError(Exception):
    """Base class: the message says what went wrong and what to do."""


class DataError(FirmadError, ValueError):
    """A dataset file or folder is missing, malformed or inconsistent."""


class DataNotFoundError(DataError):
    """A dataset could not be located anywhere it was looked for."""


class ConfigError(FirmadError, ValueError):
    """A recipe or option is invalid (unknown key, wrong type, impossible value)."""


class CheckpointError(FirmadError):
    """A checkpoint or run directory is missing, incomplete or incompatible."""


class InputError(FirmadError, ValueError):
    """Arguments to a library function are invalid (shapes, labels, NaN scores)."""


class StorageError(FirmadError):
    """A file cannot be written: the disk is full, or the folder is read-only or not ours."""

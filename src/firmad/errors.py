"""Errors a user can cause. The CLI prints their message (no traceback) and exits with status 2."""


class FirmadError(Exception):
    """Base class: the message says what went wrong and what to do."""


class DataError(FirmadError):
    """A dataset file or folder is missing, malformed or inconsistent."""


class DataNotFoundError(DataError):
    """A dataset could not be located anywhere it was looked for."""


class ConfigError(FirmadError):
    """A recipe or option is invalid (unknown key, wrong type, impossible value)."""


class CheckpointError(FirmadError):
    """A checkpoint or run directory is missing, incomplete or incompatible."""


class InputError(FirmadError):
    """Arguments to a library function are invalid (shapes, labels, NaN scores)."""


class StorageError(FirmadError):
    """A file cannot be written: the disk is full, or the folder is read-only or not ours."""

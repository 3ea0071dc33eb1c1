"""What every reader shares: the `ImageDataset` they return, and reading a file with its
failures as `DataError`s that say what to do (a file the system refuses is not a damaged one).
"""

from __future__ import annotations

import contextlib
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from firmad.errors import DataError

if TYPE_CHECKING:  # torch is imported where images are made: `firmad data list` needs none
    import torch


@dataclass
class ImageDataset:
    """Images in memory: uint8 (N, C, H, W), int64 labels (N,), class names, origin."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])


def unreadable(path: Path, e: OSError) -> DataError | None:
    """A DataError for a file the system refuses to read (permissions, I/O), else None.

    Errors from the operating system carry an errno; format errors from gzip, tarfile or zlib
    (also OSError subclasses) do not, and mean a damaged file instead.
    """
    if isinstance(e, PermissionError):
        return DataError(
            f"cannot read {path}: permission denied. Make it readable for this user "
            "(e.g. chmod a+r), or copy the data somewhere you can read it."
        )
    if e.errno is not None and not isinstance(e, FileNotFoundError):
        return DataError(f"cannot read {path}: {e.strerror or e}. Check the disk and the path.")
    return None


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz; damaged files raise DataError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found. Check the path or re-download the data.") from e
    except OSError as e:
        # Permission denied is not damage: do not advise deleting a good file.
        error = unreadable(path, e)
        if error is not None:
            raise error from e
        raise damaged(path, e) from e
    except (EOFError, zlib.error) as e:
        raise damaged(path, e) from e


def damaged(path: Path, e: Exception) -> DataError:
    return DataError(
        f"{path}: cannot read the file ({e}); it is probably truncated or corrupt. "
        "Delete it and download it again."
    )


@contextlib.contextmanager
def opened(path: Path):
    """The file (gunzipped as it is read when the name ends in .gz); errors as DataError."""
    try:
        if not path.is_file():
            kind = "not a regular file" if path.exists() else "file not found"
            raise DataError(f"{path}: {kind}. Check the path or re-download the data.")
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            yield f
    except OSError as e:
        # Permission denied is not damage: do not advise deleting a good file.
        raise (unreadable(path, e) or damaged(path, e)) from e
    except (EOFError, zlib.error) as e:
        raise damaged(path, e) from e

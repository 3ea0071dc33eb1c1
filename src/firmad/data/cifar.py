"""CIFAR-10 / CIFAR-100 "python version", from the ``.tar.gz`` archive (members read in place)
or its extracted folder. The batches are pickles: they go through `RestrictedUnpickler`, which
admits only what numpy needs to rebuild an array, so a hostile file cannot run code."""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from firmad.data.files import read_bytes, unreadable
from firmad.errors import DataError


def _reconstruct_function() -> Callable:
    """numpy's array rebuilding function (moved to numpy._core in numpy 2)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`: Python 3 protocol-2 pickles store bytes as latin-1 text."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays.

    CIFAR batches are dicts of bytes, str, ints, lists and one uint8 ndarray. Building the array
    needs numpy's `_reconstruct`, `ndarray` and `dtype`; pickles written by Python 3 at protocol 2
    also store bytes through `_codecs.encode(text, "latin1")`, admitted for latin-1 only. Any other
    global (os.system, builtins.eval, ...) is refused before it can be called.
    """

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _reconstruct_function()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_pickle(data: bytes, where: str) -> dict:
    """Unpickle one CIFAR batch (bytes keys, like the official loader's encoding="bytes")."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any failure of an untrusted pickle is a data problem
        raise DataError(
            f"{where}: not a valid CIFAR batch pickle ({e}). Only the official CIFAR "
            "'python version' files are accepted; re-download them."
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict in the pickle, found {type(obj).__name__}.")
    return obj


CIFAR_LAYOUT = {
    # storage name: (archive, folder, train members, test member, meta member)
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", "meta"),
}


def _read_cifar_members(source: Path, folder_name: str, members: list[str]) -> dict[str, bytes]:
    """Bytes of the named batch files, from an extracted folder or straight from the tarball."""
    if source.is_dir():
        return {m: read_bytes(source / m) for m in members}
    wanted = {f"{folder_name}/{m}": m for m in members}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(source, "r:*") as tar:
            for info in tar:  # one pass, no extraction
                if info.name in wanted and info.isfile():
                    found[wanted[info.name]] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        error = unreadable(source, e) if isinstance(e, OSError) else None
        if error is not None:
            raise error from e
        raise DataError(
            f"{source}: cannot read the archive ({e}); it is probably truncated or corrupt. "
            "Delete it and download it again."
        ) from e
    missing = [f"{folder_name}/{m}" for m in members if m not in found]
    if missing:
        raise DataError(
            f"{source}: archive lacks {', '.join(missing)}. Is it the official CIFAR "
            "'python version' archive? Re-download it."
        )
    return found


def _batch_field(batch: dict, key: bytes, where: str):
    if key not in batch:
        raise DataError(f"{where}: batch has no {key!r} entry; not an official CIFAR batch file.")
    return batch[key]


def _names(meta: dict, key: bytes, where: str) -> list[str]:
    names = _batch_field(meta, key, where)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar_split(source: Path, storage: str, split: str, coarse: bool = False):
    """Images (N, 3, 32, 32), labels (N,) and class names of one CIFAR split."""
    _, folder_name, train_members, test_member, meta_member = CIFAR_LAYOUT[storage]
    members = (train_members if split == "train" else [test_member]) + [meta_member]
    files = _read_cifar_members(source, folder_name, members)
    where_meta = f"{source}/{meta_member}" if source.is_dir() else f"{source}:{meta_member}"
    meta = load_pickle(files[meta_member], where_meta)
    if storage == "cifar10":
        label_key, names_key = b"labels", b"label_names"
    elif coarse:
        label_key, names_key = b"coarse_labels", b"coarse_label_names"
    else:
        label_key, names_key = b"fine_labels", b"fine_label_names"
    classes = _names(meta, names_key, where_meta)
    images, labels = [], []
    for member in members[:-1]:
        where = f"{source}/{member}" if source.is_dir() else f"{source}:{member}"
        batch = load_pickle(files[member], where)
        data = _batch_field(batch, b"data", where)
        lab = np.asarray(_batch_field(batch, label_key, where))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DataError(f"{where}: 'data' must be a uint8 array (N, 3072).")
        if data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{where}: 'data' rows have {data.shape[1]} values, expected 3072.")
        if len(lab) != len(data):
            raise DataError(
                f"{where}: {len(data)} images but {len(lab)} labels; the file is damaged. "
                "Re-download it."
            )
        if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
            raise DataError(f"{where}: labels outside 0..{len(classes) - 1}; file is damaged.")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
        labels.append(lab.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels), classes

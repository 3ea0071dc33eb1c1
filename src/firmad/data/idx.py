"""IDX files (MNIST, Fashion-MNIST), gzipped or raw, with magic numbers, dims and counts
checked before any data is decompressed beyond what the header declares."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from firmad.data.files import opened
from firmad.errors import DataError, InputError

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

# The largest IDX file read: a header declaring more (or a .gz expanding to more) is refused
# before its data is decompressed. MNIST's largest file holds 47 MB.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: str | Path, expect_magic: int) -> np.ndarray:
    """Read one IDX file (raw or .gz) of unsigned bytes; check magic number, dims and size.

    The header is checked first and the data read as a stream, no more than the header
    declares (at most MAX_IDX_BYTES): a small .gz that expands to gigabytes is refused
    after reading one byte past the declared size."""
    path = Path(path)
    kind = "images" if expect_magic == IDX_IMAGES_MAGIC else "labels"
    ndim = expect_magic - 2048
    header = 4 + 4 * ndim
    with opened(path) as f:
        head = f.read(header)
        if len(head) < header:
            raise DataError(
                f"{path}: only {len(head)} bytes, too short for an IDX {kind} file header."
            )
        magic = int.from_bytes(head[:4], "big")
        if magic != expect_magic:
            raise DataError(
                f"{path}: wrong IDX magic number {magic}, expected {expect_magic} for {kind}. "
                "Is it the right file (images vs labels), and not damaged? Re-download it."
            )
        dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        size = math.prod(dims)
        if size > MAX_IDX_BYTES:
            raise DataError(
                f"{path}: its header declares {dims} = {size} bytes, more than the "
                f"{MAX_IDX_BYTES >> 20} MiB an IDX file may hold here; the file is damaged or "
                "not a dataset file. Re-download it."
            )
        data = f.read(size)
        extra = len(f.read(1))  # one byte past the declared end: more data is damage too
    if len(data) != size or extra:
        held = f"{header + len(data)} bytes" if not extra else "more bytes"
        raise DataError(
            f"{path}: holds {held} but its header {dims} needs {header + size}; "
            "the file is truncated or corrupt. Delete it and download it again."
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array (N,) labels or (N, H, W) images as IDX; gzipped if path ends in .gz.

    The gzip header carries no time stamp, so the same array always gives the same bytes.
    """
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim not in (1, 3):
        raise InputError(f"write_idx: expected (N,) or (N, H, W), got shape {array.shape}")
    magic = 2048 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def idx_file(folder: Path, prefix: str, kind: str) -> Path | None:
    """The IDX file for prefix 'train'/'t10k' and kind 'images'/'labels', raw preferred."""
    ndim = 3 if kind == "images" else 1
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in ("", ".gz"):
            candidate = folder / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def read_idx_split(
    folder: Path, split: str, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Images (N, 1, H, W) and labels (N,) of one split of an MNIST-style folder.

    With ``n_classes``, labels must lie in 0..n_classes-1 (a label out of range would otherwise
    be a class of its own or break the class names later).
    """
    prefix = "train" if split == "train" else "t10k"
    images_path = idx_file(folder, prefix, "images")
    labels_path = idx_file(folder, prefix, "labels")
    for path, kind in ((images_path, "images"), (labels_path, "labels")):
        if path is None:
            raise DataError(
                f"{folder}: no {prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte(.gz) file "
                f"for the {split} split. Put all four IDX files in this folder."
            )
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; the files do not belong together. Re-download both."
        )
    if n_classes is not None and len(labels) and int(labels.max()) >= n_classes:
        raise DataError(
            f"{labels_path}: label {int(labels.max())} is out of range: this dataset has "
            f"{n_classes} classes (labels 0..{n_classes - 1}). The file is damaged or belongs "
            "to another dataset; re-download it."
        )
    return images[:, None], labels, str(images_path)


def idx_labels(folder: Path, split: str, n_classes: int) -> np.ndarray:
    """The labels of an IDX split without decoding its images: only the images file's header
    is read, to check that it holds as many images as there are labels."""
    prefix = "train" if split == "train" else "t10k"
    paths = {kind: idx_file(folder, prefix, kind) for kind in ("images", "labels")}
    for kind, path in paths.items():
        if path is None:
            raise DataError(
                f"{folder}: no {prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte(.gz) file "
                f"for the {split} split. Put all four IDX files in this folder."
            )
    labels = read_idx(paths["labels"], IDX_LABELS_MAGIC)
    with opened(paths["images"]) as f:
        head = f.read(16)
    n_images = int.from_bytes(head[4:8], "big") if len(head) == 16 else -1
    if int.from_bytes(head[:4], "big") != IDX_IMAGES_MAGIC or n_images != len(labels):
        raise DataError(
            f"{paths['images']} does not hold {len(labels)} images as {paths['labels']} has "
            "labels; the files do not belong together or are damaged. Re-download both."
        )
    if len(labels) and int(labels.max()) >= n_classes:
        raise DataError(
            f"{paths['labels']}: label {int(labels.max())} is out of range: this dataset has "
            f"{n_classes} classes (labels 0..{n_classes - 1}). The file is damaged or belongs "
            "to another dataset; re-download it."
        )
    return labels.astype(np.int64)

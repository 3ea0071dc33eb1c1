"""The dataset registry: builtin names, where their files are, and `load_dataset`.

Readers, one per official format (each in its module), all return an `ImageDataset` of uint8
(N, C, H, W) images:

- `firmad.data.idx`: IDX (MNIST, Fashion-MNIST), gzipped or raw, headers checked.
- `firmad.data.cifar`: CIFAR-10 / CIFAR-100 "python version" (archive or folder), unpickled by
  `RestrictedUnpickler`, so a hostile file cannot run code.
- `firmad.data.folders`: image folders (``folder:PATH``) and ``.npz`` archives (``npz:PATH``).

Builtin datasets are looked for in: an explicit root; ``$FIRMAD_DATA`` and its sub-folder named
after the dataset; /usr/share/datasets/fashion-mnist (Fashion-MNIST only), ~/.cache/firmad/NAME,
./data/NAME; and finally, with ``download=True``, torchvision downloads into ~/.cache/firmad/NAME.
Nothing is written to disk except downloads.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from firmad.data.cifar import CIFAR_LAYOUT, RestrictedUnpickler, load_pickle, read_cifar_split
from firmad.data.files import ImageDataset
from firmad.data.folders import (
    IMAGE_EXTENSIONS,
    load_image,
    pil_array,
    read_image_folder,
    read_npz,
    to_8bit,
)
from firmad.data.idx import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MAX_IDX_BYTES,
    idx_file,
    idx_labels,
    read_idx,
    read_idx_split,
    write_idx,
)
from firmad.errors import DataError, DataNotFoundError, InputError

# The readers' names stay importable from here (firmad.data.sources), where they lived first.
__all__ = [
    "CIFAR_LAYOUT",
    "DATASETS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_EXTENSIONS",
    "MAX_IDX_BYTES",
    "SPLITS",
    "ImageDataset",
    "RestrictedUnpickler",
    "describe",
    "load_dataset",
    "load_image",
    "load_pickle",
    "locate",
    "pil_array",
    "prepare",
    "read_cifar_split",
    "read_idx",
    "read_idx_split",
    "read_image_folder",
    "read_npz",
    "searched_places",
    "split_labels",
    "to_8bit",
    "write_idx",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "cifar100-coarse")
SPLITS = ("train", "test")

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]


CACHE_DIR = Path("~/.cache/firmad")
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
HOW_TO_GET = (
    "Get it with `firmad data prepare {name} --download` (needs internet), "
    "or pass the folder holding the files with --root (root=...) or $FIRMAD_DATA"
)
HOW_TO_GET_FMNIST = "; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` installs it"


# ---------------------------------------------------------------------------------------------
# Locating, downloading, loading builtin datasets


def _storage_name(name: str) -> str:
    """Folder name for a builtin dataset's files (cifar100-coarse shares cifar100's files)."""
    return "cifar100" if name == "cifar100-coarse" else name


def _check_builtin(name: str) -> None:
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}. Use one of {', '.join(DATASETS)}, "
            "folder:PATH (an image folder) or npz:PATH (a .npz file)."
        )


def _find_files(name: str, base: Path) -> Path | None:
    """The folder (or CIFAR archive) with the dataset's files at or just below base."""
    storage = _storage_name(name)
    if storage in ("fashion-mnist", "mnist"):
        torchvision_dir = "FashionMNIST" if storage == "fashion-mnist" else "MNIST"
        for folder in (base, base / torchvision_dir / "raw"):
            if idx_file(folder, "train", "images") or idx_file(folder, "t10k", "images"):
                return folder
        return None
    archive, folder_name, train_members, _, meta = CIFAR_LAYOUT[storage]
    if base.is_file() and base.name.endswith((".tar.gz", ".tgz", ".tar")):
        return base
    for folder in (base, base / folder_name):
        if (folder / meta).is_file() and (folder / train_members[0]).is_file():
            return folder
    return base / archive if (base / archive).is_file() else None


def searched_places(name: str, root: str | Path | None = None) -> list[Path]:
    """Every place `locate` looks in, in order. With an explicit root, only that root."""
    _check_builtin(name)
    storage = _storage_name(name)
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / storage]
    places = []
    env = os.environ.get("FIRMAD_DATA")
    if env:
        places += [Path(env).expanduser(), Path(env).expanduser() / storage]
    if storage in SYSTEM_DIRS:
        places.append(SYSTEM_DIRS[storage])
    places += [(CACHE_DIR / storage).expanduser(), Path("data") / storage]
    return places


def locate(name: str, root: str | Path | None = None) -> Path | None:
    """Where a builtin dataset's files are (a folder, or a CIFAR archive), or None."""
    for place in searched_places(name, root):
        found = _find_files(name, place)
        if found is not None:
            return found
    return None


def _not_found_message(name: str, root: str | Path | None) -> str:
    places = "\n".join(f"  {p}" for p in searched_places(name, root))
    how = HOW_TO_GET.format(name=name)
    if _storage_name(name) == "fashion-mnist":
        how += HOW_TO_GET_FMNIST
    return f"dataset {name!r} not found. Searched:\n{places}\n{how}."


def _download(name: str, dest: Path) -> None:
    """Download the official files with torchvision (md5-checked) into dest."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    storage = _storage_name(name)
    dest.mkdir(parents=True, exist_ok=True)
    if storage in ("fashion-mnist", "mnist"):
        cls = datasets.FashionMNIST if storage == "fashion-mnist" else datasets.MNIST
        for train in (True, False):  # files land in dest/<Class>/raw
            cls(root=str(dest), train=train, download=True)
    else:
        cls = datasets.CIFAR10 if storage == "cifar10" else datasets.CIFAR100
        download_and_extract_archive(cls.url, str(dest), filename=cls.filename, md5=cls.tgz_md5)


def prepare(name: str, root: str | Path | None = None, download: bool = True) -> Path:
    """Find a builtin dataset, downloading it into root (or ~/.cache/firmad/NAME) if allowed.

    Returns the folder (or CIFAR archive) holding the files; raises DataNotFoundError otherwise.
    """
    found = locate(name, root)
    if found is not None:
        return found
    if download:
        base = Path(root).expanduser() if root is not None else CACHE_DIR.expanduser()
        dest = base if root is not None else base / _storage_name(name)
        try:
            _download(name, dest)
        except Exception as e:  # network, disk, checksum: all end the same way for the user
            raise DataNotFoundError(
                f"downloading {name!r} into {dest} failed ({type(e).__name__}: {e}). "
                "Check the internet connection, or get the files another way and pass --root."
            ) from e
        found = _find_files(name, dest)
        if found is not None:
            return found
    raise DataNotFoundError(_not_found_message(name, root))


@functools.lru_cache(maxsize=4)  # e.g. train + test of two datasets
def _read_builtin(name: str, split: str, path: str, mtime_ns: int):
    """Numpy images, labels, classes and source file of a builtin split (cached per process)."""
    storage = _storage_name(name)
    source = Path(path)
    if storage in ("fashion-mnist", "mnist"):
        classes = FASHION_MNIST_CLASSES if storage == "fashion-mnist" else MNIST_CLASSES
        images, labels, where = read_idx_split(source, split, len(classes))
        return images, labels.astype(np.int64), list(classes), where
    images, labels, classes = read_cifar_split(source, storage, split, name == "cifar100-coarse")
    return images, labels, classes, str(source)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    download: bool = False,
    *,
    size: int = 32,
    channels: int = 3,
) -> ImageDataset:
    """Load one split ("train" or "test") of a dataset as uint8 (N, C, H, W) images.

    name: fashion-mnist, mnist, cifar10, cifar100, cifar100-coarse (the 20 superclasses),
    folder:PATH or npz:PATH. root: where the files are (builtin datasets only; see `locate`).
    download: fetch a builtin dataset that is not found. size, channels: output size and
    channel count (1 or 3) for image folders only; other sources keep their own images.
    """
    import torch

    if split not in SPLITS:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if name.startswith("folder:"):
        return read_image_folder(Path(name[7:]).expanduser(), split, size, channels)
    if name.startswith("npz:"):
        return read_npz(Path(name[4:]).expanduser(), split)
    _check_builtin(name)
    found = prepare(name, root, download=download)
    images, labels, classes, source = _read_builtin(name, split, *_cache_key(found))
    # Copies, so callers may modify their tensors without touching the cache.
    return ImageDataset(
        images=torch.from_numpy(images.copy()),
        labels=torch.from_numpy(labels.copy()),
        classes=list(classes),
        name=name,
        source=source,
    )


def _cache_key(found: Path) -> tuple[str, int]:
    """The resolved path and newest modification time: any change to the files (or the
    folder) gives a new key of the reader's cache."""
    stamp = max(p.stat().st_mtime_ns for p in [found, *(found.iterdir() if found.is_dir() else [])])
    return str(found.resolve()), stamp


def split_labels(
    name: str, split: str, root: str | Path | None = None, download: bool = False
) -> tuple[np.ndarray, list[str]]:
    """The labels (N,) and class names of one split; for IDX datasets only the labels file is
    decoded (what `firmad data show` needs, in a fraction of a second)."""
    if split not in SPLITS:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    storage = _storage_name(name) if name in DATASETS else None
    if storage in ("fashion-mnist", "mnist"):
        classes = FASHION_MNIST_CLASSES if storage == "fashion-mnist" else MNIST_CLASSES
        found = prepare(name, root, download=download)
        return idx_labels(found, split, len(classes)), list(classes)
    data = load_dataset(name, split, root, download)
    return data.labels.numpy(), list(data.classes)


def describe(name: str, root: str | Path | None = None, download: bool = False) -> list[dict]:
    """Per class: class_id, name, n_train_normal, n_test, n_test_normal, n_test_anomalies.

    The counts are those of `one_vs_rest` with that class as the normal one.
    """
    train, classes = split_labels(name, "train", root, download)
    test, test_classes = split_labels(name, "test", root, download)
    n_classes = len(classes)
    train_counts = np.bincount(train, minlength=n_classes)
    test_counts = np.bincount(test, minlength=n_classes)
    return [
        {
            "class_id": i,
            "name": c,
            "n_train_normal": int(train_counts[i]),
            "n_test": len(test),
            "n_test_normal": int(test_counts[i]),
            "n_test_anomalies": len(test) - int(test_counts[i]),
        }
        for i, c in enumerate(classes)
    ]

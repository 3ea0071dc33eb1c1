"""One-class evaluation protocols built on the dataset readers.

- `one_vs_rest`: train on the training images of one normal class; test on the whole test split,
  label 1 = anomaly (every other class).
- `multi_class_normal`: the same with several normal classes.
- `dataset_vs_dataset`: train on all of one dataset; test on its test split (label 0) plus another
  dataset's test split (label 1), converted to the normal dataset's size and channel count.

Optional deterministic subsampling: `max_train` keeps a random subset of the normal training
images, `max_test` a subset of the test split stratified over the original test classes. Both
are drawn from a `torch.Generator` seeded with `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from firmad.data.sources import ImageDataset, describe, load_dataset  # noqa: F401 (re-export)
from firmad.errors import DataError, InputError


@dataclass
class OneClassSplit:
    """Training normals and a labelled test set (test_labels: 1 = anomaly)."""

    train_images: torch.Tensor  # uint8 (N, C, H, W), normal images only
    test_images: torch.Tensor  # uint8 (M, C, H, W)
    test_labels: torch.Tensor  # int64 (M,), 1 = anomaly
    test_classes: torch.Tensor  # int64 (M,), original class ids
    normal_classes: list[int]
    classes: list[str]
    dataset: str
    subsample: dict
    train_labels: torch.Tensor | None = None  # int64 (N,), original class ids of the normals


def class_index(classes: Sequence[str], normal_class: int | str) -> int:
    """Class id from an int id or a class name (case-insensitive); DataError if unknown."""
    listing = ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    if isinstance(normal_class, bool):
        raise DataError(f"normal class {normal_class!r} is not an id or a name; classes: {listing}")
    if isinstance(normal_class, int):
        if 0 <= normal_class < len(classes):
            return normal_class
        raise DataError(
            f"normal class {normal_class} is out of range 0..{len(classes) - 1}; classes: {listing}"
        )
    wanted = str(normal_class).strip().lower()
    for i, c in enumerate(classes):
        if c.lower() == wanted:
            return i
    if wanted.isdigit():  # "3" from a command line
        return class_index(classes, int(wanted))
    raise DataError(f"unknown class {normal_class!r}; classes: {listing}")


def subsample_indices(n: int, max_n: int | None, gen: torch.Generator) -> torch.Tensor:
    """Sorted random subset of range(n) of size min(n, max_n); everything if max_n is None."""
    if max_n is None or max_n >= n:
        return torch.arange(n)
    if max_n < 0:
        raise InputError(f"subsample size must be >= 0, got {max_n}")
    return torch.randperm(n, generator=gen)[:max_n].sort().values


def stratified_indices(groups: torch.Tensor, max_n: int | None, gen: torch.Generator):
    """Sorted subset of size min(N, max_n) keeping each group's share (largest remainder)."""
    n = len(groups)
    if max_n is None or max_n >= n:
        return torch.arange(n)
    if max_n < 0:
        raise InputError(f"subsample size must be >= 0, got {max_n}")
    ids, counts = torch.unique(groups, return_counts=True)
    exact = counts.double() * max_n / n
    quota = exact.floor().long()
    # Hand the leftover places to the largest fractional parts (ties: lower class id first).
    leftover = max_n - int(quota.sum())
    order = torch.argsort(-(exact - quota), stable=True)
    quota[order[:leftover]] += 1
    chosen = []
    for cls, q in zip(ids.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(groups == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:q]])
    return torch.cat(chosen).sort().values


def match_images(images: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
    """uint8 images resized (bilinear, antialias) to size (H, W), channels repeated/averaged."""
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.repeat(1, channels, 1, 1)
        elif channels == 1:
            images = images.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
        else:
            raise DataError(f"cannot turn {images.shape[1]}-channel images into {channels}")
    if tuple(images.shape[2:]) != tuple(size):
        out = []
        for chunk in images.split(1024):  # bounded memory for big test sets
            x = F.interpolate(chunk.float(), size=size, mode="bilinear", antialias=True)
            out.append(x.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(out) if out else images.new_zeros((0, images.shape[1], *size))
    return images


@dataclass(frozen=True)
class _Subsample:
    """The deterministic subsampling of a split: at most ``max_train`` normal training images,
    ``max_test`` test images (stratified), drawn from a generator seeded with ``seed``."""

    max_train: int | None
    max_test: int | None
    seed: int


def _build(
    dataset: str,
    train: ImageDataset,
    test_images: torch.Tensor,
    test_classes: torch.Tensor,
    normal_ids: list[int],
    classes: list[str],
    sub: _Subsample,
) -> OneClassSplit:
    max_train, max_test, seed = sub.max_train, sub.max_test, sub.seed
    gen = torch.Generator().manual_seed(seed)
    normal = torch.isin(train.labels, torch.tensor(normal_ids))
    train_images, train_labels = train.images[normal], train.labels[normal]
    if len(train_images) == 0:
        raise DataError(
            f"{dataset}: no training images of the normal class(es) "
            f"{[classes[i] for i in normal_ids]}; add some or pick another class."
        )
    keep_train = subsample_indices(len(train_images), max_train, gen)
    train_images, train_labels = train_images[keep_train], train_labels[keep_train]
    keep = stratified_indices(test_classes, max_test, gen)
    test_images, test_classes = test_images[keep], test_classes[keep]
    test_labels = (~torch.isin(test_classes, torch.tensor(normal_ids))).long()
    return OneClassSplit(
        train_images=train_images,
        test_images=test_images,
        test_labels=test_labels,
        test_classes=test_classes,
        normal_classes=list(normal_ids),
        classes=list(classes),
        dataset=dataset,
        subsample={
            "max_train": max_train,
            "max_test": max_test,
            "seed": seed,
            "n_train": len(train_images),
            "n_test": len(test_images),
        },
        train_labels=train_labels,
    )


def multi_class_normal(
    name: str,
    normal_classes: Sequence[int | str],
    root: str | Path | None = None,
    download: bool = False,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    **load_kwargs,
) -> OneClassSplit:
    """Several normal classes (ids or names); every other test class is an anomaly.

    load_kwargs (size, channels) go to `load_dataset` for image folders.
    """
    train = load_dataset(name, "train", root, download, **load_kwargs)
    test = load_dataset(name, "test", root, download, **load_kwargs)
    if train.classes != test.classes:
        raise DataError(
            f"{name}: train classes {train.classes} differ from test classes {test.classes}; "
            "give both splits the same class folders."
        )
    if not normal_classes:
        raise DataError(f"{name}: give at least one normal class; classes: {train.classes}")
    ids = sorted({class_index(train.classes, c) for c in normal_classes})
    sub = _Subsample(max_train, max_test, seed)
    return _build(name, train, test.images, test.labels, ids, train.classes, sub)


def one_vs_rest(
    name: str,
    normal_class: int | str,
    root: str | Path | None = None,
    download: bool = False,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    **load_kwargs,
) -> OneClassSplit:
    """One normal class (id or name): train on its training images, test on the test split."""
    return multi_class_normal(
        name, [normal_class], root, download, max_train, max_test, seed, **load_kwargs
    )


def dataset_vs_dataset(
    normal_name: str,
    outlier_name: str,
    root: str | Path | None = None,
    outlier_root: str | Path | None = None,
    download: bool = False,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    **load_kwargs,
) -> OneClassSplit:
    """All of normal_name is normal; outlier_name's test split is the anomalies.

    Outlier images take the normal images' size and channel count. Their classes follow the
    normal ones in `classes` (as "OUTLIER_NAME:class") and in `test_classes`.
    """
    train = load_dataset(normal_name, "train", root, download, **load_kwargs)
    test = load_dataset(normal_name, "test", root, download, **load_kwargs)
    outliers = load_dataset(outlier_name, "test", outlier_root, download, **load_kwargs)
    channels, size = train.images.shape[1], tuple(train.images.shape[2:])
    outlier_images = match_images(outliers.images, size, channels)
    test_images = torch.cat([match_images(test.images, size, channels), outlier_images])
    offset = len(train.classes)
    test_classes = torch.cat([test.labels, outliers.labels + offset])
    classes = list(train.classes) + [f"{outlier_name}:{c}" for c in outliers.classes]
    normal_ids = list(range(offset))
    dataset = f"{normal_name} vs {outlier_name}"
    sub = _Subsample(max_train, max_test, seed)
    return _build(dataset, train, test_images, test_classes, normal_ids, classes, sub)

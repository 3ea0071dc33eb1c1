"""The in-memory training pool: a run's normal images and its outliers, uint8, on the device.

`prepare_images` resizes a split's images once to the training size, `build_pool` adds the
frozen synthetic outliers (or real outlier exposure). A training epoch samples from the pool;
nothing here runs per step. (`firmad.factory.build_split` reads a run's one-class split.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from firmad.augment import to_float
from firmad.data.protocol import OneClassSplit
from firmad.data.sources import load_dataset
from firmad.outliers import OutlierKind, make_frozen_outliers


def prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images once to the training size (kept uint8, native channels).

    The same bytes on every CPU: resampling weights are rational, so many pixels land exactly
    on k + 0.5, where float32 rounding (which differs between vector instruction sets) would
    decide either way. In float64 the error (~1e-13) stays far inside a 1e-7 margin, and those
    ties all round up."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(4096):
        x = to_float(chunk.double().div_(255.0), size=size, channels=chunk.shape[1])
        out.append((x * 255 + (0.5 + 1e-7)).floor_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 images with ``channels`` channels (RGB averaged to gray, gray repeated to RGB)."""
    if images.shape[1] == channels:
        return images
    if channels == 1:
        return images.float().mean(1, keepdim=True).round().to(torch.uint8)
    return images.expand(-1, channels, -1, -1).contiguous()


@dataclass
class Pool:
    """Everything one epoch samples from: normals first, then outliers."""

    images: torch.Tensor  # uint8 (M, C, H, W) on the training device
    class_ids: torch.Tensor  # int64 (M,): inlier class id, -1 for outliers
    kind_ids: torch.Tensor  # int64 (M,): 0 for inliers, 1..K outlier kind
    n_normal: int


def normal_class_ids(split: OneClassSplit, n: int, multi_class: bool) -> torch.Tensor:
    """Multi-class normal keeps each class's id (multi-class FIRM positives); else all 0."""
    if multi_class and split.train_labels is not None:
        return split.train_labels.long()
    return torch.zeros(n, dtype=torch.int64)


def build_pool(
    normals: torch.Tensor,
    normal_ids: torch.Tensor,
    device: torch.device,
    *,
    seed: int,
    frozen: Sequence[OutlierKind] = (),
    exposure: str | None = None,
    exposure_copies: int = 1,
    download: bool = False,
) -> Pool:
    """The normals, then their outliers: ``exposure`` (real images, ``exposure_copies`` per
    normal) if given, else one copy of each normal per ``frozen`` kind. Drawn once from the
    run's seed: a resumed run rebuilds the same pool."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    images, class_ids, kind_ids = [normals], [normal_ids], [torch.zeros_like(normal_ids)]
    if exposure:
        # Outlier exposure: real outlier images fill the outlier slots (one per kind per normal).
        real = load_dataset(exposure, split="train", root=None, download=download).images
        real = match_channels(prepare_images(real, normals.shape[-1]), normals.shape[1])
        n = len(normals) * exposure_copies
        pick = torch.randint(len(real), (n,), generator=gen)
        images.append(real[pick])
        class_ids.append(torch.full((n,), -1))
        kind_ids.append(torch.ones(n, dtype=torch.int64))
    elif frozen:
        out, kinds = make_frozen_outliers(normals, list(frozen), gen)
        images.append(out)
        class_ids.append(torch.full((len(out),), -1))
        kind_ids.append(kinds)
    return Pool(
        images=torch.cat(images).to(device),
        class_ids=torch.cat(class_ids).to(device),
        kind_ids=torch.cat(kind_ids).to(device),
        n_normal=len(normals),
    )

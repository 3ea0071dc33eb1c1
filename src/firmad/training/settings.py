"""What the training loop needs besides its components: a small frozen settings record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from firmad.data.pool import Pool
from firmad.errors import ConfigError
from firmad.outliers import OutlierKind


@dataclass(frozen=True)
class AdversarialSettings:
    """Adversarial training's inner PGD: norm, ε-ball, steps, step size, random start."""

    norm: str
    eps: float
    steps: int
    alpha: float
    random_start: bool = True


@dataclass(frozen=True)
class TrainSettings:
    """What the loop needs besides its components (built once by `firmad.factory`).

    ``batch_size`` is the global batch of all processes; ``steps_per_epoch`` caps an epoch
    (0: the whole pool); ``amp`` is resolved (none, bf16 or fp16); ``fresh_outliers`` are the
    outlier kinds drawn anew each step (empty: the pool's frozen ones); ``checkpoint_meta``
    goes into every checkpoint's metadata (the dataset, the run config, and ``numerics``: the
    precision ``train.amp`` resolved to here and why, the layout, capability and threads)."""

    batch_size: int
    epochs: int
    seed: int
    device: torch.device
    channels: int = 3
    steps_per_epoch: int = 0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False
    adversarial: AdversarialSettings | None = None
    fresh_outliers: tuple[OutlierKind, ...] = ()
    checkpoint_meta: Mapping[str, Any] = field(default_factory=dict)


def plan_epochs(pool: Pool, settings: TrainSettings) -> tuple[int, int, int]:
    """(samples per epoch, steps per epoch, total steps) of a pool under these settings."""
    samples = len(pool.images)
    if settings.fresh_outliers:  # same mix of inliers and outliers as the frozen pool
        samples = pool.n_normal * (1 + len(settings.fresh_outliers))
    full = samples // settings.batch_size
    if full < 1:
        raise ConfigError(
            f"train.batch_size: {settings.batch_size} is larger than the {samples} "
            "training samples; lower it"
        )
    per_epoch = min(full, settings.steps_per_epoch) if settings.steps_per_epoch else full
    return samples, per_epoch, per_epoch * settings.epochs

"""The bank a scorer is fitted on: normal training features per rotation, optionally a seeded
subset of the images, their random crops, or k-means centroids of the features."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from firmad.errors import ConfigError, InputError
from firmad.scoring.base import faiss_or_none, l2_normalise
from firmad.scoring.features import FeatureExtractor

ENSEMBLE_BANKS = ("centre", "crops")


def bank_crops(variant: str, ensemble_bank: str, n_crops: int) -> int | None:
    """Random crops per bank image for a variant's bank: ``n_crops`` for the ensemble with
    ``ensemble_bank="crops"``, else None (the centre crop)."""
    if ensemble_bank not in ENSEMBLE_BANKS:
        raise ConfigError(
            f"ensemble_bank must be one of {', '.join(ENSEMBLE_BANKS)}, got {ensemble_bank!r}."
        )
    return n_crops if variant == "ensemble" and ensemble_bank == "crops" else None


def bank_subset(train_images: torch.Tensor, bank_size: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of the normal training images as the bank (None: all)."""
    if bank_size is None or bank_size >= train_images.shape[0]:
        return train_images
    if bank_size < 1:
        raise InputError(f"bank_size must be >= 1 or None, got {bank_size}.")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(train_images.shape[0], generator=g)[:bank_size].sort().values
    return train_images[idx]


def extract_banks(
    extractor: FeatureExtractor,
    train_images: torch.Tensor,
    angles: Iterable[int],
    batch_size: int = 512,
    bank_centroids: int | None = None,
    seed: int = 0,
    crops: int | None = None,
) -> dict[int, torch.Tensor]:
    """Normal training features per rotation (optionally replaced by k-means centroids).

    With ``crops``, each image gives that many random crops (as the ensemble's test images do),
    all in the bank: (crops * N, D) per rotation, drawn with seed + 2 (the ensemble's test crops
    use seed + 1).
    """
    banks = {}
    gen = torch.Generator().manual_seed(seed + 2) if crops else None
    for angle in angles:
        bank = extractor.extract(train_images, batch_size, angle=angle, crops=crops, gen=gen)
        bank = bank.reshape(-1, bank.shape[-1])
        if bank_centroids is not None and bank_centroids < bank.shape[0]:
            bank = kmeans_centroids(bank, bank_centroids, seed)
        banks[angle] = bank
    return banks


def kmeans_centroids(features: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k spherical k-means centroids of the features, scaled to the features' mean norm (so the
    norm-based scorers still see typical norms). faiss when installed, else scikit-learn."""
    if k < 1:
        raise InputError(f"bank_centroids must be >= 1, got {k}.")
    x = l2_normalise(features.float()).numpy().astype(np.float32)
    faiss = faiss_or_none()
    if faiss is not None:
        km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
        km.train(x)
        centroids = torch.from_numpy(km.centroids.copy())
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x)
        centroids = torch.from_numpy(km.cluster_centers_.astype(np.float32))
    return l2_normalise(centroids) * features.norm(dim=1).mean()

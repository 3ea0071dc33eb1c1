"""AUROC with a stratified percentile-bootstrap interval, and the stratified seeded subset.

Intervals: 95 % percentile bootstrap, resampling normals and anomalies separately (stratified
by label), seeded; a sweep uses the same resamples for every row, so rows are paired.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from firmad.data.protocol import stratified_indices
from firmad.errors import ConfigError
from firmad.metrics import evaluate_scores

__all__ = [
    "auroc_rows",
    "bootstrap",
    "bootstrap_auroc",
    "interval",
    "resamples",
    "stratified_subset",
]


def stratified_subset(y, n: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded subset of size min(N, n) keeping the normal/anomaly shares."""
    y = torch.as_tensor(y).reshape(-1).long()
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"subset size must be a positive integer or None, got {n!r}.")
    gen = torch.Generator().manual_seed(int(seed))
    return stratified_indices(y, n, gen)


def resamples(y: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(B, N) indices: each row resamples normals and anomalies separately, with replacement."""
    rng = np.random.default_rng(seed)
    normals, anomalies = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    pick_n = rng.integers(0, len(normals), size=(n_resamples, len(normals)))
    pick_a = rng.integers(0, len(anomalies), size=(n_resamples, len(anomalies)))
    return np.concatenate([normals[pick_n], anomalies[pick_a]], axis=1)


def auroc_rows(s: np.ndarray, n_normal: int) -> np.ndarray:
    """AUROC of each row of s (B, N) whose first ``n_normal`` columns are normals (ties = ½)."""
    ranks = rankdata(s, axis=1)
    n_anom = s.shape[1] - n_normal
    u = ranks[:, n_normal:].sum(axis=1) - n_anom * (n_anom + 1) / 2.0
    return u / (n_normal * n_anom)


def bootstrap(scores: np.ndarray, resamples: np.ndarray, n_normal: int) -> np.ndarray:
    return auroc_rows(scores[resamples], n_normal)


def interval(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_auroc(
    y, scores, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC and its stratified percentile-bootstrap 95 % interval: ``(auroc, low, high)``."""
    point = evaluate_scores(y, scores)["auroc"]  # validates the inputs
    y = np.asarray(torch.as_tensor(y).reshape(-1).cpu()).astype(np.int64)
    s = np.asarray(torch.as_tensor(scores).reshape(-1).double().cpu())
    res = resamples(y, n_resamples, seed)
    return (point, *interval(bootstrap(s, res, int((y == 0).sum()))))

"""Detection metrics for anomaly scores: AUROC, AUPR (both ways), FPR at 95 % TPR, AULC; the
threshold at a rate (`threshold_at`) and the exact interval of an achieved rate.

Conventions: label 1 = anomaly, 0 = normal; a higher score means more anomalous.
The curves come from scikit-learn; this module validates inputs and names the results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from firmad.errors import InputError

__all__ = ["aulc", "evaluate_scores", "fpr_at_tpr", "roc_curve"]


def _as_1d(x, what: str) -> np.ndarray:
    """Convert a list, numpy array or torch tensor to a 1-D numpy array."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 2 and 1 in arr.shape:  # a column or row vector is fine
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise InputError(f"{what} must be one-dimensional, got shape {tuple(arr.shape)}.")
    return arr


def _validate(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Check labels (0/1, both present) and scores (finite, same length); return numpy arrays."""
    y = _as_1d(labels, "labels")
    s = _as_1d(scores, "scores")
    if y.shape[0] != s.shape[0]:
        raise InputError(
            f"labels and scores have different lengths ({y.shape[0]} vs {s.shape[0]}); "
            "pass one score per labelled sample."
        )
    if y.shape[0] == 0:
        raise InputError("labels and scores are empty; pass at least one normal and one anomaly.")
    if y.dtype == bool:
        y = y.astype(np.int64)
    try:
        s = s.astype(np.float64)
        yf = y.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"labels and scores must be numeric: {exc}") from exc
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        values = sorted({float(v) for v in yf[bad][:5]})
        raise InputError(
            f"labels must be 0 (normal) or 1 (anomaly); found other values such as {values}."
        )
    y = yf.astype(np.int64)
    n_anom = int(y.sum())
    if n_anom == 0 or n_anom == y.shape[0]:
        only = "anomalies (1)" if n_anom else "normals (0)"
        raise InputError(
            f"labels contain only {only}; the metrics need both normal (0) and "
            "anomalous (1) samples."
        )
    if not np.isfinite(s).all():
        n_bad = int((~np.isfinite(s)).sum())
        raise InputError(
            f"scores contain {n_bad} NaN or infinite values; check the scorer / features "
            "(e.g. a diverged model) before evaluating."
        )
    return y, s


def fpr_at_tpr(labels, scores, tpr_level: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr_level``.

    Anomalies are the positives. The threshold walks down from the highest score (all tied
    scores move together); the result is the share of normals flagged at the first point where
    at least ``tpr_level`` of the anomalies are detected.
    """
    y, s = _validate(labels, scores)
    return _fpr_at(y, s, tpr_level)


def _fpr_at(y: np.ndarray, s: np.ndarray, tpr_level: float) -> float:
    # drop_intermediate=False: a dropped collinear point could be the first one reaching the level
    from sklearn import metrics as skm  # imported when used: it takes seconds

    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    idx = int(np.searchsorted(tpr, tpr_level, side="left"))
    return float(fpr[min(idx, len(fpr) - 1)])


def evaluate_scores(labels, scores) -> dict[str, float]:
    """Score-quality metrics for one detector.

    Args:
        labels: 1 = anomaly, 0 = normal (list, numpy array or torch tensor).
        scores: anomaly scores, higher = more anomalous, one per label, finite.

    Returns:
        ``{"auroc", "aupr_anomaly", "aupr_normal", "fpr95"}`` as floats in [0, 1].
        ``aupr_anomaly`` is average precision with anomalies positive; ``aupr_normal`` is
        average precision with normals positive and negated scores; ``fpr95`` is the FPR at
        the first threshold reaching 95 % TPR (anomalies positive).

    Raises:
        InputError: single label class, labels other than 0/1, NaN/inf scores, length mismatch.
    """
    from sklearn import metrics as skm

    y, s = _validate(labels, scores)
    return {
        "auroc": float(skm.roc_auc_score(y, s)),
        "aupr_anomaly": float(skm.average_precision_score(y, s)),
        "aupr_normal": float(skm.average_precision_score(1 - y, -s)),
        "fpr95": _fpr_at(y, s, 0.95),
    }


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of scikit-learn's ROC curve after validating the inputs."""
    from sklearn import metrics as skm

    y, s = _validate(labels, scores)
    return skm.roc_curve(y, s)


def aulc(epochs: Sequence[float], aurocs: Sequence[float]) -> float:
    """Area under the AUROC-vs-training-progress curve, progress normalised to [0, 1].

    Trapezoid rule with x = (epoch - first) / (last - first); points are sorted by epoch.
    A single point (or all points at one epoch) returns the (mean) AUROC itself. The result is
    the mean AUROC over training, so a method that converges faster scores higher.
    """
    x = np.asarray(epochs, dtype=np.float64).reshape(-1)
    y = np.asarray(aurocs, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InputError(
            f"epochs and aurocs have different lengths ({x.size} vs {y.size}); "
            "pass one AUROC per evaluated epoch."
        )
    if x.size == 0:
        raise InputError("aulc needs at least one (epoch, auroc) point.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("epochs and aurocs must be finite numbers (no NaN / inf).")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    span = x[-1] - x[0]
    if span == 0:
        return float(y.mean())
    xn = (x - x[0]) / span
    return float(np.sum((xn[1:] - xn[:-1]) * (y[1:] + y[:-1]) / 2.0))


def threshold_at(scores, rate: float) -> float:
    """The threshold with at most floor(rate x n) of the n scores strictly above it: the
    (n - m)-th smallest score, m = floor(rate x n) (the largest when m = 0). Ties at the
    threshold can leave fewer above it, never more."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise InputError("no scores to set a threshold on")
    if not np.isfinite(s).all():
        raise InputError("some scores are not finite; the detector is broken — fit it again")
    m = math.floor(rate * n + 1e-9)  # 0.05 x 100 is 5, not 4.999...
    return float(s[n - m - 1]) if m < n else float(s[0])


def conformal_p_values(heldout_scores, scores) -> np.ndarray:
    """Conformal p-value of each score against held-out normal scores: the share of the n
    held-out normals at least as anomalous, with the +1 correction, (1 + #{h >= s}) / (n + 1).
    On a normal image exchangeable with the held-out ones, P(p <= a) <= a for every a, so
    flagging p <= a flags at most a share a of normals; NaN scores give NaN."""
    h = np.sort(np.asarray(heldout_scores, dtype=np.float64).ravel())
    if h.size == 0:
        raise InputError("no held-out scores to compute p-values against")
    if not np.isfinite(h).all():
        raise InputError("some held-out scores are not finite; fit the detector again")
    s = np.asarray(scores, dtype=np.float64)
    at_least = h.size - np.searchsorted(h, s, side="left")  # held-out scores >= s
    p = (1.0 + at_least) / (h.size + 1.0)
    return np.where(np.isnan(s), np.nan, p)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float] | None:
    """Exact (Clopper-Pearson) interval of a rate k / n; None without scipy."""
    try:
        from scipy.stats import beta
    except ImportError:
        return None
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return [lo, hi]

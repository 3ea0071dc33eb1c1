"""The calibrator: a detector's threshold, the exact count behind it, its interval, p-values.

On held-out normal images (the default of `fit` and `firmad fit`) the threshold is the
conformal one: a score s is an anomaly when its p-value

    p(s) = (1 + #{held-out scores >= s}) / (n + 1)

is at most the target rate. That is the same as ``s > threshold`` for one held-out score, the
(n - m)-th smallest with m = floor(target x (n + 1)) - 1, so exactly m held-out normals lie above
it (fewer with ties) and a fresh normal exchangeable with them is flagged with probability
(m + 1) / (n + 1) <= target (continuous scores; ties only lower it). 200 held-out normals at 5 %:
9 above the threshold, a fresh normal flagged with probability 10 / 201.

Without held-out images the threshold is set on the training images' own scores at
``contamination`` as PyOD does (`firmad.metrics.threshold_at`: floor(rate x n) above it); those
scores are optimistic (a kNN bank holds the images), so no p-value is offered for them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from firmad.errors import InputError
from firmad.metrics import clopper_pearson, conformal_p_values, threshold_at

HELD_OUT, TRAINING = "held-out", "training"
# The held-out share must put at least this many normals above the threshold: the 95 %
# interval of the achieved FPR is then about +-60 % of the target (1.96 / sqrt(10)).
MIN_ABOVE = 10
_EPS = 1e-9  # 0.05 x 200 is 10, not 9.999...


def max_above(n: int, rate: float) -> int:
    """How many of n held-out normals may score above the conformal threshold at ``rate``
    (-1: none can be flagged, the smallest p-value 1 / (n + 1) is above the rate)."""
    return math.floor(rate * (n + 1) + _EPS) - 1


def min_heldout(rate: float) -> int:
    """The fewest held-out normals with which a p-value can reach ``rate``."""
    return max(1, math.ceil(1.0 / rate - _EPS) - 1)


def check_rates(target_fpr, contamination) -> None:
    """Exactly one rate, a number in (0, 1)."""
    if (target_fpr is None) == (contamination is None):
        raise InputError("calibrate: give exactly one of target_fpr= or contamination=")
    rate = target_fpr if target_fpr is not None else contamination
    if isinstance(rate, bool) or not isinstance(rate, float | int) or not 0.0 < rate < 1.0:
        raise InputError(f"calibrate: the rate must be a number in (0, 1), got {rate!r}")


def check_reachable(n: int, rate: float) -> None:
    """Refuse a held-out set too small for any image to reach p <= rate."""
    if max_above(n, rate) < 0:
        raise InputError(
            f"with {n} held-out normal image(s) no p-value can reach {rate:g} (the smallest is "
            f"1/{n + 1}): hold out at least {min_heldout(rate)} images (more images, or a larger "
            "holdout), or choose a larger target_fpr / contamination"
        )


def conformal_threshold(heldout, rate: float) -> float:
    """The held-out score above which exactly the images with p <= rate lie (see module)."""
    s = _finite_sorted(heldout)
    check_reachable(len(s), rate)
    return float(s[len(s) - max_above(len(s), rate) - 1])


def _finite_sorted(scores) -> np.ndarray:
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise InputError("no scores to set a threshold on")
    if not np.isfinite(s).all():
        raise InputError(
            "some scores are NaN or infinite: an image that could not be read (remove it), or "
            "a broken detector (fit it again)"
        )
    return s


@dataclass(frozen=True)
class Calibration:
    """A threshold and what it rests on (``as_dict`` is ``calibration_`` / detector.json's)."""

    threshold: float
    source: str  # "held-out" or "training"
    n: int
    target_fpr: float | None
    contamination: float | None
    rule: str
    n_above: int
    achieved_fpr: float  # n_above / n: the share of the calibration scores above it
    expected_fpr: float | None  # held-out: a fresh normal's chance of being flagged
    interval: list[float] | None  # exact 95 % interval of achieved_fpr
    scores: list[float] | None  # the held-out scores (the p-values' reference)

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(scores, target_fpr: float | None = None, contamination: float | None = None,
              source: str = HELD_OUT) -> Calibration:  # fmt: skip
    """The threshold of these scores at ``target_fpr`` (held-out normals) or ``contamination``
    (its share of anomalies among them): conformal on held-out scores, PyOD's on training."""
    rate = target_fpr if target_fpr is not None else contamination
    s = _finite_sorted(scores)
    n = len(s)
    if source == HELD_OUT:
        t = conformal_threshold(s, rate)
        m = int((s > t).sum())
        rule = f"anomaly when p <= {rate:g}, p = (1 + held-out scores >= score) / (n + 1)"
        expected = (max_above(n, rate) + 1) / (n + 1)
    else:
        t = threshold_at(s, rate)
        m = int((s > t).sum())
        rule = f"anomaly when score > threshold ({rate:g} of the training images' scores)"
        expected = None
    c = Calibration(
        threshold=t,
        source=source,
        n=n,
        target_fpr=target_fpr,
        contamination=contamination,
        rule=rule,
        n_above=m,
        achieved_fpr=m / n,
        expected_fpr=expected,
        interval=clopper_pearson(m, n),
        scores=[float(x) for x in np.asarray(scores, dtype=np.float64)]
        if source == HELD_OUT
        else None,
    )
    if too_few_warning(c):
        _warn(too_few_warning(c))
    return c


def too_few_warning(cal: Calibration) -> str | None:
    """A warning when the held-out set is too small for the rate (see MIN_ABOVE)."""
    rate = cal.target_fpr if cal.target_fpr is not None else cal.contamination
    if cal.source != HELD_OUT or rate * cal.n >= MIN_ABOVE:
        return None
    return (
        f"the threshold rests on {cal.n} held-out images, {cal.n_above} of them above it: too "
        f"few for a rate of {rate:g} (at least {math.ceil(MIN_ABOVE / rate)} are needed for "
        f"{MIN_ABOVE} above it); the actual rate on new images may differ a lot. Give more "
        "images or a larger holdout"
    )


def recalibrate(heldout, training, target_fpr: float | None, contamination: float,
                changed: set[str] | None = None) -> Calibration | None:  # fmt: skip
    """A detector's threshold at its rates (``target_fpr``, else ``contamination``): on its
    held-out scores, else, with a warning, on its training images' scores. None, with a
    warning saying why, when the rates ``changed`` cannot move it."""
    if changed is not None and "target_fpr" not in changed and target_fpr is not None:
        _warn(
            f"contamination={contamination!r} leaves the threshold where it is: it is set "
            f"at target_fpr={target_fpr!r}; set target_fpr to move it (None: by contamination)"
        )
        return None
    t, c = (target_fpr, None) if target_fpr is not None else (None, contamination)
    if heldout is not None and len(heldout):
        return calibrate(heldout, t, c)
    if training is None:
        _warn(
            "the threshold stays where it is: this detector keeps no scores to set it on (it "
            "was calibrated on its training images); call calibrate(images, ...)"
        )
        return None
    _warn(
        "no images were held out: the threshold is set on the training images' own scores "
        "(PyOD's way; optimistic, the bank holds them), and there are no p-values. Use "
        "holdout='auto', or calibrate(normal_images, target_fpr=...)"
    )
    return calibrate(training, t, c, source=TRAINING)


def reference(heldout, training) -> np.ndarray:
    """The scores a threshold was set on: held-out, else the training images'."""
    ref = heldout if heldout is not None else training
    if ref is None:
        raise InputError("this needs the detector fitted with fit(), or calibrated")
    return np.asarray(ref, dtype=np.float64)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def p_values(heldout, scores) -> np.ndarray:
    """Conformal p-values of scores against held-out normal scores (NaN stays NaN)."""
    if heldout is None:
        raise InputError(
            "p-values need held-out normal scores: fit with holdout='auto' (the default), or "
            "call calibrate(normal_images, target_fpr=0.05) first"
        )
    return conformal_p_values(heldout, scores)


def confidence(reference, scores, threshold: float, n_above: int) -> np.ndarray:
    """PyOD's ``predict_confidence`` (Perini et al., ExCeeD): how sure the decision at the
    threshold is, in [0, 1], from the rank of each score among the reference scores."""
    from scipy.stats import binom

    ref = np.sort(np.asarray(reference, dtype=np.float64))
    n = len(ref)
    s = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(ref, s, side="right")  # reference scores <= s
    posterior = (1.0 + below) / (2.0 + n)
    conf = 1.0 - binom.cdf(n - n_above, n, posterior)
    conf = np.where(s > threshold, conf, 1.0 - conf)
    return np.where(np.isnan(s), np.nan, conf)


def proba(reference, scores, method: str = "linear") -> np.ndarray:
    """PyOD's ``predict_proba``: (N, 2) probabilities of normal and anomaly. ``linear``
    min-max scales a score between the reference's extremes, ``unify`` is erf of the score
    standardised by their mean and std, clipped at 0. A ranking, not a calibrated probability."""
    ref = np.asarray(reference, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if method == "linear":
        lo, hi = float(ref.min()), float(ref.max())
        p = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    elif method == "unify":
        from scipy.special import erf

        p = erf((s - ref.mean()) / (max(ref.std(), 1e-12) * np.sqrt(2)))
    else:
        raise InputError(f"predict_proba: method must be 'linear' or 'unify', got {method!r}")
    p = np.clip(p, 0.0, 1.0)
    return np.stack([1.0 - p, p], axis=1)

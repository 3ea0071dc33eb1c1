"""The threshold means what it says (exact counts on the held-out set, its interval, a warning
when it rests on too few images) and the detector follows scikit-learn / PyOD conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from firmad.detector import NotFittedError, OneClassDetector, clopper_pearson, threshold_at
from tests.test_detector import TRAIN, split  # noqa: F401  (module fixture)


@pytest.mark.parametrize("n", [1, 7, 20, 37, 100, 401])
@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1, 0.3])
def test_threshold_flags_exactly_floor_rate_n(n, rate):
    scores = np.random.default_rng(n).normal(size=n)
    t = threshold_at(scores, rate)
    assert int((scores > t).sum()) == math.floor(rate * n + 1e-9)
    assert t in scores  # one of the scores, no interpolation


def test_threshold_with_ties_never_flags_more():
    scores = np.array([0.0] * 10 + [1.0] * 10)
    assert (scores > threshold_at(scores, 0.25)).sum() <= 5
    ramp = np.arange(100.0)
    assert (ramp > threshold_at(ramp, 0.05)).sum() == 5  # 0.05 x 100 is 5, not 4


def test_clopper_pearson_matches_scipy():
    from scipy.stats import binomtest

    for k, n in [(0, 40), (2, 40), (5, 100), (40, 40)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        np.testing.assert_allclose(clopper_pearson(k, n), [ci.low, ci.high], atol=1e-12)


@pytest.fixture(scope="module")
def held(split):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OneClassDetector(overrides=TRAIN, holdout=0.4, target_fpr=0.1).fit(
            split.train_images
        )


def test_fit_holds_out_and_hits_the_target_exactly(held, split, tmp_path):  # noqa: F811
    cal = held.calibration_
    n = len(split.train_images)
    assert cal["n"] == round(0.4 * n) == len(held.heldout_scores_)
    assert cal["source"] == "held-out" and cal["target_fpr"] == 0.1
    assert cal["n_above"] == math.floor(0.1 * cal["n"])  # exactly the asked share
    assert (held.heldout_scores_ > held.threshold_).sum() == cal["n_above"]
    assert cal["achieved_fpr"] == cal["n_above"] / cal["n"]
    lo, hi = cal["interval"]
    assert lo <= cal["achieved_fpr"] <= hi
    assert held.heldout_scores_.dtype == np.float64
    # the held-out images are scored exactly as new images are
    np.testing.assert_allclose(held.decision_scores_, held.decision_function(split.train_images))
    held.save(tmp_path / "det")
    back = OneClassDetector.load(tmp_path / "det")
    np.testing.assert_array_equal(back.heldout_scores_, held.heldout_scores_)
    assert back.threshold_ == held.threshold_ and back.calibration_["n_above"] == cal["n_above"]


def test_auto_holdout_and_small_set_warning(split):  # noqa: F811
    det = OneClassDetector(holdout="auto", target_fpr=0.05)
    assert det.holdout_size(1000) == 200  # 10 / 0.05 images > 10 %
    assert det.holdout_size(5000) == 500  # 10 %
    assert det.holdout_size(100) == 50  # at most half
    det = OneClassDetector(overrides=TRAIN, holdout=0.2, target_fpr=0.05)
    with pytest.warns(UserWarning, match="rests on 20 held-out images"):
        det.fit(split.train_images)


def test_the_seed_draws_the_held_out_split(split):  # noqa: F811
    a = OneClassDetector(overrides=TRAIN, seed=0, holdout=0.3)
    b = OneClassDetector(overrides=TRAIN, seed=1, holdout=0.3)
    for d in (a, b):
        d.config_ = d.make_config()
    ia, _ = a._split(split.train_images)
    ib, _ = b._split(split.train_images)
    assert len(ia) == len(ib) == 30 and not torch.equal(ia, ib)


def test_sklearn_utilities(held, split):  # noqa: F811
    from sklearn.base import clone, is_outlier_detector
    from sklearn.exceptions import NotFittedError as SkNotFitted
    from sklearn.utils.validation import check_is_fitted

    fresh = OneClassDetector(overrides=TRAIN)
    assert is_outlier_detector(fresh) and is_outlier_detector(held)
    with pytest.raises(SkNotFitted):
        check_is_fitted(fresh)
    check_is_fitted(held)
    c = clone(held)
    assert c.get_params() == held.get_params() and not hasattr(c, "scorer_")
    assert repr(held) != repr(c) and "fitted" in repr(held) and "fitted" not in repr(c)
    with pytest.raises(NotFittedError):
        fresh.predict(split.test_images)


def test_pyod_attributes_and_fit_predict(split):  # noqa: F811
    x = split.train_images
    det = OneClassDetector(overrides=TRAIN, contamination=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = det.fit_predict(x)
    n = len(x)
    assert det.calibration_["source"] == "training"  # no holdout: the training scores
    assert labels.sum() == math.floor(0.1 * n) and np.array_equal(labels, det.labels_)
    np.testing.assert_array_equal(det.predict(x), labels)  # fit(X).predict(X) works
    assert det.decision_scores_.shape == (n,)
    proba = det.predict_proba(split.test_images[:6])
    assert proba.shape == (6, 2) and np.allclose(proba.sum(1), 1) and (proba >= 0).all()
    assert det.predict_proba(split.test_images[:6], method="unify").shape == (6, 2)
    # contamination on a fitted detector moves the threshold at once; others warn
    det.set_params(contamination=0.2)
    assert det.labels_.sum() == math.floor(0.2 * n)
    before = det.decision_function(split.test_images[:4])
    with pytest.warns(UserWarning, match="until you call fit"):
        det.set_params(k=1)
    np.testing.assert_array_equal(det.decision_function(split.test_images[:4]), before)


def test_conformal_p_values_count_the_heldout_at_least_as_anomalous():
    from firmad.metrics import conformal_p_values

    heldout = [0.1, 0.2, 0.2, 0.5]
    p = conformal_p_values(heldout, [0.0, 0.2, 0.3, 0.9, float("nan")])
    assert p[:4].tolist() == [5 / 5, 4 / 5, 2 / 5, 1 / 5]
    assert np.isnan(p[4])


def test_conformal_p_values_are_valid_on_exchangeable_normals():
    from scipy.stats import kstest

    from firmad.metrics import conformal_p_values

    rng = np.random.default_rng(0)
    flagged, pooled = [], []
    for _ in range(200):
        heldout, fresh = rng.normal(size=199), rng.normal(size=50)
        p = conformal_p_values(heldout, fresh)
        flagged.append(np.mean(p <= 0.05))
        pooled.append(p)
    assert np.mean(flagged) <= 0.05 + 0.005  # P(p <= a) <= a, up to Monte-Carlo error
    assert kstest(np.concatenate(pooled), "uniform").pvalue > 1e-3  # ~uniform on a 1/200 grid

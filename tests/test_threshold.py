"""The threshold means what it says: on held-out normals, "anomaly" is "p-value <= target" and a
fresh normal is flagged with probability at most the target (exact counts, its interval, a
warning when it rests on too few images); on training scores PyOD's rule. The detector follows
scikit-learn / PyOD conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from firmad.calibration import conformal_threshold, max_above
from firmad.detector import NotFittedError, OneClassDetector
from firmad.engine import heldout_split
from firmad.errors import InputError
from firmad.metrics import clopper_pearson, conformal_p_values, threshold_at
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


@pytest.mark.parametrize("n", [9, 10, 19, 20, 37, 100, 199, 200, 401])
@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("ties", [False, True])
def test_conformal_threshold_flags_a_fresh_normal_at_most_at_the_target(n, rate, ties):
    """Exact, not simulated: over the n + 1 ways of leaving one of n + 1 exchangeable scores
    out as the fresh one, the share flagged is P(flagged) for a fresh normal. It is
    (m + 1) / (n + 1) <= target, and the threshold decides as p <= target does."""
    pool = np.random.default_rng(n).normal(size=n + 1)
    pool = np.round(pool, 1) if ties else pool
    if max_above(n, rate) < 0:
        with pytest.raises(InputError, match="no p-value can reach"):
            conformal_threshold(pool[:n], rate)
        return
    flags, by_p = [], []
    for i in range(n + 1):
        rest, fresh = np.delete(pool, i), pool[i]
        t = conformal_threshold(rest, rate)
        assert t in rest and (rest > t).sum() <= max_above(n, rate)  # one of them, no more
        flags.append(fresh > t)
        by_p.append(conformal_p_values(rest, [fresh])[0] <= rate)
    assert flags == by_p  # "anomaly" = p <= target, score by score
    share = np.mean(flags)
    assert share <= rate + 1e-12
    if not ties:
        assert share == pytest.approx((max_above(n, rate) + 1) / (n + 1))


def test_the_old_rule_flagged_more_than_the_target():
    """floor(target x n) held-out scores above the threshold (the rule before p-values) flag a
    fresh normal with probability (m + 1) / (n + 1): 11 / 201 at n = 200, 5 %."""
    pool = np.random.default_rng(0).normal(size=201)
    old = np.mean([pool[i] > threshold_at(np.delete(pool, i), 0.05) for i in range(201)])
    new = np.mean([pool[i] > conformal_threshold(np.delete(pool, i), 0.05) for i in range(201)])
    assert old == pytest.approx(11 / 201) and new == pytest.approx(10 / 201) and new <= 0.05


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
    assert cal["n_above"] == max_above(cal["n"], 0.1) == math.floor(0.1 * (cal["n"] + 1)) - 1
    assert (held.heldout_scores_ > held.threshold_).sum() == cal["n_above"]
    assert cal["achieved_fpr"] == cal["n_above"] / cal["n"]
    assert cal["expected_fpr"] == (cal["n_above"] + 1) / (cal["n"] + 1) <= 0.1
    assert "p <= 0.1" in cal["rule"]
    lo, hi = cal["interval"]
    assert lo <= cal["achieved_fpr"] <= hi and lo <= cal["expected_fpr"] <= hi
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
    # too few held-out images for any p-value to reach the target: refused before training
    det = OneClassDetector(overrides=TRAIN, holdout=0.1, target_fpr=0.05)
    with pytest.raises(InputError, match="hold out at least 19"):
        det.fit(split.train_images)


def test_the_seed_draws_the_held_out_split():
    ia, ta = heldout_split(100, 30, seed=0)
    ib, _ = heldout_split(100, 30, seed=1)
    assert len(ia) == len(ib) == 30 and not torch.equal(ia, ib)
    assert sorted([*ia.tolist(), *ta.tolist()]) == list(range(100))


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
    det = OneClassDetector(overrides=TRAIN, contamination=0.1, holdout=0)
    with pytest.warns(UserWarning, match="no images were held out"):  # said loudly
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
    with pytest.warns(UserWarning, match="no images were held out"):
        det.set_params(contamination=0.2)
    assert det.labels_.sum() == math.floor(0.2 * n)
    with pytest.raises(InputError, match="p-values need held-out"):
        det.p_values(x[:2])  # training scores are no reference for p-values
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


def test_detector_p_values_decide_as_predict(held, split, tmp_path):  # noqa: F811
    x = split.test_images
    p = held.p_values(x)
    scores = held.decision_function(x)
    np.testing.assert_array_equal(p, conformal_p_values(held.heldout_scores_, scores))
    np.testing.assert_array_equal(held.predict(x), (p <= 0.1).astype(np.int64))
    conf = held.predict_confidence(x)
    assert conf.shape == (len(x),) and ((conf >= 0) & (conf <= 1)).all()
    held.save(tmp_path / "det")
    back = OneClassDetector.load(tmp_path / "det")
    np.testing.assert_array_equal(back.p_values(x), p)
    assert back.calibration_ == held.calibration_


def test_p_values_are_uniform_on_fixture_normals(held, split):  # noqa: F811
    """Scores of fixture normals the encoder never saw (the held-out ones and the test set's),
    split at random into held-out and one fresh image, 8000 times: the fresh image's p-value is
    uniform on {1, ..., n + 1} / (n + 1), and p <= 0.1 flags at most 10 % of them."""
    from scipy.stats import kstest

    fresh = held.decision_function(split.test_images[split.test_labels == 0])
    pool = np.concatenate([held.heldout_scores_, fresh])
    rng = np.random.default_rng(0)
    n = 39
    p = []
    for _ in range(8000):  # enough draws to tell a missing +1 correction apart
        idx = rng.permutation(len(pool))[: n + 1]
        p.append(conformal_p_values(pool[idx[:n]], pool[idx[n:]])[0])
    p = np.asarray(p)
    ranks = np.round(p * (n + 1))  # 1 .. n + 1, each 1 / (n + 1) of the time if uniform
    spread = (ranks - rng.uniform(size=len(ranks))) / (n + 1)  # then uniform on [0, 1]
    assert kstest(spread, "uniform").pvalue > 1e-3
    assert np.mean(p <= 0.1) <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / len(p))


def test_set_params_moves_the_threshold_or_says_why_not(held, split):  # noqa: F811
    import copy

    det = copy.deepcopy(held)
    before = det.threshold_
    with pytest.warns(UserWarning, match="leaves the threshold where it is"):
        det.set_params(contamination=0.5)  # the threshold is set by target_fpr
    assert det.threshold_ == before
    det.set_params(target_fpr=0.3)
    assert det.calibration_["n_above"] == max_above(len(det.heldout_scores_), 0.3)
    det.set_params(target_fpr=None, contamination=0.2)
    assert det.calibration_["contamination"] == 0.2 and det.threshold_ != before

"""Tests for firmad.metrics: agreement with scikit-learn, ties, error cases, AULC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from firmad.errors import InputError
from firmad.metrics import aulc, evaluate_scores, fpr_at_tpr, roc_curve


def _fpr95_brute(y: np.ndarray, s: np.ndarray) -> float:
    """Walk thresholds from the highest score down; first one flagging >= 95 % of anomalies."""
    for t in np.sort(np.unique(s))[::-1]:
        flagged = s >= t
        tpr = flagged[y == 1].mean()
        if tpr >= 0.95:
            return float(flagged[y == 0].mean())
    raise AssertionError("unreachable: the lowest threshold flags everything")


def _check_against_sklearn(y: np.ndarray, s: np.ndarray) -> None:
    m = evaluate_scores(y, s)
    assert set(m) == {"auroc", "aupr_anomaly", "aupr_normal", "fpr95"}
    assert abs(m["auroc"] - skm.roc_auc_score(y, s)) <= 1e-9
    assert abs(m["aupr_anomaly"] - skm.average_precision_score(y, s)) <= 1e-9
    assert abs(m["aupr_normal"] - skm.average_precision_score(1 - y, -s)) <= 1e-9
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    ref = fpr[np.argmax(tpr >= 0.95)]
    assert abs(m["fpr95"] - ref) <= 1e-9
    assert abs(m["fpr95"] - _fpr95_brute(y, s)) <= 1e-9
    for v in m.values():
        assert 0.0 <= v <= 1.0


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_random_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n)
    # rounded scores create many ties; shift anomalies up so curves are not trivial
    s = np.round(rng.normal(size=n) + 0.8 * y, 1)
    _check_against_sklearn(y, s)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(-5, 5)),
        min_size=2,
        max_size=80,
    ).filter(lambda pairs: len({p[0] for p in pairs}) == 2)
)
def test_property_agrees_with_sklearn(pairs: list[tuple[int, int]]) -> None:
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs], dtype=np.float64) / 3.0  # small integer grid: many ties
    _check_against_sklearn(y, s)


def test_perfect_and_reversed_scores() -> None:
    y = np.array([0, 0, 0, 1, 1])
    m = evaluate_scores(y, [0.1, 0.2, 0.3, 0.9, 1.0])
    assert m == {"auroc": 1.0, "aupr_anomaly": 1.0, "aupr_normal": 1.0, "fpr95": 0.0}
    m = evaluate_scores(y, [0.9, 1.0, 0.8, 0.1, 0.2])
    assert m["auroc"] == 0.0
    assert m["fpr95"] == 1.0


def test_all_tied_scores_give_chance() -> None:
    y = np.array([0, 1] * 10)
    m = evaluate_scores(y, np.zeros(20))
    assert m["auroc"] == 0.5
    assert m["fpr95"] == 1.0


def test_fpr95_uses_first_point_not_a_dropped_collinear_one() -> None:
    # 20 anomalies, 10 normals; three tied (anomaly, normal) groups make collinear ROC points
    # (TPR 0.90, 0.95, 1.00); sklearn's default drop_intermediate would drop the 0.95 one.
    y = np.array([1] * 17 + [1, 0, 1, 0, 1, 0] + [0] * 7)
    s = np.array([10.0] * 17 + [5, 5, 4, 4, 3, 3] + [0] * 7)
    m = evaluate_scores(y, s)
    assert m["fpr95"] == pytest.approx(0.2, abs=1e-12)
    assert m["fpr95"] == pytest.approx(_fpr95_brute(y, s), abs=1e-12)
    assert fpr_at_tpr(y, s, 0.95) == m["fpr95"]


def test_accepts_torch_and_bool_inputs() -> None:
    y = torch.tensor([False, True, False, True])
    s = torch.tensor([0.1, 0.9, 0.2, 0.8])
    assert evaluate_scores(y, s)["auroc"] == 1.0
    fpr, tpr, thr = roc_curve(y.long(), s)
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and len(thr) == len(fpr)


@pytest.mark.parametrize(
    ("labels", "scores", "fragment"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "only normals"),
        ([1, 1], [0.1, 0.2], "only anomalies"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], "NaN"),
        ([0, 1, 1], [0.1, float("inf"), 0.3], "NaN or infinite"),
        ([0, 1, 1], [0.1, 0.2], "different lengths"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 (normal) or 1 (anomaly)"),
        ([0, 1, -1], [0.1, 0.2, 0.3], "0 (normal) or 1 (anomaly)"),
        ([], [], "empty"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "one-dimensional"),
    ],
)
def test_invalid_inputs_raise(labels, scores, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        evaluate_scores(labels, scores)


def test_aulc() -> None:
    assert aulc([10], [0.7]) == pytest.approx(0.7)
    assert aulc([0, 10], [0.5, 1.0]) == pytest.approx(0.75)
    # x normalised: same curve on a different epoch scale gives the same area
    assert aulc([100, 200, 300], [0.6, 0.8, 0.8]) == pytest.approx(aulc([1, 2, 3], [0.6, 0.8, 0.8]))
    assert aulc([1, 2, 3], [0.6, 0.8, 0.8]) == pytest.approx((0.7 + 0.8) / 2)
    # unsorted input is sorted by epoch
    assert aulc([3, 1, 2], [0.8, 0.6, 0.8]) == pytest.approx(0.75)
    # faster convergence -> larger area
    assert aulc([0, 1, 2, 10], [0.5, 0.9, 0.9, 0.9]) > aulc([0, 8, 9, 10], [0.5, 0.6, 0.7, 0.9])
    with pytest.raises(InputError):
        aulc([1, 2], [0.5])
    with pytest.raises(InputError):
        aulc([], [])

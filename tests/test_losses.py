"""Tests for firmad.losses: hand-computed values, golden masks, numerics in half precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from firmad.errors import ConfigError, InputError
from firmad.losses import (
    FIRMLoss,
    NTXentLoss,
    SupConLoss,
    positive_mask,
)

TAU = 0.2


def _embeddings(n: int, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return z1, z2


def _dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def _manual_loss(anchors, keys, positives, exclude_self: bool) -> float:
    """-(1/|A|) sum_i (1/|P(i)|) sum_{j in P(i)} log softmax_j, with explicit loops."""
    total, count = 0.0, 0
    for i, a in enumerate(anchors):
        cols = [j for j in range(len(keys)) if not (exclude_self and j == i)]
        s = {j: _dot(a, keys[j]) / TAU for j in cols}
        log_den = math.log(sum(math.exp(v) for v in s.values()))
        pos = positives(i)
        if not pos:
            continue
        total += sum(s[j] - log_den for j in pos) / len(pos)
        count += 1
    return -total / count


def _firm_pairwise_manual(z1, z2, labels) -> float:
    n = len(labels)

    def positives(i):
        if labels[i] == -1:
            return [i]
        return [j for j in range(n) if labels[j] == labels[i]]

    return _manual_loss(list(z1), list(z2), positives, exclude_self=False)


def _concat_manual(z1, z2, labels, outliers_own_pair: bool) -> float:
    n = len(labels)
    z = list(z1) + list(z2)
    lab = list(labels) + list(labels)

    def positives(i):
        if outliers_own_pair and lab[i] == -1:
            return [(i + n) % (2 * n)]
        return [j for j in range(2 * n) if j != i and lab[j] == lab[i]]

    return _manual_loss(z, z, positives, exclude_self=True)


# ---------------------------------------------------------------- masks


def test_positive_mask_pairwise_golden():
    labels = torch.tensor([0, 0, -1, -1])
    expected = torch.tensor(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(positive_mask(labels, "pairwise", outlier_label=-1), expected)


def test_positive_mask_concat_golden():
    labels = torch.tensor([0, 0, -1, -1])
    expected = torch.tensor(
        [
            [0, 1, 0, 0, 1, 1, 0, 0],
            [1, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 1],
            [1, 1, 0, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(positive_mask(labels, "concat", outlier_label=-1), expected)


def test_positive_mask_supcon_treats_minus_one_as_label():
    labels = torch.tensor([0, 0, -1, -1])
    expected = torch.tensor(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 1],
            [0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(positive_mask(labels, "pairwise"), expected)
    concat = positive_mask(labels, "concat")
    assert not concat.diagonal().any()
    assert concat[2, 3] and concat[2, 7] and concat[2, 6]


def test_positive_mask_multiclass_restricts_to_same_class():
    labels = torch.tensor([0, 1, 0, -1])
    mask = positive_mask(labels, "pairwise", outlier_label=-1)
    assert mask[0].tolist() == [True, False, True, False]
    assert mask[1].tolist() == [False, True, False, False]
    assert mask[3].tolist() == [False, False, False, True]


def test_invalid_layout_and_mode():
    with pytest.raises(ConfigError, match="pairwise"):
        positive_mask(torch.tensor([0]), "diagonal")
    with pytest.raises(ConfigError, match="concat"):
        FIRMLoss(mode="both")
    with pytest.raises(ConfigError, match="tau"):
        FIRMLoss(tau=0.0)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("labels", [[0, 0, -1, -1], [0, 1, 0, -1, -1], [2, -1, 2, 2, -1, 0]])
def test_firm_pairwise_matches_hand_computation(labels):
    z1, z2 = _embeddings(len(labels))
    got = FIRMLoss(tau=TAU)(z1, z2, torch.tensor(labels))
    assert got.item() == pytest.approx(_firm_pairwise_manual(z1, z2, labels), rel=1e-5)


@pytest.mark.parametrize("labels", [[0, 0, -1, -1], [0, 1, 0, -1, -1]])
def test_firm_concat_matches_hand_computation(labels):
    z1, z2 = _embeddings(len(labels), seed=1)
    got = FIRMLoss(tau=TAU, mode="concat")(z1, z2, torch.tensor(labels))
    expected = _concat_manual(z1, z2, labels, outliers_own_pair=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_supcon_matches_hand_computation():
    labels = [0, 1, 1, 2, 0, 3]
    z1, z2 = _embeddings(len(labels), seed=2)
    got = SupConLoss(tau=TAU)(z1, z2, torch.tensor(labels))
    expected = _concat_manual(z1, z2, labels, outliers_own_pair=False)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_firm_pairwise_equals_supcon_lout_on_pairwise_matrix():
    """All inliers share a label, each outlier gets its own: SupCon's L_out on z1 z2^T / tau."""
    labels = torch.tensor([0, -1, 0, -1, -1, 0, -1])
    z1, z2 = _embeddings(len(labels), seed=3)
    relabelled = torch.where(labels == -1, torch.arange(len(labels)) + 1, torch.zeros_like(labels))
    same = relabelled[:, None] == relabelled[None, :]
    log_prob = F.log_softmax(z1 @ z2.T / TAU, dim=1)
    l_out = -((log_prob * same).sum(1) / same.sum(1)).mean()
    got = FIRMLoss(tau=TAU)(z1, z2, labels)
    assert got.item() == pytest.approx(l_out.item(), rel=1e-6)


def test_ntxent_one_directional_is_cross_entropy_on_diagonal():
    z1, z2 = _embeddings(6, seed=4)
    expected = F.cross_entropy(z1 @ z2.T / TAU, torch.arange(6))
    got = NTXentLoss(tau=TAU)(z1, z2, torch.zeros(6, dtype=torch.long))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_ntxent_symmetric_matches_manual_simclr():
    n = 5
    z1, z2 = _embeddings(n, seed=5)
    z = list(z1) + list(z2)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        den = sum(math.exp(_dot(z[i], z[k]) / TAU) for k in range(2 * n) if k != i)
        total += -(_dot(z[i], z[partner]) / TAU - math.log(den))
    got = NTXentLoss(tau=TAU, symmetric=True)(z1, z2)
    assert got.item() == pytest.approx(total / (2 * n), rel=1e-6)


def test_firm_all_outliers_reduces_to_ntxent():
    z1, z2 = _embeddings(5, seed=6)
    labels = torch.full((5,), -1)
    assert FIRMLoss()(z1, z2, labels).item() == pytest.approx(NTXentLoss()(z1, z2).item())
    assert FIRMLoss(mode="concat")(z1, z2, labels).item() == pytest.approx(
        NTXentLoss(symmetric=True)(z1, z2).item()
    )


def test_custom_outlier_label():
    z1, z2 = _embeddings(4, seed=7)
    a = FIRMLoss(outlier_label=9)(z1, z2, torch.tensor([0, 0, 9, 9]))
    b = FIRMLoss()(z1, z2, torch.tensor([0, 0, -1, -1]))
    assert a.item() == pytest.approx(b.item())


# ---------------------------------------------------------------- numerics


ALL_LOSSES = [
    FIRMLoss(),
    FIRMLoss(mode="concat"),
    NTXentLoss(),
    NTXentLoss(symmetric=True),
    SupConLoss(),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=repr)
def test_half_precision_finite_loss_and_grads(loss_fn, dtype):
    z1, z2 = _embeddings(6, d=8, seed=8)
    z1 = z1.to(dtype).requires_grad_()
    z2 = z2.to(dtype).requires_grad_()
    labels = torch.tensor([0, 0, -1, -1, -1, 0])
    loss = loss_fn(z1, z2, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    assert z1.grad.abs().sum() > 0


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [-1, -1, -1, -1], [0], [-1], [3, 3]], ids=str)
@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=repr)
def test_degenerate_batches_finite(loss_fn, labels):
    z1, z2 = _embeddings(len(labels), seed=9)
    z1, z2 = z1.float().requires_grad_(), z2.float().requires_grad_()
    loss = loss_fn(z1, z2, torch.tensor(labels))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_single_sample_pairwise_loss_is_zero():
    # One anchor, one key: softmax over a single logit is 1, so the loss is exactly 0.
    z1, z2 = _embeddings(1, seed=10)
    assert FIRMLoss()(z1, z2, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-12)


def test_identical_views_concat_no_nan():
    # z1 == z2 makes the self and pair logits equal; masking must not produce NaN.
    z1, _ = _embeddings(4, seed=11)
    z1 = z1.to(torch.float16).requires_grad_()
    loss = FIRMLoss(mode="concat")(z1, z1, torch.tensor([0, 0, -1, -1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()


def test_input_validation():
    z1, z2 = _embeddings(4)
    with pytest.raises(InputError, match="labels"):
        FIRMLoss()(z1, z2, torch.tensor([0, 0, -1]))
    with pytest.raises(InputError, match="shape"):
        FIRMLoss()(z1, z2[:3], torch.tensor([0, 0, -1, -1]))
    with pytest.raises(InputError, match="integer"):
        SupConLoss()(z1, z2, torch.tensor([0.0, 0.0, 1.0, 1.0]))

"""Contrastive losses: FIRM, NT-Xent and SupCon, built on one positive-mask core.

Every loss takes two L2-normalised embeddings ``z1``, ``z2`` of shape (N, D) (the projections of
two augmented views of the same N samples) and integer ``labels`` of shape (N,).

Two layouts of the similarity matrix are used:

- ``pairwise``: anchors are the rows of ``z1``, keys the rows of ``z2``; logits ``z1 @ z2.T / tau``
  (N x N), the diagonal (an anchor's own pair) is kept.
- ``concat``: anchors and keys are the rows of ``[z1; z2]``; logits (2N x 2N) with each row's
  self-similarity excluded from the softmax denominator. Row ``i`` and row ``i + N`` are a pair.

All losses have the form ``-(1/|A|) sum_{i in A} (1/|P(i)|) sum_{j in P(i)} log softmax_j(s_i)``
where ``P(i)`` is the positive set of anchor ``i`` (see :func:`positive_mask`) and ``A`` the anchors
with a non-empty positive set. Anchors with an empty positive set are ignored in the mean (with
FIRM and NT-Xent every anchor has at least its own pair, so this only matters for custom masks).

Numerics: the loss is always computed in float32 (autocast is disabled inside, half inputs are
cast up), self-similarities are removed with a large finite negative logit instead of ``-inf``, and
log-probabilities come from ``logsumexp`` — so fp16/bf16 inputs give finite losses and gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from firmad.errors import ConfigError, InputError

__all__ = [
    "LAYOUTS",
    "FIRMLoss",
    "NTXentLoss",
    "SupConLoss",
    "contrastive_loss",
    "positive_mask",
    "similarity_logits",
]

LAYOUTS = ("pairwise", "concat")

# Finite stand-in for -inf: exp() of it is exactly 0 in float32, and 0 * it is 0, not NaN.
_MASKED_LOGIT = torch.finfo(torch.float32).min / 2


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown loss mode {layout!r}; use one of {', '.join(LAYOUTS)}")


def positive_mask(
    labels: torch.Tensor, layout: str = "pairwise", outlier_label: int | None = None
) -> torch.Tensor:
    """Boolean positive mask built from labels, for either layout.

    ``pairwise`` returns (N, N): ``mask[i, j]`` says whether key ``z2[j]`` is a positive of anchor
    ``z1[i]``. ``concat`` returns (2N, 2N) over the rows of ``[z1; z2]``, with the diagonal
    (self-similarity) always False.

    Rule: ``j`` is a positive of ``i`` when both carry the same label. If ``outlier_label`` is
    given (FIRM), samples with that label are each their own class: an outlier anchor's only
    positive is its own pair (``j = i`` pairwise, ``i <-> i + N`` concat). With
    ``outlier_label=None`` (SupCon) all labels, -1 included, are ordinary labels.
    """
    labels = labels.reshape(-1)
    n = labels.numel()
    if layout == "concat":
        labels = torch.cat([labels, labels])
    else:
        _check_layout(layout)
    same = labels[:, None] == labels[None, :]
    idx = torch.arange(labels.numel(), device=labels.device)
    pair = (idx[:, None] % n) == (idx[None, :] % n) if n > 0 else same
    if outlier_label is not None:
        inlier = labels != outlier_label
        same = (same & inlier[:, None]) | pair
    if layout == "concat":
        same = same & ~torch.eye(2 * n, dtype=torch.bool, device=labels.device)
    return same


def similarity_logits(z1: torch.Tensor, z2: torch.Tensor, tau: float, layout: str) -> torch.Tensor:
    """Float32 logits of the chosen layout (self-similarity masked out for ``concat``)."""
    z1, z2 = z1.float(), z2.float()
    if layout == "pairwise":
        return z1 @ z2.T / tau
    _check_layout(layout)
    z = torch.cat([z1, z2])
    logits = z @ z.T / tau
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return logits.masked_fill(eye, _MASKED_LOGIT)


def contrastive_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over anchors of the mean negative log-softmax of their positives (float32 scalar).

    ``logits`` (R, K) float, ``pos`` (R, K) bool. Rows without positives are left out of the mean;
    if no row has a positive the result is a zero that still carries a (zero) gradient.
    """
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    # where() instead of multiplying by the mask: masked entries can never leak NaN or inf.
    pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    n_pos = pos.sum(dim=1).to(log_prob.dtype)
    valid = (n_pos > 0).to(log_prob.dtype)
    # Masked arithmetic instead of boolean indexing: no host sync, so the step can be graphed.
    per_anchor = pos_log_prob / n_pos.clamp(min=1.0)
    return -(per_anchor * valid).sum() / valid.sum().clamp(min=1.0)


def _check_inputs(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise InputError(
            f"z1 and z2 must both have shape (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] == 0:
        raise InputError("the batch is empty; pass at least one sample")
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != z1.shape[0]:
            raise InputError(
                f"labels must have shape ({z1.shape[0]},) to match z1; got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InputError(f"labels must be an integer tensor; got {labels.dtype}")


def _check_tau(tau: float) -> float:
    if not tau > 0:
        raise ConfigError(f"temperature tau must be > 0; got {tau!r}")
    return float(tau)


def _no_autocast(z: torch.Tensor):
    """Context that turns autocast off so the loss really runs in float32."""
    return torch.autocast(device_type=z.device.type, enabled=False)


class FIRMLoss(nn.Module):
    """FIRM loss (Lunardi et al. 2025): inliers attract each other, each outlier only its pair.

    ``mode="pairwise"`` (the paper's version): anchors ``z1``, keys ``z2``, diagonal kept.
    ``mode="concat"``: the 2N x 2N matrix of ``[z1; z2]`` without self-similarity.
    Inliers (label != ``outlier_label``) are positives of every inlier with the same class id, in
    both views (multi-class FIRM when several ids occur). Outliers are positives of their pair only.
    """

    def __init__(self, tau: float = 0.2, mode: str = "pairwise", outlier_label: int = -1) -> None:
        super().__init__()
        _check_layout(mode)
        self.tau = _check_tau(tau)
        self.mode = mode
        self.outlier_label = int(outlier_label)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_inputs(z1, z2, labels)
        with _no_autocast(z1):
            logits = similarity_logits(z1, z2, self.tau, self.mode)
            pos = positive_mask(labels.to(z1.device), self.mode, self.outlier_label)
            return contrastive_loss(logits, pos)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, mode={self.mode!r}, outlier_label={self.outlier_label}"


class NTXentLoss(nn.Module):
    """NT-Xent. ``symmetric=False``: the FIRM paper's one-directional cross-entropy of
    ``z1 @ z2.T / tau`` against the diagonal. ``symmetric=True``: standard SimCLR on the
    2N x 2N matrix (self excluded, 2N - 2 negatives per anchor). Labels are ignored.
    """

    def __init__(self, tau: float = 0.2, symmetric: bool = False) -> None:
        super().__init__()
        self.tau = _check_tau(tau)
        self.symmetric = bool(symmetric)

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_inputs(z1, z2, None)
        layout = "concat" if self.symmetric else "pairwise"
        # Unique labels: every sample is only its own pair's positive.
        ids = torch.arange(z1.shape[0], device=z1.device)
        with _no_autocast(z1):
            logits = similarity_logits(z1, z2, self.tau, layout)
            return contrastive_loss(logits, positive_mask(ids, layout))

    def extra_repr(self) -> str:
        return f"tau={self.tau}, symmetric={self.symmetric}"


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020), all anchors, L_out form, on the
    2N x 2N matrix of ``[z1; z2]`` (self excluded); positives share a label, in both views.

    Labels are used as given (-1 is just another label). Rot-SupCon: 0 = inlier, 1/2/3 = rotation.
    """

    def __init__(self, tau: float = 0.2) -> None:
        super().__init__()
        self.tau = _check_tau(tau)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_inputs(z1, z2, labels)
        with _no_autocast(z1):
            logits = similarity_logits(z1, z2, self.tau, "concat")
            return contrastive_loss(logits, positive_mask(labels.to(z1.device), "concat"))

    def extra_repr(self) -> str:
        return f"tau={self.tau}"

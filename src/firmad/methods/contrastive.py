"""Contrastive methods: a projection head on the encoder, two views per sample."""

from __future__ import annotations

import torch
from torch import nn

from firmad.losses import FIRMLoss, NTXentLoss, SupConLoss
from firmad.methods.base import Method
from firmad.models.heads import HeadSettings, build_head


class _Contrastive(Method):
    """Two views per sample, a projection head of the given settings, a contrastive loss."""

    n_views = 2

    def __init__(self, loss: nn.Module, head: HeadSettings) -> None:
        self.head, self._loss = head, loss

    def build_modules(self, feature_dim: int) -> dict[str, nn.Module]:
        h = self.head
        return {"head": build_head(feature_dim, h.hidden, h.out_dim, h.depth)}

    def embed(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return model.head(feats).float()

    def embedding_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z1, z2 = z.chunk(2)  # views 1 and 2 of the same samples, in the same order
        return self._loss(z1, z2, labels)


class FIRM(_Contrastive):
    """FIRM: all inliers are positives of each other, each outlier only of its own view."""

    name = "firm"

    def __init__(
        self, tau: float = 0.2, mode: str = "pairwise", head: HeadSettings = HeadSettings()
    ) -> None:
        super().__init__(FIRMLoss(tau=tau, mode=mode), head)


class NTXent(_Contrastive):
    """SimCLR's NT-Xent (the paper's one-directional form unless ``symmetric``)."""

    name = "ntxent"

    def __init__(
        self, tau: float = 0.2, symmetric: bool = False, head: HeadSettings = HeadSettings()
    ) -> None:
        super().__init__(NTXentLoss(tau=tau, symmetric=symmetric), head)


class RotSupCon(_Contrastive):
    """SupCon with labels 0 = inlier, 1..K = each outlier kind its own class."""

    name = "rotsupcon"
    requires_outliers = True

    def __init__(self, tau: float = 0.2, head: HeadSettings = HeadSettings()) -> None:
        super().__init__(SupConLoss(tau=tau), head)

    def labels(self, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        return kind_ids


class SupConBinary(RotSupCon):
    """SupCon with two classes: inliers vs every outlier."""

    name = "supcon-binary"

    def labels(self, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        return (kind_ids > 0).long()

"""Contrastive methods: a projection head on the encoder, two views per sample."""

from __future__ import annotations

import torch
from torch import nn

from firmad.losses import FIRMLoss, NTXentLoss, SupConLoss
from firmad.methods.base import Method
from firmad.models import build_head


class _Contrastive(Method):
    n_views = 2

    def build_modules(self, feature_dim: int) -> dict[str, nn.Module]:
        m = self.cfg.model
        return {"head": build_head(feature_dim, m.head_hidden, m.head_out, m.head_depth)}

    def make_loss(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return model.head(feats).float()

    def embedding_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "_loss"):
            self._loss = self.make_loss()
        z1, z2 = z.chunk(2)  # views 1 and 2 of the same samples, in the same order
        return self._loss(z1, z2, labels)


class FIRM(_Contrastive):
    """FIRM: all inliers are positives of each other, each outlier only of its own view."""

    name = "firm"

    def make_loss(self) -> nn.Module:
        return FIRMLoss(tau=self.cfg.method.tau, mode=self.cfg.method.loss_mode)


class NTXent(_Contrastive):
    """SimCLR's NT-Xent (the paper's one-directional form unless ``method.symmetric``)."""

    name = "ntxent"

    def make_loss(self) -> nn.Module:
        return NTXentLoss(tau=self.cfg.method.tau, symmetric=self.cfg.method.symmetric)


class RotSupCon(_Contrastive):
    """SupCon with labels 0 = inlier, 1..K = each outlier kind its own class."""

    name = "rotsupcon"

    def make_loss(self) -> nn.Module:
        return SupConLoss(tau=self.cfg.method.tau)

    def labels(self, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        return kind_ids


class SupConBinary(RotSupCon):
    """SupCon with two classes: inliers vs every outlier."""

    name = "supcon-binary"

    def labels(self, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        return (kind_ids > 0).long()

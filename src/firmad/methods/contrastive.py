"""Contrastive methods: a projection head on the encoder, two views per sample."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from firmad.losses import FIRMLoss, NTXentLoss, SupConLoss
from firmad.methods.base import Method, MethodSettings
from firmad.models.heads import HeadSettings, build_head


class TemperatureSettings(MethodSettings):
    tau: float = Field(0.2, gt=0)  # the contrastive temperature (the paper's 0.2)


class _Contrastive(Method):
    """Two views per sample, a projection head of the given settings, a contrastive loss."""

    n_views = 2
    Settings = TemperatureSettings

    def __init__(
        self, settings: MethodSettings | None = None, /, head: HeadSettings = HeadSettings(),
        **values: Any,
    ) -> None:  # fmt: skip
        super().__init__(settings, **values)
        self.head = head
        self._loss = self.make_loss()

    @classmethod
    def create(cls, settings: MethodSettings, head: HeadSettings | None = None) -> Method:
        return cls(settings, head=head or HeadSettings())

    def make_loss(self) -> nn.Module:
        """The objective, from ``self.settings``."""
        raise NotImplementedError

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

    class Settings(TemperatureSettings):
        # pairwise: the paper's code; concat: the 2N x 2N form
        loss_mode: Literal["pairwise", "concat"] = "pairwise"

    def make_loss(self) -> nn.Module:
        return FIRMLoss(tau=self.settings.tau, mode=self.settings.loss_mode)


class NTXent(_Contrastive):
    """SimCLR's NT-Xent (the paper's one-directional form unless ``symmetric``)."""

    name = "ntxent"

    class Settings(TemperatureSettings):
        symmetric: bool = False  # true: SimCLR's symmetric form

    def make_loss(self) -> nn.Module:
        return NTXentLoss(tau=self.settings.tau, symmetric=self.settings.symmetric)


class RotSupCon(_Contrastive):
    """SupCon with labels 0 = inlier, 1..K = each outlier kind its own class."""

    name = "rotsupcon"
    requires_outliers = True

    def make_loss(self) -> nn.Module:
        return SupConLoss(tau=self.settings.tau)

    def labels(self, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        return kind_ids


class SupConBinary(RotSupCon):
    """SupCon with two classes: inliers vs every outlier."""

    name = "supcon-binary"

    def labels(self, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        return (kind_ids > 0).long()

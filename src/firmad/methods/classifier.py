"""A binary classifier: normal images vs synthetic outliers; its logit is the anomaly score."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from firmad.methods.base import Method


class BinaryClassifier(Method):
    name = "binary"
    requires_outliers = True
    own_scorer = "logit"

    def build_modules(self, feature_dim: int) -> dict[str, nn.Module]:
        return {"classifier": nn.Linear(feature_dim, 1)}

    def labels(self, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        return (kind_ids > 0).long()  # 1 = outlier, so the logit scores "anomalous"

    def embed(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return self.score_features(model, feats).float()

    def embedding_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(z, labels.float())

    def own_scorer_params(self, model: nn.Module) -> dict:
        layer = model.classifier
        return {"weight": layer.weight.detach().cpu()[0], "bias": layer.bias.detach().cpu()[0]}

    def score_features(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return model.classifier(feats.to(model.classifier.weight.dtype)).squeeze(1)

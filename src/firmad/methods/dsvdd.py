"""Deep SVDD (Ruff et al. 2018): pull the normals' features towards a fixed centre."""

from __future__ import annotations

import torch
from torch import nn

from firmad.methods.base import Method


class DeepSVDD(Method):
    name = "dsvdd"
    uses_outliers = False
    own_scorer = "svdd"

    def embed(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return self.score_features(model, feats.float())

    def embedding_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return z.mean()

    @torch.no_grad()
    def on_train_start(self, model: nn.Module, normals_float: torch.Tensor, eps: float = 0.1):
        """c = mean feature of the normals at initialisation, kept away from zero."""
        was_training = model.training
        model.eval()
        feats = torch.cat([model.encoder(x).float() for x in normals_float.split(512)])
        c = feats.mean(0)
        c = torch.where(c.abs() < eps, torch.where(c < 0, -eps, eps), c)
        model.centre.copy_(c)
        model.train(was_training)

    def own_scorer_params(self, model: nn.Module) -> dict:
        return {"c": model.centre.detach().cpu()}

    def score_features(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return (feats - model.centre.to(feats.dtype)).pow(2).sum(1)

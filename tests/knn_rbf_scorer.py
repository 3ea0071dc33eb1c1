"""A scorer in a module of its own, as a contributor would add one (tests/test_registries.py):
two parameters, and its one registry line, the decorator. It imports the scorer base and the
registry only, so importing it first, or from `firmad.scoring`, makes no import cycle."""

from __future__ import annotations

import math

import torch

from firmad.errors import ConfigError
from firmad.scoring.base import Scorer, as_features, l2_normalise
from firmad.scoring.specs import register_scorer


@register_scorer
class KnnRbfScorer(Scorer):
    """Minus the mean RBF kernel exp(-d² / bw) between the L2-normalised features and their
    ``k`` nearest normalised bank features."""

    name = "knn_rbf"
    fitted = ("bank_",)
    label_keys = ("k",)

    def __init__(self, k: int = 3, bw: float = 1.0) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"{self.name}: k must be >= 1, got {k}")
        if not (math.isfinite(bw) and bw > 0):
            raise ConfigError(f"{self.name}: bw must be a finite number > 0, got {bw}")
        self.k, self.bw = int(k), float(bw)

    def fit(self, bank) -> KnnRbfScorer:
        self.bank_ = l2_normalise(as_features(bank, "bank features").detach().double())
        return self

    def forward(self, features) -> torch.Tensor:
        d2 = torch.cdist(l2_normalise(self.prepare(features)), self.bank_).pow(2)
        nearest = d2.topk(self.k, dim=1, largest=False).values
        return -torch.exp(-nearest / self.bw).mean(1)

    def explain_scale(self, n_bank) -> str:
        return (
            f"minus the mean RBF kernel (bandwidth {self.bw:g}) to the {self.k} nearest of "
            f"{n_bank} normal training features: -1 is identical to them, 0 far from all."
        )

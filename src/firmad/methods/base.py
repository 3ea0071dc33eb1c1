"""What every method provides to the trainer and to the evaluation."""

from __future__ import annotations

import inspect

import torch
from torch import nn


class Method:
    """One training objective. Subclasses set the class attributes and override what differs;
    their settings are the keyword arguments of ``__init__`` (see :meth:`parameters`).

    - ``uses_outliers``: the pool holds the run's synthetic (or real) outliers next to the
      normals (Deep SVDD trains on normals only, whatever ``outliers`` says).
    - ``requires_outliers``: the objective is meaningless without outliers, so the config
      refuses a run of it without any outlier kind (instead of silently training without).
    - ``n_views``: augmented views per sample in a step (2 for contrastive objectives).
    - ``own_scorer``: name of the method's own anomaly score (``None`` if it has none); the
      score itself is :meth:`score_features`.
    """

    name = "method"
    uses_outliers = True
    requires_outliers = False
    n_views = 1
    own_scorer: str | None = None

    def __init__(self) -> None:
        """A method without settings; subclasses with settings take them as keywords."""

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        """The settings the method is built from: its constructor's keyword arguments."""
        params = inspect.signature(cls.__init__).parameters
        return tuple(p for p in params if p != "self")

    def build_modules(self, feature_dim: int) -> dict[str, nn.Module]:
        """Modules trained on top of the encoder, by attribute name (``head``, ``classifier``)."""
        return {}

    def labels(self, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        """The labels the objective sees (inliers >= 0 (class id), outliers -1)."""
        return class_ids

    def embed(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """What the objective needs of each view row, float32 with the rows of ``feats``
        (``n_views * B`` rows, view-major). The training forward (the module that
        DistributedDataParallel wraps) is encoder -> ``embed``; several processes gather these
        rows into the global batch before :meth:`embedding_loss`."""
        return feats.float()

    def embedding_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the whole batch from its embeddings (``n_views * B`` rows) and labels (B)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_loss(self.embed(model, feats), labels)

    def on_train_start(self, model: nn.Module, normals_float: torch.Tensor) -> None:
        """Called once before the first step of a new run (not on resume)."""

    def own_scorer_params(self, model: nn.Module) -> dict:
        """Parameters of the `own_scorer` scorer that carry the trained modules' values."""
        return {}

    def score_features(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """The method's own anomaly score of encoder features (higher = more anomalous)."""
        raise NotImplementedError(f"method {self.name!r} has no score of its own")

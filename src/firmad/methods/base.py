"""What every method provides to the trainer and to the evaluation, and its settings."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import create_model, model_serializer
from torch import nn

from firmad.validation import Section, validate_as


class MethodSettings(Section):
    """A method's own settings (the ``method:`` section of a recipe besides ``name``).

    A method declares a subclass with its fields and their defaults as ``Settings``; the
    recipe's section is that model plus ``name`` (see :meth:`Method.config_model`), so a key
    the method does not take is refused with the method's own keys listed."""

    @model_serializer(mode="wrap")
    def _name_first(self, handler) -> dict[str, Any]:
        data = handler(self)  # `name` is added last by config_model; config files show it first
        return {"name": data.pop("name"), **data} if "name" in data else data


class Method:
    """One training objective. Subclasses set the class attributes, declare their settings as
    a nested ``Settings`` model (`MethodSettings`) and override what differs. Build one with
    its settings as keywords (``FIRM(tau=0.5)``, checked by ``Settings``) or with a settings
    object (``FIRM(cfg.method)``); they are ``self.settings``.

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
    Settings: ClassVar[type[MethodSettings]] = MethodSettings  # no settings
    Config: ClassVar[type[MethodSettings]]  # Settings + name: the recipe's section

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.Config = _config_model(cls)

    def __init__(self, settings: MethodSettings | None = None, /, **values: Any) -> None:
        if settings is None:
            settings = validate_as(self.Settings, values, f"method ({self.name})")
        elif values:
            raise TypeError(f"{self.name}: give a settings object or keywords, not both")
        self.settings = settings

    @classmethod
    def config_model(cls) -> type[MethodSettings]:
        """The model of this method's recipe section: its ``Settings`` and ``name``."""
        return cls.Config

    @classmethod
    def setting_keys(cls) -> tuple[str, ...]:
        """The keys of the method's section besides ``name``."""
        return tuple(cls.Settings.model_fields)

    @classmethod
    def create(cls, settings: MethodSettings, head: Any = None) -> Method:
        """The method from its recipe section; ``head`` (the model section's head sizes) is
        for methods that train a projection head."""
        return cls(settings)

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


def _config_model(cls: type[Method]) -> type[MethodSettings]:
    """``cls.Settings`` with ``name`` fixed to ``cls.name``, importable as ``cls.Config`` (so a
    config pickles: spawned workers rebuild it by name)."""
    model = create_model(
        f"{cls.__name__}Config",
        __base__=cls.Settings,
        __module__=cls.__module__,
        name=(Literal[cls.name], cls.name),  # type: ignore[valid-type]
    )
    model.__qualname__ = f"{cls.__qualname__}.Config"
    return model


Method.Config = _config_model(Method)

"""The parameters of `OneClassDetector`, typed: one model checks them all before any work (and
those stored in a detector folder when it is loaded); a wrong value is a ConfigError naming it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from firmad.errors import ConfigError
from firmad.scoring import VARIANTS
from firmad.validation import Int, Section, validate_as

Variant = Literal[VARIANTS]  # type: ignore[valid-type]


class DetectorParams(Section):
    """What each parameter means and may be (the estimator stores them as given)."""

    # a shipped recipe name or a YAML path (None: fmnist-cpu, FIRM with a narrow ResNet-10)
    recipe: str | None = None
    # shortcuts for method.name, model.backbone, train.epochs, train.seed (which also draws the
    # held-out images), data.size, train.device; None keeps the recipe's value
    method: str | None = None
    backbone: str | None = None
    epochs: Int | None = Field(None, ge=1)
    scorer: str = "knn_cos"  # knn_cos, kde, mahalanobis, ... or "knn_cos:k=1"; "own": the method's
    k: Int | None = Field(5, ge=1)  # the kNN scorers' neighbours, unless the scorer spec sets k
    variant: Variant = "plain"  # plain, angled (4 rotations) or ensemble (random crops too)
    seed: Int | None = Field(None, ge=0)
    size: Int | None = Field(None, ge=1)
    device: str | None = None
    overrides: list[str] | tuple[str, ...] = ()  # more section.key=value settings, as --set
    bank_size: Int | None = Field(None, ge=1)  # a seeded subset of the training images as bank
    verbose: bool | None = None  # progress while fitting; None: in a terminal or a notebook
    # the share of anomalies expected among the images (PyOD's meaning)
    contamination: float = Field(0.1, gt=0, le=0.5)
    # the share of images kept out of training to set the threshold on, or "auto": max(10 %,
    # 10 / rate images), at most half; 0: on the training images' own scores (a warning says)
    holdout: Literal["auto"] | float = "auto"
    target_fpr: float | None = Field(None, gt=0, lt=1)  # the share of normals to flag
    steps: Int | None = Field(None, ge=1)  # train exactly this many steps (instead of epochs)
    unreadable: Literal["nan", "raise"] = "nan"  # a file that cannot be scored: NaN, or an error

    @field_validator("overrides", mode="before")
    @classmethod
    def _not_one_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError("must be a list of 'section.key=value' strings, not one string")
        return v

    @field_validator("holdout")
    @classmethod
    def _share(cls, v: Any) -> Any:
        if v != "auto" and not 0.0 <= v < 1.0:
            raise ValueError(f"must be 'auto' or a share in [0, 1), got {v!r}")
        return v


PARAMS = tuple(DetectorParams.model_fields)


def check_params(params: dict[str, Any]) -> DetectorParams:
    """The parameters checked: unknown names and impossible values are a ConfigError."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown}; allowed: {', '.join(PARAMS)}")
    checked = validate_as(DetectorParams, params, "")
    if checked.epochs is not None and checked.steps is not None:
        raise ConfigError("give epochs or steps, not both (steps sets the epochs)")
    return checked

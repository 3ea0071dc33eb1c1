"""Encoders (backbone + normalisation layer) and the projection head."""

from firmad.models.backbones import (
    BACKBONES,
    NORMALISATION,
    WIDTH_SCALABLE,
    Encoder,
    Normalize,
    build_backbone,
    check_width,
    normalisation_for,
    set_bn_momentum,
)
from firmad.models.complexity import complexity
from firmad.models.heads import HeadSettings, ProjectionHead, build_head

__all__ = [
    "BACKBONES",
    "WIDTH_SCALABLE",
    "NORMALISATION",
    "Encoder",
    "HeadSettings",
    "Normalize",
    "ProjectionHead",
    "build_backbone",
    "build_head",
    "check_width",
    "complexity",
    "normalisation_for",
    "set_bn_momentum",
]

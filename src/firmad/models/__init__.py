"""Encoders (backbone + normalisation layer) and the projection head."""

from firmad.models.backbones import (
    BACKBONES,
    NORMALISATION,
    Encoder,
    Normalize,
    build_backbone,
    normalisation_for,
    set_bn_momentum,
)
from firmad.models.complexity import complexity
from firmad.models.heads import ProjectionHead, build_head

__all__ = [
    "BACKBONES",
    "NORMALISATION",
    "Encoder",
    "Normalize",
    "ProjectionHead",
    "build_backbone",
    "build_head",
    "complexity",
    "normalisation_for",
    "set_bn_momentum",
]

"""Training methods as units: one module per method family, one registry by name.

A method says what it needs (synthetic outliers, how many views), turns pool labels into the
labels its objective sees, builds the modules it trains on top of the encoder, computes its loss,
and may own an anomaly score (Deep SVDD's distance, the classifier's logit). The trainer and the
evaluation only talk to this interface. Adding a method: its module, and one line in `METHODS`.
"""

from __future__ import annotations

from firmad.errors import ConfigError
from firmad.methods.base import Method
from firmad.methods.classifier import BinaryClassifier
from firmad.methods.contrastive import FIRM, NTXent, RotSupCon, SupConBinary
from firmad.methods.dsvdd import DeepSVDD

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FIRM, NTXent, RotSupCon, SupConBinary, DeepSVDD, BinaryClassifier)
}


def method_class(name: str) -> type[Method]:
    """The registered method of that name; an unknown name is a ConfigError listing them."""
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


__all__ = [
    "FIRM",
    "METHODS",
    "BinaryClassifier",
    "DeepSVDD",
    "Method",
    "NTXent",
    "RotSupCon",
    "SupConBinary",
    "method_class",
]

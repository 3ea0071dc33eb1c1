"""Training methods as units: one module per method family, one registry by name.

A method says what it needs (synthetic outliers, how many views), turns pool labels into the
labels its objective sees, builds the modules it trains on top of the encoder, computes its loss,
and may own an anomaly score (Deep SVDD's distance, the classifier's logit). The trainer and the
evaluation only talk to this interface.
"""

from firmad.methods.base import Method
from firmad.methods.classifier import BinaryClassifier
from firmad.methods.contrastive import FIRM, NTXent, RotSupCon, SupConBinary
from firmad.methods.dsvdd import DeepSVDD

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FIRM, NTXent, RotSupCon, SupConBinary, DeepSVDD, BinaryClassifier)
}


def get_method(cfg) -> Method:
    """The method of a run config (``cfg.method.name``), built with the config's settings."""
    from firmad.errors import ConfigError

    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](cfg)


__all__ = ["METHODS", "Method", "get_method"]

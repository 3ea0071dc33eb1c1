"""Training methods as units: one module per method family, one registry by name.

A method says what it needs (synthetic outliers, how many views), turns pool labels into the
labels its objective sees, builds the modules it trains on top of the encoder, computes its loss,
and may own an anomaly score (Deep SVDD's distance, the classifier's logit). Its settings are its
own pydantic model (``Settings``, with its defaults); the recipe's ``method:`` section is the
model of the method it names. The trainer and the evaluation only talk to this interface.
Adding a method, with or without settings: its module, and one line in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from firmad.errors import ConfigError
from firmad.methods.base import Method, MethodSettings
from firmad.methods.classifier import BinaryClassifier
from firmad.methods.contrastive import FIRM, NTXent, RotSupCon, SupConBinary
from firmad.methods.dsvdd import DeepSVDD
from firmad.safeyaml import shorten
from firmad.validation import validate_as

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FIRM, NTXent, RotSupCon, SupConBinary, DeepSVDD, BinaryClassifier)
}
DEFAULT_METHOD = FIRM.name  # a method section without a name


def method_class(name: Any) -> type[Method]:
    """The registered method of that name; an unknown name is a ConfigError listing them."""
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(
            f"method.name: unknown method {shorten(name)}; choose from {', '.join(METHODS)}"
        )
    return METHODS[name]


def method_section(data: Mapping[str, Any] | MethodSettings | None = None) -> MethodSettings:
    """A recipe's ``method:`` section as the settings model of the method it names (the
    default method when it names none): a key that method does not take is a ConfigError
    listing its keys. A settings object is returned as it is."""
    if isinstance(data, MethodSettings):
        if "name" not in type(data).model_fields:
            raise ConfigError(
                "method: a settings object without the method's name; give a mapping, or the "
                "method's Config, e.g. METHODS['firm'].Config(tau=0.5)"
            )
        method_class(data.name)
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"method: expected a mapping of keys, got {shorten(data)}")
    cls = method_class(data.get("name", DEFAULT_METHOD))
    keys = ("name", *cls.setting_keys())
    unknown = [key for key in data if key not in keys]
    if unknown:
        raise ConfigError(
            f"method: {cls.name} does not take {shorten(unknown)}; the keys of method "
            f"{cls.name} are {', '.join(keys)}"
        )
    return validate_as(cls.config_model(), dict(data), "method")


def method_keys(name: str) -> tuple[str, ...]:
    """The keys of a method's section besides ``name`` (() for an unknown name)."""
    return METHODS[name].setting_keys() if name in METHODS else ()


__all__ = [
    "DEFAULT_METHOD",
    "FIRM",
    "METHODS",
    "BinaryClassifier",
    "DeepSVDD",
    "Method",
    "MethodSettings",
    "NTXent",
    "RotSupCon",
    "SupConBinary",
    "method_class",
    "method_keys",
    "method_section",
]

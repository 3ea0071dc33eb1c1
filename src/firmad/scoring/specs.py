"""Scorer specs as written in recipes and on the command line: ``"knn_cos:k=5"``.

Values are YAML scalars, read by `firmad.safeyaml` (``1e-3`` is a number, not a string).
"""

from __future__ import annotations

from typing import Any

import yaml

from firmad.errors import ConfigError
from firmad.safeyaml import parse_yaml, shorten, yaml_problem


def parse_scorer(spec: str) -> tuple[str, dict[str, Any]]:
    """'knn_cos:k=5' -> ('knn_cos', {'k': 5})."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"eval.scorers: {shorten(spec)}: parameters are written name:key=value"
            )
        try:
            params[key.strip()] = parse_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"eval.scorers: {shorten(spec)}: the value of {key.strip()} ({shorten(value)}) "
                f"is not valid YAML ({yaml_problem(err)}); write e.g. knn_cos:k=5"
            ) from None
    return name.strip(), params

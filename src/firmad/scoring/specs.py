"""Scorer specs as written in recipes and on the command line: ``"knn_cos:k=5"``.

Values are YAML scalars, read the YAML 1.2 way (``1e-3`` is a number, not a string).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from firmad.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where 1e-3 and 1.0e9 are strings; read them as numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def parse_yaml(text: str) -> Any:
    """yaml.safe_load, but 1e-3 is a number (as in YAML 1.2 and JSON)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no objects


def yaml_problem(err: yaml.YAMLError) -> str:
    """The short reason of a YAML error, without PyYAML's multi-line context."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    return str(problem or err).strip()


def parse_scorer(spec: str) -> tuple[str, dict[str, Any]]:
    """'knn_cos:k=5' -> ('knn_cos', {'k': 5})."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"eval.scorers: {spec!r}: parameters are written name:key=value")
        try:
            params[key.strip()] = parse_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"eval.scorers: {spec!r}: the value of {key.strip()} ({value!r}) is not valid "
                f"YAML ({yaml_problem(err)}); write e.g. knn_cos:k=5"
            ) from None
    return name.strip(), params

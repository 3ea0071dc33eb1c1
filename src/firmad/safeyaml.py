"""The one YAML reader of recipes, grids, run configs and ``key=value`` values.

YAML 1.2 numbers (PyYAML follows YAML 1.1, where 1e-3 is a string), and, since a recipe may
come from anywhere: no aliases (``*name`` lets a small file expand into gigabytes), no nesting
deeper than MAX_YAML_DEPTH (a RecursionError otherwise), no key given twice (YAML would keep the
last one silently). Messages echo values through `shorten`.
"""

from __future__ import annotations

import re
import typing
from typing import Any

import yaml

MAX_YAML_DEPTH = 32  # nested lists / mappings in a recipe or a --set value
MAX_SHOWN = 120  # characters of a value echoed in an error message


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    """repr(value), cut to `limit` characters: messages never echo a huge value in full."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


class SafeYamlLoader(yaml.SafeLoader):
    """A SafeLoader (no objects) reading 1e-3 as a number; refuses aliases, deep nesting and
    duplicate keys (see the module docstring)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(
                f"line {mark.line + 1}: YAML aliases (*name) are not allowed in recipes and grids; "
                "write the value out in full"
            )
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(
                    f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep; "
                    "a recipe needs only a few levels"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.YAMLError(
                    f"line {line}: key {shorten(key)} is given twice (first on line "
                    f"{seen[key]}); keep one of them"
                )
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


SafeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def parse_yaml(text: str) -> Any:
    """yaml.safe_load, but 1e-3 is a number (as in YAML 1.2 and JSON); no aliases, no
    duplicate keys, at most MAX_YAML_DEPTH levels."""
    return yaml.load(text, Loader=SafeYamlLoader)  # a SafeLoader subclass: no objects


def yaml_problem(err: yaml.YAMLError) -> str:
    """The short reason of a YAML error, without PyYAML's multi-line context."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    text = str(problem or err).strip()
    return text if len(text) <= 4 * MAX_SHOWN else text[: 4 * MAX_SHOWN] + "..."

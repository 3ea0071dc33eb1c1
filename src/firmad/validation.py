"""Validating plain data (YAML, dicts) into typed sections, with the key path in every error.

`validate_as(cls, data, path)` builds a pydantic model or a dataclass from a dict; a wrong type,
bound or key raises ConfigError naming ``path.key``, what is allowed and the value given (cut
by `shorten`), rewritten from pydantic's errors. Recipes, grids and studies are read with it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from firmad.errors import ConfigError
from firmad.safeyaml import MAX_YAML_DEPTH, shorten


def _whole_number(value: Any) -> Any:
    """1e3 is read as the float 1000.0; accept it where an integer is expected."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer that may be written in scientific notation (1e4); bools stay refused (strict mode).
Int = Annotated[int, BeforeValidator(_whole_number)]


class Section(BaseModel):
    # strict: no bool for numbers, no "3" for 3; forbid: a misspelt key is an error, not ignored.
    # allow_inf_nan=False: no setting is meant to be infinite (tau=.inf trains a constant loss).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _unwrap(tp: Any) -> Any:
    return get_args(tp)[0] if get_origin(tp) is Annotated else tp


def expected_text(tp: Any) -> str:
    """'an integer', 'a number or null', ... for an annotation."""
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(expected_text(a) for a in get_args(tp))
    if origin is list:
        return "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp is type(None):
        return "null"
    if tp in names:
        return names[tp]
    return "a mapping of keys"


def _fields(tp: Any) -> dict[str, Any] | None:
    """Field name -> FieldInfo of a pydantic model; None for other types."""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return dict(tp.model_fields)
    return None


def _locate(model: type[BaseModel], loc: tuple) -> tuple[list[str], Any, Any, int]:
    """Key path parts of a pydantic error location, the annotation and FieldInfo found there,
    and how many items of `loc` the path used.

    The walk stops at the first item that is neither a field nor a list index: pydantic adds
    the member tried for unions ('int', 'str', ...) and names unknown keys there.
    """
    parts: list[str] = []
    tp: Any = model
    info = None
    used = 0
    for item in loc:
        fields = _fields(tp)
        if isinstance(item, str) and fields is not None and item in fields:
            parts.append(item)
            info = fields[item]
            tp = info.annotation
        elif isinstance(item, int) and parts and get_origin(_unwrap(tp)) is list:
            parts[-1] += f"[{item}]"
            tp, info = get_args(_unwrap(tp))[0], None
        else:
            break
        used += 1
    return parts, tp, info, used


def _value_at(data: Any, loc: tuple, default: Any) -> Any:
    try:
        for item in loc:
            data = data[item]
    except (KeyError, IndexError, TypeError):
        return default
    return data


def _bounds(info: Any, tp: Any) -> str:
    """'>= 1', 'in (0, 1)', '>= 1 (or null)' from a field's constraints."""
    c = {
        key: getattr(item, key)
        for item in getattr(info, "metadata", [])
        for key in ("gt", "ge", "lt", "le")
        if hasattr(item, key)
    }
    if ("gt" in c or "ge" in c) and ("lt" in c or "le" in c):
        low = f"({c['gt']}" if "gt" in c else f"[{c['ge']}"
        high = f"{c['lt']})" if "lt" in c else f"{c['le']}]"
        text = f"in {low}, {high}"
    else:
        ops = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        text = next(f"{op} {c[key]}" for key, op in ops if key in c)
    if type(None) in get_args(tp):
        text += " (or null)"
    return text


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _config_error(
    err: ValidationError, model: type[BaseModel], path: str, data: dict
) -> ConfigError:
    """One readable ConfigError (a line per wrong key) from a pydantic ValidationError."""
    lines: dict[str, str] = {}  # key path -> message (a union gives several errors per key)
    unknown: dict[str, tuple[list[str], Any]] = {}
    for e in err.errors():
        parts, tp, info, used = _locate(model, e["loc"])
        where = ".".join(([path] if path else []) + parts) or "recipe"
        if e["type"] == "extra_forbidden":
            unknown.setdefault(where, ([], tp))[0].append(str(e["loc"][used]))
            continue
        # A union's errors come from the members tried: show the value the user wrote.
        value = _value_at(data, e["loc"][:used], e["input"])
        if e["type"] in ("model_type", "dataclass_type", "dict_type"):
            msg = f"expected a mapping of keys, got {shorten(value)}"
        elif e["type"] == "literal_error":
            msg = f"{shorten(value)} is not allowed; use {expected_text(tp)}"
        elif e["type"] in _BOUND_ERRORS:
            msg = f"must be {_bounds(info, tp)}, got {shorten(value)}"
        elif e["type"] == "finite_number":
            msg = f"must be a finite number, got {shorten(value)}"
        elif e["type"] == "value_error":
            msg = str(e["ctx"]["error"])
        else:
            msg = f"expected {expected_text(tp)}, got {shorten(value)}"
        lines.setdefault(where, f"{where}: {msg}")
    for where, (keys, tp) in unknown.items():
        allowed = ", ".join(_fields(tp) or [])
        lines.setdefault(where, f"{where}: unknown key(s) {shorten(keys)}; allowed keys: {allowed}")
    shown = list(lines.values())
    if len(shown) > 20:  # thousands of wrong keys: the first ones say enough
        shown = [*shown[:20], f"... and {len(shown) - 20} more"]
    return ConfigError("\n".join(shown))


@functools.cache
def _model_of(cls: type) -> type[BaseModel]:
    """A strict pydantic model with a plain dataclass's fields (for GridConfig in bench.py)."""
    hints = typing.get_type_hints(cls)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            spec[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            spec[f.name] = (hints[f.name], f.default)
    return create_model(cls.__name__, __base__=Section, **spec)


def _plain(data: Any, depth: int = 0) -> Any:
    """Tuples to lists: Python callers may pass (0.25, 1.0) where YAML gives a list."""
    if depth > 2 * MAX_YAML_DEPTH and isinstance(data, dict | list | tuple):
        raise ConfigError(f"nested more than {2 * MAX_YAML_DEPTH} levels deep; not a recipe")
    if isinstance(data, dict):
        return {k: _plain(v, depth + 1) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_plain(v, depth + 1) for v in data]
    return data


def validate_as(cls: type, data: Any, path: str) -> Any:
    """Validate a dict into `cls` (a pydantic model or a dataclass); errors name `path.key`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping of keys, got {shorten(data)}")
    model = cls if issubclass(cls, BaseModel) else _model_of(cls)
    data = _plain(data)
    try:
        built = model.model_validate(data)
    except ValidationError as err:
        raise _config_error(err, model, path, data) from None
    if model is cls:
        return built
    return cls(**{name: getattr(built, name) for name in model.model_fields})

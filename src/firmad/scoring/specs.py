"""Scorer identity: the registry of scorers by name, and `ScorerSpec`, one scorer with its
parameters, normalised by the scorer's signature.

A spec is written ``"knn_cos:k=5"`` in recipes and on the command line (values are YAML
scalars read by `firmad.safeyaml`: ``1e-3`` is a number). `ScorerSpec.of` fills the defaults,
converts each value to its parameter's type (``5`` and ``5.0`` are one value of a float
parameter), refuses unknown parameters (listing the scorer's own) and values the scorer refuses
(its constructor checks ranges, e.g. kde's ``scale`` > 0). Its canonical string, `label`, names
the scorer's results everywhere (results.json, reports, bench.csv, grid headlines): two specs
that differ in any parameter have different labels, and equal specs have the same one.

A scorer joins the registry with the `register_scorer` decorator when its module is imported
(`firmad.scoring` imports the built-in ones); this module imports no scorer, so a scorer in a
module of its own makes no import cycle.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError, create_model

from firmad.errors import ConfigError
from firmad.safeyaml import parse_yaml, shorten, yaml_problem
from firmad.validation import Int, Section, expected_text

# name -> scorer class (a `firmad.scoring.base.Scorer`), filled by `register_scorer`
SCORERS: dict[str, type] = {}


def register_scorer(cls: type) -> type:
    """Class decorator: the scorer joins `SCORERS` under its ``name``."""
    other = SCORERS.get(cls.name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"two scorers are named {cls.name!r}: {other} and {cls}")
    SCORERS[cls.name] = cls
    return cls


def scorer_class(name: Any) -> type:
    """The registered scorer of that name; an unknown name is a ConfigError listing them."""
    if not isinstance(name, str) or name not in SCORERS:
        raise ConfigError(f"unknown scorer {shorten(name)}; choose from {', '.join(SCORERS)}")
    return SCORERS[name]


def scorer_signature(cls: type) -> dict[str, inspect.Parameter]:
    """The constructor's settings: its keyword parameters, less those carrying data."""
    params = inspect.signature(cls.__init__).parameters
    data = set(getattr(cls, "data_params", ()))
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in params.items() if n != "self" and p.kind in kinds and n not in data}


def scorer_parameters(name: str) -> tuple[str, ...]:
    """The parameters of a registered scorer (() for an unknown name)."""
    return tuple(scorer_signature(SCORERS[name])) if name in SCORERS else ()


@functools.cache
def _params_model(cls: type) -> type[Section]:
    """A strict pydantic model of the constructor's settings (types from the annotations, or
    from the defaults' types where there are none; no NaN or infinity)."""
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    fields: dict[str, Any] = {}
    for name, p in scorer_signature(cls).items():
        default = p.default if p.default is not inspect.Parameter.empty else ...
        tp = hints.get(name, Any if default in (..., None) else type(default))
        fields[name] = (Int if tp is int else tp, default)
    return create_model(f"{cls.__name__}Params", __base__=Section, **fields)


def _type_error(err: ValidationError, model: type[Section], params: Mapping[str, Any]) -> str:
    e = err.errors()[0]
    key = str(e["loc"][0]) if e["loc"] else "?"
    value = params.get(key, e.get("input"))
    if e["type"] == "missing":
        return f"{key} is required"
    if e["type"] == "finite_number":
        return f"{key} must be a finite number, got {shorten(value)}"
    field = model.model_fields.get(key)
    expected = expected_text(field.annotation) if field is not None else "another value"
    return f"{key} expects {expected}, got {shorten(value)}"


def normalise(name: Any, params: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
    """A scorer's parameters checked and normalised: every parameter in signature order, the
    defaults filled, each value of its parameter's type. ConfigError when the name, a key or a
    value is refused (the scorer's constructor checks the ranges)."""
    cls = scorer_class(name)
    params = dict(params or {})
    allowed = scorer_signature(cls)
    unknown = [key for key in params if key not in allowed]
    if unknown:
        hint = f"allowed: {', '.join(allowed)}" if allowed else f"{name} takes no parameters"
        raise ConfigError(f"unknown parameter {shorten(unknown[0])}; {hint}")
    model = _params_model(cls)
    try:
        values = model.model_validate(params).model_dump()
    except ValidationError as err:
        raise ConfigError(_type_error(err, model, params)) from None
    try:
        cls(**values)  # the scorer's own range checks (k >= 1, scale > 0, ...)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    return tuple((key, values[key]) for key in allowed)


def _text(value: Any) -> str:
    """A value as a spec writes it, read back to the same value by `parse_scorer`."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))  # 5.0 -> "5": read back as 5, a float parameter's 5.0
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    try:
        same = not any(c in text for c in ",:=") and parse_yaml(text) == value
    except yaml.YAMLError:
        same = False
    return text if same else json.dumps(text)


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer and its parameters, normalised (build one with `parse` or `of`).

    ``params`` holds every parameter in the order of the scorer's signature, defaults
    included, so two specs are equal exactly when they build the same scorer. ``label`` is the
    canonical string: the name, then the parameters that the scorer always shows
    (``label_keys``, e.g. kNN's k) or that differ from their defaults, e.g. ``knn_cos:k=5``,
    ``kde:scale=5``, ``centre``. `parse` reads a label back to the same spec."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, params: Mapping[str, Any] | None = None) -> ScorerSpec:
        """The normalised spec of a registered scorer; ConfigError for what it refuses."""
        try:
            return cls(name, normalise(name, params))
        except ConfigError as err:
            raise ConfigError(f"scorer {_written(name, params)}: {err}") from None

    @classmethod
    def parse(cls, text: str) -> ScorerSpec:
        """``"knn_cos:k=5"`` -> its normalised spec; ConfigError naming the text."""
        name, params = parse_scorer(text)
        try:
            return cls(name, normalise(name, params))
        except ConfigError as err:
            raise ConfigError(f"scorer {shorten(text)}: {err}") from None

    @classmethod
    def coerce(cls, spec: ScorerSpec | str | tuple[str, Mapping[str, Any] | None]) -> ScorerSpec:
        """A spec from a spec, its text or a ``(name, params)`` pair."""
        if isinstance(spec, ScorerSpec):
            return spec
        if isinstance(spec, str):
            return cls.parse(spec)
        name, params = spec
        return cls.of(name, params)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ScorerSpec:
        """The spec of a result row (``scorer`` and ``params``; rows written before params
        existed have only ``k``). A scorer no longer registered, or parameters it would now
        refuse, give the spec as written, so old results still get a label."""
        name = row.get("scorer")
        params = row.get("params")
        if not isinstance(params, Mapping):
            params = {"k": row["k"]} if row.get("k") is not None else {}
        try:
            return cls(name, normalise(name, params))
        except ConfigError:
            return cls(str(name), tuple(params.items()))

    @property
    def kwargs(self) -> dict[str, Any]:
        """The parameters as keyword arguments of the scorer."""
        return dict(self.params)

    @property
    def label(self) -> str:
        cls = SCORERS.get(self.name)
        shown = self.params
        if cls is not None:
            sig, always = scorer_signature(cls), set(getattr(cls, "label_keys", ()))
            shown = tuple(
                (k, v) for k, v in self.params if k in always or k not in sig or v != sig[k].default
            )
        if not shown:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={_text(v)}" for k, v in shown)

    def replace(self, **params: Any) -> ScorerSpec:
        """This spec with some parameters changed (normalised again)."""
        return ScorerSpec.of(self.name, {**self.kwargs, **params})

    def __str__(self) -> str:
        return self.label


def _written(name: Any, params: Mapping[str, Any] | None) -> str:
    items = ",".join(f"{k}={v}" for k, v in (params or {}).items())
    return shorten(f"{name}:{items}" if items else str(name))


def spec_label(name: str, params: Mapping[str, Any] | None = None) -> str:
    """The canonical label of a scorer and its parameters (as `ScorerSpec.from_row`)."""
    return ScorerSpec.from_row({"scorer": name, "params": dict(params or {})}).label


def parse_scorer(spec: str) -> tuple[str, dict[str, Any]]:
    """'knn_cos:k=5' -> ('knn_cos', {'k': 5}), as written (`ScorerSpec.parse` normalises)."""
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

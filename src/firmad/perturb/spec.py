"""The settings of one attack (`AttackSpec`), of a robust-AUROC sweep (`SweepSpec`), and the
named presets of an audit (`PRESETS`, `preset_settings`).

This is the one place where attack settings are checked and where their defaults live: the
attacks, the sweep, the audit, the CLI and the ``attack`` recipe section all build these specs
instead of checking loose arguments again. Each spec is frozen and validated when it is built.

The field defaults are the textbook attack (fixed-step PGD-100, one restart). An audit starts
from a preset instead: ``quick`` (minutes on a CPU) or ``full`` (the strongest mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from firmad.errors import ConfigError

__all__ = [
    "ATTACKS",
    "AUDIT_DEFAULTS",
    "NORMS",
    "PRESETS",
    "SCHEDULES",
    "TARGETS",
    "AttackSpec",
    "SweepSpec",
    "check_int",
    "check_subset",
    "default_eps",
    "default_step",
    "eps_text",
    "preset_settings",
]

NORMS = ("linf", "l2")
TARGETS = ("both", "normal", "anomaly")
SCHEDULES = ("fixed", "apgd")
# pgd: one walk per gradient source; ensemble: pgd plus the CE-style member
# (robustness.gradient, robustness.targets);
# square: the score-based black-box Square attack.
ATTACKS = ("pgd", "ensemble", "square")


def check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def check_norm(norm) -> str:
    """The norm's name in lower case; a ConfigError unless it is one of NORMS."""
    norm = str(norm).lower()
    if norm not in NORMS:
        raise ConfigError(f"norm must be linf or l2, got {norm!r}.")
    return norm


def check_subset(n) -> int | None:
    """A subset size: None (every image) or an integer >= 2 (AUROC needs two images)."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"subset size must be a positive integer or None, got {n!r}.")
    if n == 1:
        raise ConfigError("subset 1: AUROC needs a normal and an anomalous image; use >= 2")
    return n


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float)


def _positive(v) -> bool:
    return _is_number(v) and v > 0 and math.isfinite(v)


def default_step(eps: float, steps: int, schedule: str = "fixed") -> float:
    """The default step: 2.5·ε/steps for the fixed schedule, APGD's first η = 2·ε."""
    return 2.0 * eps if schedule == "apgd" else 2.5 * eps / steps


def eps_text(eps: float, norm: str) -> str:
    """A radius as the CLI takes it: L∞ in 1/255 units ("8/255"), L2 as a plain number."""
    if norm == "linf":
        k = eps * 255
        return f"{int(round(k))}/255" if abs(k - round(k)) < 1e-6 else f"{k:.4g}/255"
    return f"{eps:.4g}"


@dataclass(frozen=True)
class AttackSpec:
    """One attack's settings (see ``robustness.gradient.pgd`` for their meaning); ``norm`` is stored
    lower case. ``steps`` is the number of queries for the Square attack."""

    eps: float
    norm: str = "linf"
    steps: int = 100
    step_size: float | None = None
    restarts: int = 1
    targets: str = "both"
    eot: int = 1
    random_start: bool = True
    seed: int = 0
    batch_size: int | None = None
    schedule: str = "fixed"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be fixed or apgd, got {self.schedule!r}.")
        object.__setattr__(self, "norm", check_norm(self.norm))
        eps = self.eps
        if not _is_number(eps) or not math.isfinite(eps):
            raise ConfigError(
                f"eps must be a finite number >= 0 (pixel space [0, 1]), got {eps!r}."
            )
        if eps < 0:
            raise ConfigError(f"eps must be >= 0 (pixel space [0, 1]), got {eps}.")
        for name in ("steps", "restarts", "eot"):
            check_int(name, getattr(self, name))
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size)
        s = self.step_size
        if s is not None and not _positive(s):
            raise ConfigError(f"step_size must be a positive number or None, got {s!r}.")
        if self.targets not in TARGETS:
            raise ConfigError(f"targets must be one of {TARGETS}, got {self.targets!r}.")
        if self.restarts > 1 and not self.random_start:
            raise ConfigError(
                "restarts > 1 repeat the same attack without a random start; "
                "set random_start=True or restarts=1."
            )

    @property
    def alpha(self) -> float:
        """The step size used: ``step_size`` or the schedule's default."""
        if self.step_size is not None:
            return float(self.step_size)
        return default_step(self.eps, self.steps, self.schedule)


@dataclass(frozen=True)
class SweepSpec:
    """The settings of a robust-AUROC sweep, validated once.

    eps_list: radii in [0, 1] pixel space, 0 gives the clean AUROC (stored sorted, unique,
        as floats; L∞ radii at most 1). norm, steps, restarts, eot, random_start, batch_size,
        surrogates: as in ``attack_detector``; step size = ``step_factor``·ε/steps.
    schedule: ``"fixed"`` steps, or ``"apgd"`` (first step 2·ε, halved where progress
        stalls; ``step_factor`` is then unused).
    targets_list: rows to report among "normal", "anomaly", "both" (stored without repeats).
    seed: seeds the attacks, the subset and the bootstrap.
    subset: evaluate on a stratified seeded subset of this size (None = all images).
    n_bootstrap: bootstrap resamples for the 95 % intervals.
    checks: run the strength checks (they cost about four more attacks).
    check_eps: ε of the steps/restarts/transfer checks; default the median non-zero ε.
    large_eps: ε of the masking check; default 1.0 (L∞) or √d (L2).
    attack: ``"pgd"`` (gradient attacks, ``schedule`` picks PGD or APGD), ``"ensemble"`` (the
        same plus the CE-style member: per image the worst over every gradient source and
        restart) or ``"square"`` (the score-based black-box Square attack, L∞; ``steps`` is
        then its number of queries and surrogates are unused).
    square_check: with the checks, also run the Square attack (``steps`` queries, at least
        1000) at ``check_eps``: it must not beat the attack by more than 1 point.
    """

    eps_list: Sequence[float]
    norm: str = "linf"
    steps: int = 100
    restarts: int = 1
    targets_list: Sequence[str] = ("normal", "anomaly", "both")
    step_factor: float = 2.5
    schedule: str = "fixed"
    eot: int = 1
    random_start: bool = True
    seed: int = 0
    batch_size: int | None = None
    surrogates: bool | Mapping = True
    subset: int | None = None
    n_bootstrap: int = 1000
    checks: bool = True
    check_eps: float | None = None
    large_eps: float | None = None
    attack: str = "pgd"
    square_check: bool = False

    def __post_init__(self) -> None:
        norm, eps, modes = self._sweep_lists()
        setattr_ = object.__setattr__
        setattr_(self, "norm", norm)
        setattr_(self, "eps_list", eps)
        setattr_(self, "targets_list", modes)
        _ = self.base  # the attack settings are checked as an AttackSpec
        if self.attack not in ATTACKS:
            raise ConfigError(f"attack must be one of {ATTACKS}, got {self.attack!r}.")
        if self.attack == "square" and norm != "linf":
            raise ConfigError("the Square attack is implemented for norm='linf' only.")
        check_subset(self.subset)
        for name in ("step_factor", "check_eps", "large_eps"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise ConfigError(f"{name} must be a positive number, got {value!r}.")

    def _sweep_lists(self) -> tuple[str, list[float], list[str]]:
        norm, eps_list, targets_list = check_norm(self.norm), self.eps_list, self.targets_list
        if isinstance(eps_list, str) or not isinstance(eps_list, Sequence) or not eps_list:
            raise ConfigError("eps_list must be a non-empty list of radii in [0, 1] pixel space.")
        for e in eps_list:
            if not _is_number(e) or not math.isfinite(e) or e < 0:
                raise ConfigError(f"every eps must be a finite number >= 0, got {e!r}.")
            if norm == "linf" and e > 1:
                raise ConfigError(
                    f"L∞ radius {e:.4g} is larger than the whole [0, 1] pixel range: radii are "
                    "in pixel space (8/255 = 0.0314); in 1/255 units (the CLI's) at most 255"
                )
        if isinstance(targets_list, str):
            targets_list = (targets_list,)
        bad = [t for t in targets_list if t not in TARGETS]
        if bad or not targets_list:
            raise ConfigError(
                f"targets must be some of normal, anomaly, both; got {list(targets_list)}."
            )
        n = self.n_bootstrap
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n_bootstrap must be a positive integer, got {n!r}.")
        return norm, sorted({float(e) for e in eps_list}), list(dict.fromkeys(targets_list))

    @property
    def base(self) -> AttackSpec:
        """The attack settings shared by every attack of the sweep (ε = 0, both groups)."""
        return AttackSpec(
            0.0, self.norm, self.steps, None, self.restarts, "both", self.eot,
            self.random_start, self.seed, self.batch_size, self.schedule,
        )  # fmt: skip

    def attack_at(self, eps: float, targets: str, **override) -> AttackSpec:
        """The spec of one attack of the sweep at ``eps``; ``override`` changes steps,
        restarts or random_start (the convergence checks)."""
        spec = replace(self.base, eps=eps, targets=targets, **override)
        if eps > 0 and spec.schedule == "fixed":
            spec = replace(spec, step_size=self.step_factor * eps / spec.steps)
        return spec

    @property
    def attack_targets(self) -> str:
        """One attack per ε serves every mode: both groups unless only one mode is asked for."""
        modes = self.targets_list
        both_needed = "both" in modes or {"normal", "anomaly"} <= set(modes)
        return "both" if both_needed else modes[0]

    @property
    def nonzero(self) -> list[float]:
        return [e for e in self.eps_list if e > 0]

    @property
    def check_at(self) -> float | None:
        """``check_eps`` or its default, the median non-zero ε (None when there is none)."""
        if self.check_eps is None and self.nonzero:
            return float(self.nonzero[(len(self.nonzero) - 1) // 2])
        return self.check_eps

    def large_at(self, dims: int) -> float:
        """``large_eps`` or its default for images of ``dims`` values."""
        if self.large_eps is not None:
            return self.large_eps
        return 1.0 if self.norm == "linf" else math.sqrt(dims)


# --------------------------------------------------------------------------- audit presets

# What every audit starts from (`firmad attack`, the ``attack`` recipe section); eps None = the
# norm's default radii (`default_eps`).
AUDIT_DEFAULTS: dict[str, Any] = {
    "norm": "linf",
    "eps_list": None,
    "targets_list": ("normal", "anomaly", "both"),
    "seed": 0,
    "batch_size": 256,
    "checks": True,
    "check_eps": None,
    "input_space": "model",
}

# quick: minutes on a 2-core CPU; full: the strongest mode (hours on a CPU). Both attack with
# APGD's schedule and the targeted members (the pixel-space target and the targeted start):
# without them the large-ε check fails on defended detectors (benchmarks/RESULTS.md).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "steps": 10, "restarts": 1, "subset": 200, "schedule": "apgd", "attack": "pgd",
        "targeted": True, "square_check": False,
    },
    "full": {
        "steps": 100, "restarts": 2, "subset": 1000, "schedule": "apgd", "attack": "ensemble",
        "targeted": True, "square_check": True,
    },
}  # fmt: skip

_DEFAULT_EPS = {"linf": (0.0, 2 / 255, 4 / 255, 8 / 255), "l2": (0.0, 0.25, 0.5, 1.0)}


def default_eps(norm: str) -> list[float]:
    """The radii an audit attacks at when none are given: L∞ 0, 2, 4, 8 /255; L2 0-1."""
    return list(_DEFAULT_EPS[check_norm(norm)])


def preset_settings(preset: str = "quick", **given) -> dict[str, Any]:
    """The settings of an audit: ``AUDIT_DEFAULTS``, then the preset's, then ``given`` (a value
    of None takes the preset's). The Square check is one of the strength checks: off without
    them."""
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}.")
    out = {**AUDIT_DEFAULTS, **PRESETS[preset]}
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ConfigError(f"unknown audit setting(s) {unknown}; known: {sorted(out)}.")
    out.update({k: v for k, v in given.items() if v is not None})
    if out["subset"] == 0:  # 0: every image (None means "the preset's" here)
        out["subset"] = None
    if out["eps_list"] is None:
        out["eps_list"] = default_eps(out["norm"])
    out["square_check"] = bool(out["square_check"] and out["checks"])
    return out

"""The settings of one attack (`AttackSpec`) and of a robust-AUROC sweep (`SweepSpec`).

Each is frozen and validated once, when it is built; the attacks, the sweep, the audit and
the CLI pass specs on instead of checking loose arguments again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from firmad.errors import ConfigError

__all__ = [
    "ATTACKS",
    "NORMS",
    "SCHEDULES",
    "TARGETS",
    "AttackSpec",
    "SweepSpec",
    "check_int",
    "default_step",
]

NORMS = ("linf", "l2")
TARGETS = ("both", "normal", "anomaly")
SCHEDULES = ("fixed", "apgd")
ATTACKS = ("pgd", "square")


def check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def check_norm(norm) -> str:
    """The norm's name in lower case; a ConfigError unless it is one of NORMS."""
    norm = str(norm).lower()
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}.")
    return norm


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float)


def default_step(eps: float, steps: int, schedule: str = "fixed") -> float:
    """The default step: 2.5·ε/steps for the fixed schedule, APGD's first η = 2·ε."""
    return 2.0 * eps if schedule == "apgd" else 2.5 * eps / steps


@dataclass(frozen=True)
class AttackSpec:
    """One attack's settings (see ``pgd`` for their meaning); ``norm`` is stored lower case.

    ``steps`` is the number of queries for the Square attack.
    """

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
        norm = str(self.norm).lower()
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        object.__setattr__(self, "norm", check_norm(norm))
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
        if s is not None and (not _is_number(s) or not s > 0 or not math.isfinite(s)):
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


def _positive(v) -> bool:
    return _is_number(v) and v > 0 and math.isfinite(v)


@dataclass(frozen=True)
class SweepSpec:
    """The settings of ``robust_auroc_sweep``, validated once.

    eps_list: radii in [0, 1] pixel space, 0 gives the clean AUROC (stored sorted, unique,
        as floats). norm, steps, restarts, eot, random_start, batch_size, surrogates: as in
        ``attack_detector``; step size = ``step_factor``·ε/steps.
    schedule: ``"fixed"`` steps, or ``"apgd"`` (first step 2·ε, halved where progress
        stalls; ``step_factor`` is then unused).
    targets_list: rows to report among "normal", "anomaly", "both" (stored without repeats).
    seed: seeds the attacks, the subset and the bootstrap.
    subset: evaluate on a stratified seeded subset of this size (None = all images).
    n_bootstrap: bootstrap resamples for the 95 % intervals.
    checks: run the strength checks (they cost about four more attacks).
    check_eps: ε of the steps/restarts/transfer checks; default the median non-zero ε.
    large_eps: ε of the masking check; default 1.0 (L∞) or √d (L2).
    attack: ``"pgd"`` (gradient attacks, ``schedule`` picks PGD or APGD) or ``"square"``
        (the score-based black-box Square attack, L∞; ``steps`` is then its number of
        queries and surrogates are unused).
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
        if isinstance(targets_list, str):
            targets_list = (targets_list,)
        bad = [t for t in targets_list if t not in TARGETS]
        if bad or not targets_list:
            raise ConfigError(
                f"targets_list must name some of {TARGETS}, got {list(targets_list)}."
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

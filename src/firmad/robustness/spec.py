"""The settings of one attack (`AttackSpec`) and of a robust-AUROC sweep (`SweepSpec`).

Each is frozen and validated once, when it is built; the attacks, the sweep, the audit and
the CLI pass specs on instead of checking loose arguments again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from firmad.errors import ConfigError

__all__ = ["NORMS", "SCHEDULES", "TARGETS", "AttackSpec", "check_int", "default_step"]

NORMS = ("linf", "l2")
TARGETS = ("both", "normal", "anomaly")
SCHEDULES = ("fixed", "apgd")


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

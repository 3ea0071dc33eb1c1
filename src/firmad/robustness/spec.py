"""The settings of attacks, sweeps and audits.

`AttackSpec`, `SweepSpec` and the presets live in `firmad.perturb.spec` (below the recipe
sections, which validate through them); `AuditSpec` adds what only an audit needs: the
targeted members, the input space and the examples figure.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from firmad.errors import ConfigError
from firmad.perturb.spec import (
    ATTACKS,
    NORMS,
    PRESETS,
    SCHEDULES,
    TARGETS,
    AttackSpec,
    SweepSpec,
    check_int,
    default_step,
    eps_text,
    preset_settings,
)

__all__ = [
    "ATTACKS",
    "INPUT_SPACES",
    "NORMS",
    "PRESETS",
    "SCHEDULES",
    "TARGETS",
    "AttackSpec",
    "AuditSpec",
    "SweepSpec",
    "check_int",
    "default_step",
    "eps_text",
]

INPUT_SPACES = ("model", "native")


@dataclass(frozen=True)
class AuditSpec:
    """An audit's settings: the sweep, plus

    targeted: add the per-image targets (an `ImageTarget` on normal images and its targeted
        start, or a `NearestTarget` on the feature bank) to the detector's own surrogates.
    input_space: "model" (the test images as the evaluation scores them) or "native".
    n_examples: normals and anomalies shown attacked in attack_examples.png.
    """

    sweep: SweepSpec
    targeted: bool = True
    input_space: str = "model"
    n_examples: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.sweep, SweepSpec):
            raise ConfigError(f"sweep must be a SweepSpec, got {type(self.sweep).__name__}.")
        if self.input_space not in INPUT_SPACES:
            raise ConfigError(f"input space must be model or native, got {self.input_space!r}.")
        check_int("n_examples", self.n_examples, low=0)

    @classmethod
    def preset(cls, name: str = "quick", **given) -> AuditSpec:
        """The spec of preset ``name`` (``quick`` or ``full``) with ``given`` settings changed
        (None keeps the preset's): the keys of `SweepSpec` and of this class."""
        s = preset_settings(name, **given)
        own = {f.name for f in fields(cls)} - {"sweep"}
        sweep_keys = {f.name for f in fields(SweepSpec)}
        sweep = SweepSpec(**{k: v for k, v in s.items() if k in sweep_keys})
        return cls(sweep, **{k: v for k, v in s.items() if k in own})

    def settings(self) -> dict[str, Any]:
        """The plain settings that identify the attacks of this audit (for resume caches)."""
        sw = self.sweep
        return {
            "eps_list": sw.eps_list, "norm": sw.norm, "steps": sw.steps,
            "restarts": sw.restarts, "schedule": sw.schedule, "targets": sw.targets_list,
            "seed": sw.seed, "batch_size": sw.batch_size, "subset": sw.subset,
            "checks": sw.checks, "attack": sw.attack, "square_check": sw.square_check,
            "check_eps": sw.check_eps, "large_eps": sw.large_eps, "eot": sw.eot,
            "step_factor": sw.step_factor, "random_start": sw.random_start,
            "n_bootstrap": sw.n_bootstrap, "targeted": self.targeted,
            "input_space": self.input_space,
        }  # fmt: skip

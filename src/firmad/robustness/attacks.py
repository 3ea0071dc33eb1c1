"""The attacks on an anomaly score, in one namespace.

- `firmad.robustness.base`: the detector protocol, input checks, eval mode, `score`.
- `firmad.robustness.walks`: one walk of PGD or APGD from a start.
- `firmad.robustness.gradient`: `pgd`, `fgsm`, `attack_detector` (the strongest per image over
  gradient sources, restarts and batches; resumable), `AttackResult`.
- `firmad.robustness.square`: the black-box Square attack.
- `firmad.robustness.targets`: per-image gradient sources (`ImageTarget`, `NearestTarget`,
  `TargetStart`, `TwoLogitCE`).
"""

from __future__ import annotations

from firmad.perturb import ascent_step, project, random_delta
from firmad.robustness.base import ScoreFn, score, score_fn_of
from firmad.robustness.gradient import (
    AttackResult,
    attack_detector,
    fgsm,
    pgd,
    run_attack,
    run_sources,
    surrogates_of,
)
from firmad.robustness.spec import AttackSpec, default_step
from firmad.robustness.square import run_square, square_attack, square_fraction
from firmad.robustness.targets import ImageTarget, NearestTarget, TargetStart, TwoLogitCE
from firmad.robustness.walks import apgd_checkpoints

__all__ = [
    "AttackResult",
    "AttackSpec",
    "ImageTarget",
    "NearestTarget",
    "ScoreFn",
    "TargetStart",
    "TwoLogitCE",
    "apgd_checkpoints",
    "ascent_step",
    "attack_detector",
    "default_step",
    "fgsm",
    "pgd",
    "project",
    "random_delta",
    "run_attack",
    "run_square",
    "score",
    "score_fn_of",
    "run_sources",
    "square_attack",
    "square_fraction",
    "surrogates_of",
]

"""The strength checks of a sweep (verdicts ``{"name", "passed", "detail"}``):

- ``monotone``: AUROC does not rise with ε. Fails when a rise between consecutive ε is larger
  than 0.5 points even at the lower end of its paired-bootstrap 95 % interval.
- ``large_eps``: at a very large ε (L∞ 1.0; L2 the diameter √d of [0, 1]^d) the AUROC must
  fall below 0.05 with both groups attacked (else gradients are probably masked or
  obfuscated) and with each group attacked alone (the same attack's images for one group,
  clean ones for the other: one side can stall while "both" falls).
- ``more_steps`` / ``more_restarts``: at one ε, twice the steps or one more restart must not
  lower the "both" AUROC by more than 1 point; else the attack has not converged.
- ``transfer``: (only with ``transfer_from``) a black-box transfer attack, white-box on another
  detector, must not beat the white-box attack by more than 1 point.
- ``square``: (only with ``square_check``) the score-based black-box Square attack must not
  beat the white-box attack by more than 1 point either.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CONVERGENCE_TOL",
    "LARGE_EPS_MAX_AUROC",
    "MONOTONE_TOL",
    "SIDE_NAMES",
    "Verdict",
    "check_large_eps",
    "check_monotone",
]

SIDE_NAMES = {"both": "'both'", "normal": "normals-only", "anomaly": "anomalies-only"}
MONOTONE_TOL = 0.005  # AUROC may rise by half a point with ε (beyond its interval)
LARGE_EPS_MAX_AUROC = 0.05
CONVERGENCE_TOL = 0.01  # more steps / restarts / transfer may lower AUROC by one point at most


@dataclass
class Verdict:
    """One strength check: its name, whether it passed, and what was measured."""

    name: str
    passed: bool
    detail: str


def check_large_eps(aurocs: dict[str, float], norm: str, eps: float) -> Verdict:
    """At a huge eps any image is reachable: the AUROC must collapse with both groups
    attacked and with each group attacked alone (one side can stall while 'both' falls)."""
    high = {m: a for m, a in aurocs.items() if not a < LARGE_EPS_MAX_AUROC}
    passed = not high
    shown = ", ".join(f"{SIDE_NAMES[m]} {a:.4f}" for m, a in aurocs.items())
    detail = f"AUROC {shown} at {norm} eps={eps:.4g} (each needs < {LARGE_EPS_MAX_AUROC})"
    if "both" in high:
        hint = (
            "gradients may be masked or obfuscated (non-differentiable, detached or saturated "
            "score): the robust AUROC is likely overestimated; try surrogate scores, eot, or "
            "more steps"
        )
    elif high:
        hint = (
            f"the attack stalls when only the {' and '.join(SIDE_NAMES[m] for m in high)} "
            "side is attacked (its images cannot be moved past the other group): that row's "
            "robust AUROC is likely overestimated; try a targeted surrogate, the apgd schedule "
            "or more steps"
        )
    if not passed:
        worst = max(high.values())
        warnings.warn(
            f"AUROC stays at {worst:.3f} at eps={eps:.3g}; {hint}.", RuntimeWarning, stacklevel=3
        )
        detail += f"; WARNING: {hint}"
    return Verdict("large_eps", passed, detail)


def check_monotone(rows: list[dict], boot: dict, modes: list[str]) -> Verdict:
    """AUROC must not rise with ε: a rise counts when even the lower 2.5 % of its paired
    bootstrap distribution exceeds MONOTONE_TOL."""
    problems, worst = [], 0.0
    for mode in modes:
        mine = [r for r in rows if r["target"] == mode]
        for prev, cur in zip(mine, mine[1:], strict=False):
            diff = boot[(cur["eps"], mode)] - boot[(prev["eps"], mode)]
            low = float(np.percentile(diff, 2.5))
            rise = cur["auroc"] - prev["auroc"]
            worst = max(worst, rise)
            if low > MONOTONE_TOL:
                problems.append(
                    f"{mode}: eps {prev['eps']:.4g} -> {cur['eps']:.4g} AUROC "
                    f"{prev['auroc']:.4f} -> {cur['auroc']:.4f} (interval low of the rise "
                    f"{low:.4f})"
                )
    if problems:
        detail = "AUROC rises with eps (attack too weak or step size too large): " + "; ".join(
            problems
        )
        return Verdict("monotone", False, detail)
    return Verdict(
        "monotone", True, f"AUROC does not rise with eps (largest rise {max(worst, 0):.4f})"
    )

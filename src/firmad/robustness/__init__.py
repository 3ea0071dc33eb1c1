"""Robustness of one-class detectors: attacks on the anomaly score and robust AUROC
(`attacks`, `evaluate`), texture probes (`probes`) and constructed robust / non-robust feature
datasets after Ilyas et al. 2019 (`construct`)."""

from firmad.robustness.attacks import AttackResult, attack_detector, fgsm, pgd, score
from firmad.robustness.evaluate import (
    Verdict,
    bootstrap_auroc,
    format_markdown,
    robust_auroc_sweep,
    stratified_subset,
    sweep,
)
from firmad.robustness.spec import AttackSpec, SweepSpec

__all__ = [
    "AttackResult",
    "AttackSpec",
    "SweepSpec",
    "Verdict",
    "attack_detector",
    "bootstrap_auroc",
    "fgsm",
    "format_markdown",
    "pgd",
    "robust_auroc_sweep",
    "score",
    "stratified_subset",
    "sweep",
]

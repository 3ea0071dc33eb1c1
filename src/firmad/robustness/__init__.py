"""Adversarial robustness of anomaly detectors: attacks on the score and robust AUROC."""

from firmad.robustness.attacks import AttackResult, attack_detector, fgsm, pgd, score
from firmad.robustness.evaluate import (
    Verdict,
    bootstrap_auroc,
    format_markdown,
    robust_auroc_sweep,
    stratified_subset,
)

__all__ = [
    "AttackResult",
    "Verdict",
    "attack_detector",
    "bootstrap_auroc",
    "fgsm",
    "format_markdown",
    "pgd",
    "robust_auroc_sweep",
    "score",
    "stratified_subset",
]

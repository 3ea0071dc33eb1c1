"""Robustness of one-class detectors: attacks on the anomaly score (`attacks`: `base`, `walks`,
`gradient`, `square`, `targets`), robust AUROC (`evaluate`, with `bootstrap` and `verdicts`),
audits that write their evidence (`audit`, `folders`, `resume`, `plots`, `markdown`,
`progress`), texture probes (`probes`) and constructed robust / non-robust feature datasets
after Ilyas et al. 2019 (`construct`, `study`). Settings: `spec`."""

from firmad.robustness.attacks import AttackResult, attack_detector, fgsm, pgd, score
from firmad.robustness.evaluate import (
    Verdict,
    bootstrap_auroc,
    format_markdown,
    robust_auroc_sweep,
    stratified_subset,
    sweep,
)
from firmad.robustness.spec import AttackSpec, AuditSpec, SweepSpec

__all__ = [
    "AttackResult",
    "AttackSpec",
    "AuditSpec",
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

"""firmad: one-class anomaly detection with contrastive learning (FIRM) and robustness audits."""

__version__ = "0.1.0"

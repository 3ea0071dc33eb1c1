"""firmad: one-class anomaly detection with contrastive learning (FIRM) and robustness audits."""

from firmad.versions import __version__

__all__ = ["OneClassDetector", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import firmad` (and `firmad --version`) stays light.
    if name == "OneClassDetector":
        from firmad.detector import OneClassDetector

        return OneClassDetector
    raise AttributeError(f"module 'firmad' has no attribute {name!r}")

"""Training: the model a run trains, the method-agnostic loop, and its pluggable callbacks."""

from firmad.training.callbacks import (
    Callback,
    CheckpointSaver,
    LearningCurve,
    MetricsLog,
    ProgressBar,
)
from firmad.training.model import OneClassModel, build_model, resolve_device
from firmad.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted, fit_together

__all__ = [
    "Callback",
    "CheckpointSaver",
    "LearningCurve",
    "MetricsLog",
    "OneClassModel",
    "ProgressBar",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_model",
    "fit_together",
    "resolve_device",
]

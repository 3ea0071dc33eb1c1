"""Training: the model a run trains, the method-agnostic loop, and its pluggable callbacks."""

from firmad.training.callbacks import (
    Callback,
    CheckpointSaver,
    LearningCurve,
    MetricsLog,
    ProgressBar,
)
from firmad.training.model import OneClassModel, resolve_device
from firmad.training.settings import AdversarialSettings, TrainSettings, plan_epochs
from firmad.training.together import fit_together
from firmad.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted

__all__ = [
    "AdversarialSettings",
    "Callback",
    "CheckpointSaver",
    "LearningCurve",
    "MetricsLog",
    "OneClassModel",
    "ProgressBar",
    "TrainSettings",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "fit_together",
    "plan_epochs",
    "resolve_device",
]

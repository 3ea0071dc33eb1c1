"""The study's settings (a YAML recipe), the names of its sets and the pairs its rule reads.

Defaults are full-scale (GPU) settings; a CPU-sized study lists what it reduces in
``reductions``, which every output repeats.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from firmad.errors import FirmadError

# inversion starts: other-class training images (Ilyas et al.), a class-free mid-grey image
START_KINDS = ("other", "grey")

# The binary branch (Ilyas et al.'s sets for a binary classifier, the one-class surrogate).
BINARY_SETS = ("D_clean", "D_det", "flip", "flip_noise", "D_rand", "shuffle", "shuffle_noise")
# Each constructed set and the controls it must beat. ``*_noise``: the control's images moved
# in a random direction by as much as the constructed set's images were moved.
BINARY_RULE = {"D_det": ("flip", "flip_noise"), "D_rand": ("shuffle", "shuffle_noise")}


def one_class_sets(starts: tuple[str, ...] | list[str] = START_KINDS) -> tuple[str, ...]:
    """The one-class branch's sets: D (the source detector's own training set), per start kind
    the inversions through the robust / standard encoder and the starts themselves, and the
    real normals the inversions aimed at."""
    per = tuple(f"{name}-{kind}" for kind in starts for name in ("D_R", "D_NR", "starts"))
    return ("D", *per, "normals")


def one_class_rule(starts: tuple[str, ...] | list[str] = START_KINDS) -> dict[str, tuple[str, ...]]:
    """Each inverted set and the control it must beat (its starts). The real normals are the
    ceiling, reported beside: no inversion is expected to beat real data."""
    return {f"{name}-{kind}": (f"starts-{kind}",) for kind in starts for name in ("D_R", "D_NR")}


CEILING = {"binary": "D_clean", "one_class": "normals"}
CHANCE_SET = "shuffle"  # the pipeline's own chance level: labels that carry nothing


def branch_of(name: str) -> str:
    return "binary" if name in BINARY_SETS else "one_class"


class ConstructionError(FirmadError):
    """A stage missed a floor (reach, robust reference, robust encoder, inversion convergence):
    the stage stops, and the sets that depend on it are not trained."""


class StudyConfig(BaseModel):
    """A study recipe (YAML). Defaults are full-scale (GPU) settings."""

    model_config = ConfigDict(extra="forbid")

    name: str = "features"
    recipe: str = "fmnist-cpu"  # the one-class detector's training recipe
    binary_recipe: str = "fmnist-cpu-binary"
    backbone: str = "resnet_small"  # "name" or "name@width"
    # "one_class": D_R / D_NR (the paper's question); "binary": D_det / D_rand (a surrogate)
    branches: list[Literal["binary", "one_class"]] = Field(
        default_factory=lambda: ["binary", "one_class"], min_length=1
    )
    classes: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    # the seeds whose cells run the one-class branch (None: every seed)
    one_class_seeds: list[int] | None = None
    scorer: str = "knn_cos:k=5"
    set: list[str] = Field(default_factory=list)  # overrides for every model
    train_steps: int = Field(3000, ge=1)  # SGD steps of every model, constructed set or not
    # SGD steps of the binary robust reference (None: train_steps); it only vouches for the
    # constructions and is not compared with the sets, so it may train longer
    reference_steps: int | None = Field(None, ge=1)
    # the one-class robust detector (added to `set`): multi-step PGD in the constructions' norm
    robust_set: list[str] = Field(
        default_factory=lambda: [
            "adversarial.enabled=true",
            "adversarial.norm=l2",
            "adversarial.eps=0.5",
            "adversarial.steps=7",
        ]
    )
    binary_set: list[str] = Field(default_factory=list)  # every binary classifier
    binary_robust_set: list[str] = Field(
        default_factory=lambda: [
            "adversarial.enabled=true",
            "adversarial.norm=l2",
            "adversarial.eps=0.5",
            "adversarial.steps=7",
        ]
    )
    # the fresh classifiers trained on the binary sets
    fresh_binary_set: list[str] = Field(default_factory=lambda: ["augment.enabled=false"])
    # fresh models of another backbone ("name@width") on `transfer_sets`; None: none
    transfer_backbone: str | None = "resnet_small@0.5"
    transfer_sets: list[str] = Field(
        default_factory=lambda: [
            *BINARY_SETS[1:],
            *(n for n in one_class_sets() if n not in ("D", "normals")),
        ]
    )
    # training normals no source model sees: the robust reference's accuracy is read on them
    holdout_n: int = Field(500, ge=2)
    construct_n: int = Field(1000, ge=2)  # normals (and as many outliers) per binary set
    reach_eps: list[float] = Field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    construct_steps: int = Field(100, ge=1)  # targeted L2 PGD, step 2.5 eps / steps
    reach_floor: float = Field(0.95, ge=0, le=1)
    reference_floor: float = Field(0.9, ge=0, le=1)
    # the reference must classify held-out images (balanced accuracy) before it can vouch
    reference_min_accuracy: float = Field(0.8, ge=0, le=1)
    survival_floor: float = Field(0.9, ge=0, le=1)
    invert_n: int = Field(1000, ge=2)  # normals inverted per D_R / D_NR
    inversion_starts: list[Literal["other", "grey"]] = Field(
        default_factory=lambda: list(START_KINDS), min_length=1
    )
    inversion_steps: int = Field(3000, ge=0)
    inversion_lr: float = Field(0.3, gt=0)  # Adam on the sigmoid's argument, cosine decay
    # the reachability check: this many targets from themselves plus Gaussian pixel noise
    reachability_n: int = Field(16, ge=1)
    reachability_steps: int = Field(200, ge=1)
    reachability_noise: float = Field(0.1, gt=0)
    convergence_ratio: float = Field(0.1, gt=0)
    convergence_share: float = Field(0.9, ge=0, le=1)
    # a stage whose floor is missed in more than this share of the cells it ran in gives its
    # sets no verdict (12 of 15 cells must pass at 0.8)
    cells_floor: float = Field(0.8, ge=0, le=1)
    # the robust encoder must be this much more robust than the standard one of its cell, at
    # this attack radius (one of attack_eps), with its strength checks passed
    robust_floor_eps: float = Field(0.5, gt=0)
    robust_floor_margin: float = Field(0.15, ge=-1, le=1)
    attack_norm: Literal["linf", "l2"] = "l2"
    attack_eps: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5])
    attack_steps: int = Field(100, ge=1)
    # APGD's step-size schedule (the default of `firmad attack`); "fixed": 2.5 eps / steps
    attack_schedule: Literal["fixed", "apgd"] = "apgd"
    # the pixel-space target of each attacked image: a training normal among this share with
    # the lowest scores (normals walk to its rotation)
    target_share: float = Field(0.02, gt=0, le=1)
    attack_subset: int | None = 1000
    attack_binary_sets: bool = True  # attack the fresh binary classifiers too
    robust_checks: bool = True  # strength checks when the robust models are attacked
    probe_radii: list[float] = Field(default_factory=lambda: [2, 4, 8, 16])  # []: no probe
    probe_grids: list[int] = Field(default_factory=lambda: [2, 4])
    drift_eps: list[float] = Field(default_factory=list)  # empty: no drift stage
    drift_held_out: list[int] = Field(default_factory=list)
    chance: float = Field(0.5, ge=0, le=1)  # the AUROC of a detector that knows nothing
    confidence: float = Field(0.95, gt=0, lt=1)  # of the t-intervals over seeds
    n_bootstrap: int = Field(1000, ge=100)  # of the attack sweep's own intervals
    batch_size: int = Field(256, ge=1)
    # how the cells run: "local" (`workers` processes of this machine; 1: in this process) or
    # "ray" (one Ray task a cell, on the cluster at `address` or a local runtime)
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, le=64)
    address: str | None = None
    reductions: list[str] = Field(default_factory=list)  # free text, copied into the outputs

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        if "one_class" in self.branches and self.robust_floor_eps not in self.attack_eps:
            raise ValueError(
                f"robust_floor_eps {self.robust_floor_eps:g} must be one of attack_eps "
                f"{self.attack_eps}: the floor reads the attacked AUROC there"
            )
        for field in ("classes", "seeds", "one_class_seeds"):
            values = getattr(self, field) or []
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:  # a repeated seed would count twice toward the intervals over seeds
                raise ValueError(f"{field}: {twice} listed more than once; list each once")
        for field in ("backbone", "transfer_backbone"):
            _check_backbone(field, getattr(self, field))
        known = set(BINARY_SETS) | set(one_class_sets())
        unknown = sorted(set(self.transfer_sets) - known)
        if unknown:
            raise ValueError(f"transfer_sets: unknown set(s) {unknown}; known: {sorted(known)}")
        return self

    def cells_needed(self, n_cells: int) -> int:
        """The cells of ``n_cells`` in which a stage must pass for its sets to get a verdict."""
        return max(1, math.ceil(self.cells_floor * n_cells - 1e-9))


def _check_backbone(field: str, entry: str | None) -> None:
    from firmad.models import BACKBONES

    if entry is None:
        return
    name, _, width = entry.partition("@")
    try:
        ok = name in BACKBONES and (not width or float(width) > 0)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{field}: {entry!r} is not 'name' or 'name@width' with a backbone of "
            f"{', '.join(sorted(BACKBONES))} and a width > 0"
        )


def read_study(path: str | Path) -> StudyConfig:
    from firmad.config import read_recipe, validate_as

    return validate_as(StudyConfig, read_recipe(str(path)), "")

"""The one-class robust / non-robust feature study (Lau et al. 2024, after Ilyas et al. 2019).

Question: are the non-robust features that fool a lightweight detector *useful* for the
one-class task? Every cell of the study (normal class x seed; the seed covers construction and
training) builds these training sets, trains a fresh model on each and tests it on the class's
full original test split:

- Binary classifier (``binary_recipe``: normals vs their synthetic outliers, its logit the
  score), Ilyas et al.'s sets of N normals and N outliers:
  ``D_det``: every image pushed by targeted L2 PGD under the standard classifier to the *other*
  label and relabelled; control ``flip``: the clean images with the same flipped labels.
  ``D_rand``: pushed to a random label; control ``shuffle``: the clean images with the same
  random labels. ``D_clean``: the clean images with their true labels (reference).
  A construction must succeed or the stage stops (`ConstructionError`): the smallest radius of
  ``reach_eps`` at which >= ``reach_floor`` of the *stored uint8* images reach their target in
  each direction; the adversarially trained classifier must still read the original label on
  >= ``reference_floor`` of the images it reads correctly when clean; and the planted features
  must survive the fresh models' training views (>= ``survival_floor``).
- One-class detector (``recipe``): ``D_R`` / ``D_NR``: feature inversions of normal training
  images through the robust / standard encoder, from class-free starts (uniform noise);
  controls ``starts`` (the noise images, zero steps) and ``normals`` (the same number of
  original normals). Convergence is measured and recorded per set.

Every detector trains for the same number of SGD steps (``train_steps``). Each set is compared
with its control by a paired bootstrap over the same test images (and over seeds), per class
and pooled; the verdict on the non-robust features is computed from those intervals
(`verdict`). Texture probe and adversarial drift of the standard and robust detectors are kept.

Every stage writes its artefacts into the study directory and is skipped when they are there, so
an interrupted study resumes. Every setting, including the reductions of a CPU-sized study, is
written into ``study.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import rankdata

from firmad.config import backbone_overrides
from firmad.data import load_dataset
from firmad.data.pool import prepare_images
from firmad.errors import ConfigError, FirmadError
from firmad.factory import build_split
from firmad.io import atomic_write_json, atomic_write_text
from firmad.robustness.attacks import pgd, score
from firmad.robustness.audit import offered_surrogates
from firmad.robustness.construct import (
    centre_perturbation,
    feature_distance,
    inversion_convergence,
    invert_features,
    nearest_other_distance,
    reach_by_target,
    sample_grid_png,
    save_constructed,
    to_uint8,
)
from firmad.robustness.evaluate import robust_auroc_sweep, stratified_subset
from firmad.robustness.probes import texture_probe

BINARY_SETS = ("D_clean", "D_det", "flip", "D_rand", "shuffle")
ONE_CLASS_SETS = ("D", "D_R", "D_NR", "starts", "normals")
# (set, control): the differences the study reports; the first two decide the verdict
PAIRS = (
    ("D_det", "flip"), ("D_rand", "shuffle"),
    ("D_R", "normals"), ("D_NR", "normals"), ("D_R", "starts"), ("D_NR", "starts"),
)  # fmt: skip
VERDICT_PAIRS = PAIRS[:2]
DROPPED = {
    "D_NRonly": (
        "dropped: the one-class detector would have to learn the planted perturbations through "
        "FIRM's contrastive training views (random crops of 25-100 %, colour jitter, blur), "
        "which destroy most of them, and training FIRM without its views changes the method; "
        "the non-robust-feature question is answered by D_det / D_rand with their controls"
    )
}


class ConstructionError(FirmadError):
    """A constructed set missed a floor (reach, robust reference, survival): the stage stops."""


class StudyConfig(BaseModel):
    """A study recipe (YAML). Defaults are full-scale (GPU) settings."""

    model_config = ConfigDict(extra="forbid")

    name: str = "features"
    recipe: str = "fmnist-cpu"  # the one-class detector's training recipe
    binary_recipe: str = "fmnist-cpu-binary"
    backbone: str = "resnet_small"  # "name" or "name@width"
    # "binary": D_det / D_rand and their controls (the verdict); "one_class": D_R / D_NR
    branches: list[Literal["binary", "one_class"]] = Field(
        default_factory=lambda: ["binary", "one_class"], min_length=1
    )
    classes: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    # the seeds whose cells run the one-class branch (None: every seed); the verdict needs
    # only the binary branch
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
            "adversarial.enabled=true", "adversarial.norm=l2", "adversarial.eps=0.5",
            "adversarial.steps=7",
        ]
    )  # fmt: skip
    binary_set: list[str] = Field(default_factory=list)  # every binary classifier
    binary_robust_set: list[str] = Field(
        default_factory=lambda: [
            "adversarial.enabled=true", "adversarial.norm=l2", "adversarial.eps=0.5",
            "adversarial.steps=7",
        ]
    )  # fmt: skip
    # the fresh classifiers trained on D_clean / D_det / flip / D_rand / shuffle
    fresh_binary_set: list[str] = Field(default_factory=lambda: ["augment.enabled=false"])
    construct_n: int = Field(1000, ge=2)  # normals (and as many outliers) per binary set
    reach_eps: list[float] = Field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    construct_steps: int = Field(100, ge=1)  # targeted L2 PGD, step 2.5 eps / steps
    reach_floor: float = Field(0.95, ge=0, le=1)
    reference_floor: float = Field(0.9, ge=0, le=1)
    # the reference must classify the clean images (balanced accuracy) before it can vouch
    reference_min_accuracy: float = Field(0.8, ge=0, le=1)
    survival_floor: float = Field(0.9, ge=0, le=1)
    invert_n: int = Field(1000, ge=2)  # normals inverted per D_R / D_NR
    inversion_steps: int = Field(1000, ge=0)
    inversion_step_size: float = Field(0.1, gt=0)
    inversion_start: Literal["noise"] = "noise"
    convergence_ratio: float = Field(0.1, gt=0)
    convergence_share: float = Field(0.9, ge=0, le=1)
    attack_norm: Literal["linf", "l2"] = "l2"
    attack_eps: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5])
    attack_steps: int = Field(100, ge=1)
    # APGD's step-size schedule (the default of `firmad attack`); "fixed": 2.5 eps / steps
    attack_schedule: Literal["fixed", "apgd"] = "apgd"
    # the pixel-space target of each attacked image: a training normal among this share with
    # the lowest scores (normals walk to its rotation)
    target_share: float = Field(0.02, gt=0, le=1)
    attack_subset: int | None = 1000
    robust_checks: bool = True  # strength checks when the robust models are attacked
    probe_radii: list[float] = Field(default_factory=lambda: [2, 4, 8, 16])
    probe_grids: list[int] = Field(default_factory=lambda: [2, 4])
    drift_eps: list[float] = Field(default_factory=list)  # empty: no drift stage
    drift_held_out: list[int] = Field(default_factory=list)
    margin: float = Field(0.02, gt=0)  # AUROC: a difference below this is "no gain"
    n_bootstrap: int = Field(1000, ge=100)
    batch_size: int = Field(256, ge=1)
    # cells run in this many processes at once (each with the threads of `set`'s train.threads,
    # or one); 1: one after the other in this process
    workers: int = Field(1, ge=1, le=64)
    reductions: list[str] = Field(default_factory=list)  # free text, copied into the outputs


def read_study(path: str | Path) -> StudyConfig:
    from firmad.config import read_recipe, validate_as

    return validate_as(StudyConfig, read_recipe(str(path)), "")


def step_overrides(n_images: int, n_kinds: int, batch: int, steps: int) -> list[str]:
    """Overrides that train exactly ``steps`` SGD steps on ``n_images`` normals whose pool adds
    ``max(1, n_kinds)`` outliers per normal: epochs x steps_per_epoch = steps, with
    steps_per_epoch a divisor of ``steps`` no larger than one pass over the pool."""
    full = n_images * (1 + max(1, n_kinds)) // batch
    if full < 1:
        raise ConfigError(f"{n_images} images give no full batch of {batch}; lower the batch")
    per = max(d for d in range(1, min(full, steps) + 1) if steps % d == 0)
    return [f"train.epochs={steps // per}", f"train.steps_per_epoch={per}"]


class Cell:
    """One normal class and one seed: every set built, trained and tested (resumable)."""

    def __init__(self, cfg: StudyConfig, normal_class: int, seed: int, out: Path, log) -> None:
        from firmad.config import load_config

        self.cfg, self.cls, self.seed, self.log = cfg, normal_class, seed, log
        self.out = out / f"c{normal_class}-s{seed}"
        self.errors: list[ConstructionError] = []
        base = load_config(cfg.recipe, [*cfg.set, f"data.normal_class={normal_class}"])
        split = build_split(base)
        size = base.data.size
        self.train_u8 = prepare_images(split.train_images, size)
        self.test_u8 = prepare_images(split.test_images, size)
        self.test_y = split.test_labels
        self.test_classes = split.test_classes
        idx = stratified_subset(self.test_y, cfg.attack_subset, seed)
        self.attack_x = self.test_u8[idx].float() / 255
        self.attack_y = self.test_y[idx]
        self.attack_classes = self.test_classes[idx]

    def tag(self) -> str:
        return f"class {self.cls}, seed {self.seed}"

    # --- models -------------------------------------------------------------------------------

    def model(
        self, label, images, *, binary: bool, extra=(), exposure=None, steps: int | None = None
    ):
        """Train (or load) a model on uint8 ``images`` for exactly ``steps`` (default
        ``train_steps``) SGD steps."""
        from firmad.detector import OneClassDetector

        path = self.out / "models" / label
        if (path / "detector.json").exists():
            return OneClassDetector.load(path)
        c = self.cfg
        overrides = [*c.set, *backbone_overrides(c.backbone), f"train.seed={self.seed}",
                     *(c.binary_set if binary else []), *extra]  # fmt: skip
        if exposure is not None:
            overrides.append(f"outliers.exposure=npz:{exposure}")
        recipe = c.binary_recipe if binary else c.recipe
        probe = OneClassDetector(recipe=recipe, overrides=overrides).make_config()
        n_steps = steps or c.train_steps
        schedule = step_overrides(
            len(images), len(probe.outliers.kinds), probe.train.batch_size, n_steps
        )
        det = OneClassDetector(
            recipe=recipe, scorer="own" if binary else c.scorer, k=None,
            overrides=[*overrides, *schedule], holdout=0,  # every image trains; no threshold used
        )  # fmt: skip
        self.log(f"[{self.tag()}] training {label} on {len(images)} images, {n_steps} steps")
        tic = time.perf_counter()
        det.fit(images)
        det.calibration_ = {"train_s": round(time.perf_counter() - tic, 1),
                            "sgd_steps": n_steps, "n_images": len(images)}  # fmt: skip
        det.save(path)
        return det

    def evaluate(self, det, label: str, checks: bool = False) -> dict[str, Any]:
        """Clean AUROC on the full test split (scores kept for the paired tests) and attacked
        AUROC on the stratified attack subset (cached)."""
        path = self.out / "eval" / f"{label}.json"
        if path.exists():
            return json.loads(path.read_text())
        c = self.cfg
        x = self.test_u8
        s = torch.cat([score(det, x[i : i + 1000].float() / 255, c.batch_size)
                       for i in range(0, len(x), 1000)])  # fmt: skip
        np.save(self.out / "eval" / f"{label}-scores.npy", s.double().numpy(), allow_pickle=False)
        self.log(
            f"[{self.tag()}] attacking {label}" + (" (with strength checks)" if checks else "")
        )
        # the detector's own surrogates plus a per-image pixel-space target (a typical
        # training normal; normals walk to its rotation) under APGD's schedule: with fixed
        # steps and no target, one side of the large-eps check stalls on the adversarially
        # trained classifiers (benchmarks/RESULTS.md)
        normals = self.train_u8.float() / 255
        surrogates = offered_surrogates(det, True, normals, c.target_share)
        sweep = robust_auroc_sweep(
            det, self.attack_x, self.attack_y, eps_list=c.attack_eps, norm=c.attack_norm,
            steps=c.attack_steps, schedule=c.attack_schedule, seed=self.seed,
            batch_size=c.batch_size, subset=None, checks=checks, targets_list=("both",),
            n_bootstrap=c.n_bootstrap, surrogates=surrogates,
        )  # fmt: skip
        rows = {str(r["eps"]): r["auroc"] for r in sweep["rows"] if r["target"] == "both"}
        result = {
            "clean_auroc": _auroc(self.test_y.numpy(), s.double().numpy()),
            "n_test": len(s), "n_test_normal": int((self.test_y == 0).sum()),
            "attacked": rows, "n_attacked": len(self.attack_y),
            "n_attacked_normal": int((self.attack_y == 0).sum()),
            "checks_passed": sweep.get("passed") if checks else None,
            "verdicts": sweep.get("verdicts", []) if checks else [],
        }  # fmt: skip
        atomic_write_json(path, result)
        return result

    def scores(self, label: str) -> np.ndarray:
        return np.load(self.out / "eval" / f"{label}-scores.npy")

    # --- binary sets --------------------------------------------------------------------------

    def binary_sources(self, det_bin) -> tuple[torch.Tensor, torch.Tensor]:
        """N normals and one synthetic outlier of each (float), labels 0 / 1."""
        gen = torch.Generator().manual_seed(self.seed * 1009 + 5)
        pick = torch.randperm(len(self.train_u8), generator=gen)[: self.cfg.construct_n].sort()
        normals = self.train_u8[pick.values].float() / 255
        outliers = _synthetic_outliers(normals, det_bin.config_, gen)
        label = torch.cat([torch.zeros(len(normals)), torch.ones(len(normals))]).long()
        return torch.cat([normals, outliers]), label

    def binary_set(self, name: str, det_bin, det_ref) -> dict[str, Any]:
        """Build D_det or D_rand (and its control) once; their npz files and the construction
        record. Raises `ConstructionError` when a floor is missed."""
        sets = self.out / "sets"
        record = sets / f"{name}-construction.json"
        if record.exists():
            return json.loads(record.read_text())
        c = self.cfg
        source, label = self.binary_sources(det_bin)
        gen = torch.Generator().manual_seed(self.seed * 1009 + (11 if name == "D_det" else 13))
        target = (
            1 - label if name == "D_det" else torch.randint(0, 2, (len(source),), generator=gen)
        )
        tic = time.perf_counter()
        attempts, images, eps = self._reach(name, det_bin, source, target)
        meta = {"set": name, "class": self.cls, "seed": self.seed, "n": len(source),
                "attempts": attempts, "reach_floor": c.reach_floor}  # fmt: skip
        failed = sets / f"{name}-failed.json"  # what a stopped stage measured
        if images is None:
            last = attempts[-1]
            error = ConstructionError(
                f"{name} ({self.tag()}): at the largest radius, L2 eps {eps:g}, only "
                f"{100 * last['to_outlier']:.1f} % of the stored images reach 'outlier' and "
                f"{100 * last['to_normal']:.1f} % reach 'normal'; the floor is "
                f"{100 * c.reach_floor:.0f} % in each direction. Add larger radii to reach_eps "
                "or raise construct_steps, then run the study again (finished stages are kept)."
            )
            atomic_write_json(failed, {**meta, "error": str(error)})
            raise error
        meta.update(eps=eps, reach=attempts[-1])
        try:
            meta["reference"] = self._reference_check(name, det_ref, source, images, label)
            meta["survival"] = self._survival_check(name, det_bin, images, target)
        except ConstructionError as error:
            atomic_write_json(failed, {**meta, "error": str(error)})
            raise
        failed.unlink(missing_ok=True)
        meta.update(
            share_relabelled=float((target != label).float().mean()),
            seconds=round(time.perf_counter() - tic, 1),
        )  # fmt: skip
        _save_sets(sets, name, (source, images), (label, target), meta)
        atomic_write_json(record, meta)
        return meta

    def _reach(self, name: str, det_bin, source, target):
        """Attack ``source`` towards ``target`` at each radius of ``reach_eps`` until both
        directions reach the floor: the attempts, the stored images (None if never) and the
        last radius."""
        c = self.cfg
        attempts, images, eps = [], None, None
        for eps in c.reach_eps:
            self.log(f"[{self.tag()}] building {name}: {len(source)} images, L2 eps {eps:g}")
            # pgd raises the score of label 0 and lowers that of label 1: to reach target t,
            # give label 1 - t (target "outlier" = a higher logit).
            adv = pgd(
                det_bin, source, 1 - target, eps=eps, norm="l2", steps=c.construct_steps,
                targets="both", seed=self.seed, batch_size=c.batch_size,
            )  # fmt: skip
            stored = to_uint8(adv).float() / 255  # what the fresh model will read
            reach = reach_by_target(score(det_bin, stored, c.batch_size), target)
            attempts.append({"eps": eps, **reach})
            if min(reach["to_normal"], reach["to_outlier"]) >= c.reach_floor:
                images = stored
                break
        return attempts, images, eps

    def _reference_check(self, name, det_ref, source, images, label) -> dict[str, Any]:
        """The robust reference must still read the original label after the construction
        (among the images it reads correctly when clean). Its decision threshold is the one
        with the best balanced accuracy on the clean source images (training images): its
        pool holds three outliers per normal, which moves the logits away from 0."""
        c = self.cfg
        clean = score(det_ref, source, c.batch_size)
        threshold = best_threshold(clean, label)
        clean_ok = (clean > threshold).long() == label
        after_ok = (score(det_ref, images, c.batch_size) > threshold).long() == label
        kept = float(after_ok[clean_ok].float().mean()) if bool(clean_ok.any()) else 0.0
        balanced = float(np.mean([float(clean_ok[label == k].float().mean()) for k in (0, 1)]))
        if balanced < c.reference_min_accuracy:
            raise ConstructionError(
                f"{name} ({self.tag()}): the adversarially trained reference classifies only "
                f"{100 * balanced:.1f} % of the clean images correctly (balanced accuracy; floor "
                f"{100 * c.reference_min_accuracy:.0f} %), so it cannot tell whether the "
                "construction kept the robust content. Train it longer (reference_steps) or at "
                "a smaller radius (binary_robust_set), then run again."
            )
        out = {"clean_accuracy": float(clean_ok.float().mean()), "balanced_accuracy": balanced,
               "threshold": float(threshold),
               "original_label_read": float(after_ok.float().mean()),
               "kept_among_clean_correct": kept, "floor": c.reference_floor}  # fmt: skip
        if kept < c.reference_floor:
            raise ConstructionError(
                f"{name} ({self.tag()}): the adversarially trained reference still reads the "
                f"original label on only {100 * kept:.1f} % of the images it reads correctly when "
                f"clean (floor {100 * c.reference_floor:.0f} %): the perturbation changed robust "
                "content too. Use smaller radii in reach_eps (more construct_steps), or a "
                "reference trained at a larger radius (binary_robust_set), then run again."
            )
        return out

    def _survival_check(self, name, det_bin, images, target) -> dict[str, Any]:
        """Share of reached targets still reached on the fresh models' training views (and,
        for information, on the binary recipe's augmented views)."""
        from firmad.config import load_config

        c = self.cfg
        gen = torch.Generator().manual_seed(self.seed * 1009 + 17)
        reached = (score(det_bin, images, c.batch_size) > 0).long() == target
        out = {"floor": c.survival_floor}
        for key, extra in (("fresh_views", c.fresh_binary_set), ("recipe_views", [])):
            cfg = load_config(c.binary_recipe, [*c.set, *c.binary_set, *extra])
            view = _views(cfg, gen)
            kept = (score(det_bin, view(images), c.batch_size) > 0).long() == target
            out[key] = float(kept[reached].float().mean()) if bool(reached.any()) else 0.0
            out[f"{key}_augmented"] = bool(cfg.augment.enabled)
        if out["fresh_views"] < c.survival_floor:
            raise ConstructionError(
                f"{name} ({self.tag()}): only {100 * out['fresh_views']:.1f} % of the planted "
                f"targets survive the fresh models' training views (floor "
                f"{100 * c.survival_floor:.0f} %). Train the fresh models without augmentation "
                "(fresh_binary_set: [augment.enabled=false]), then run again."
            )
        return out

    def binary_models(self) -> dict[str, Any]:
        c = self.cfg
        det_bin = self.model("binary-standard", self.train_u8, binary=True)
        det_ref = self.model(
            "binary-robust", self.train_u8, binary=True, extra=c.binary_robust_set,
            steps=c.reference_steps,
        )  # fmt: skip
        out: dict[str, Any] = {
            "constructions": {}, "sets": {},
            "reference": self.evaluate(det_ref, "binary-robust", checks=c.robust_checks),
        }  # fmt: skip
        for name in ("D_det", "D_rand"):
            out["constructions"][name] = self.binary_set(name, det_bin, det_ref)
        for name in BINARY_SETS:
            normals = load_dataset(f"npz:{self.out / 'sets' / f'{name}.npz'}", split="train")
            det = self.model(
                f"binary-on_{name}", normals.images, binary=True, extra=c.fresh_binary_set,
                exposure=self.out / "sets" / f"{name}-outliers.npz",
            )  # fmt: skip
            out["sets"][name] = self.evaluate(det, f"binary-on_{name}")
        return out

    # --- one-class sets -----------------------------------------------------------------------

    def inverted_set(self, name: str, det, pick, starts) -> dict[str, Any]:
        """D_R / D_NR: invert the features of the normals ``pick`` from ``starts`` (built once),
        then measure convergence on the stored uint8 images (recorded once)."""
        sets = self.out / "sets"
        record, npz = sets / f"{name}-construction.json", sets / f"{name}.npz"
        if record.exists():
            return json.loads(record.read_text())
        c = self.cfg
        targets = self.train_u8[pick]
        meta: dict[str, Any] = {"set": name, "class": self.cls, "seed": self.seed,
                                "n": len(targets), "start": c.inversion_start,
                                "steps": c.inversion_steps}  # fmt: skip
        if not npz.with_suffix(".json").exists():
            self.log(f"[{self.tag()}] building {name}: {len(targets)} inversions, "
                     f"{c.inversion_steps} steps")  # fmt: skip
            tic = time.perf_counter()
            images, _, _ = invert_features(
                det.extractor_, targets, starts, c.inversion_steps, c.inversion_step_size,
                c.batch_size,
            )  # fmt: skip
            meta["seconds"] = round(time.perf_counter() - tic, 1)
            stored = to_uint8(images)
            save_constructed(npz, stored, np.zeros(len(stored), np.int64), meta)
            sample_grid_png(
                sets / f"{name}.png", {"start": starts[:8], "target": targets[:8], name: stored[:8]}
            )
        stored = load_dataset(f"npz:{npz}", split="train").images
        # residuals of what the fresh detector reads (the stored uint8 images), against the
        # distance from each target to its nearest other normal training image
        fn, bs = det.extractor_, c.batch_size
        final = feature_distance(fn, stored, targets, bs)
        initial = feature_distance(fn, starts, targets, bs)
        nearest = nearest_other_distance(fn, self.train_u8, pick, bs)
        meta["convergence"] = inversion_convergence(
            final, initial, nearest, c.convergence_ratio, c.convergence_share
        )
        atomic_write_json(record, meta)
        return meta

    def one_class_models(self) -> dict[str, Any]:
        c = self.cfg
        std = self.model("standard", self.train_u8, binary=False)
        rob = self.model("robust", self.train_u8, binary=False, extra=c.robust_set)
        gen = torch.Generator().manual_seed(self.seed * 1009 + 7)
        pick = torch.randperm(len(self.train_u8), generator=gen)[: c.invert_n].sort().values
        targets = self.train_u8[pick]
        starts = torch.rand(targets.shape, generator=gen)
        out: dict[str, Any] = {
            "constructions": {
                "D_R": self.inverted_set("D_R", rob, pick, starts),
                "D_NR": self.inverted_set("D_NR", std, pick, starts),
            },
            "robust": self.evaluate(rob, "robust", checks=c.robust_checks),
            "sets": {"D": self.evaluate(std, "standard")},
        }
        train = {"starts": to_uint8(starts), "normals": targets}
        for name in ("D_R", "D_NR"):
            train[name] = load_dataset(f"npz:{self.out / 'sets' / f'{name}.npz'}", "train").images
        for name in ONE_CLASS_SETS[1:]:
            det = self.model(f"on_{name}", train[name], binary=False)
            out["sets"][name] = self.evaluate(det, f"on_{name}")
        out["probe"] = {k: self.probe(d, k) for k, d in (("standard", std), ("robust", rob))}
        if c.drift_eps:
            out["drift"] = {k: self.drift(d, k) for k, d in (("standard", std), ("robust", rob))}
        return out

    def probe(self, det, label: str) -> list[dict]:
        path = self.out / "eval" / f"probe-{label}.json"
        if path.exists():
            return json.loads(path.read_text())
        c = self.cfg
        rows = texture_probe(lambda x: det.score_tensor(x), self.attack_x, self.attack_y,
                             c.probe_radii, c.probe_grids, c.batch_size, self.seed)  # fmt: skip
        atomic_write_json(path, rows)
        return rows

    def drift(self, det, label: str) -> list[dict]:
        """Per ε: mean score shift of normals and of each anomaly class, in units of the clean
        normals' score standard deviation (attacked both ways)."""
        path = self.out / "eval" / f"drift-{label}.json"
        if path.exists():
            return json.loads(path.read_text())
        c, x, y = self.cfg, self.attack_x, self.attack_y
        clean = score(det, x, c.batch_size)
        normal = y == 0
        unit = float(clean[normal].std()) or 1.0
        rows = []
        for eps in c.drift_eps:
            adv = x if eps == 0 else pgd(
                det, x, y, eps=eps, norm=c.attack_norm, steps=c.attack_steps, seed=self.seed,
                batch_size=c.batch_size,
            )  # fmt: skip
            shift = (score(det, adv, c.batch_size) - clean) / unit
            row = {"eps": eps, "normal": float(shift[normal].mean())}
            for cls in torch.unique(self.attack_classes[~normal]).tolist():
                key = f"class {cls}" + (" (held out)" if cls in c.drift_held_out else "")
                row[key] = float(shift[self.attack_classes == cls].mean())
            rows.append(row)
        atomic_write_json(path, rows)
        return rows

    def run(self) -> dict[str, Any]:
        """Both branches, each cached as a whole once finished (its stages are cached too)."""
        (self.out / "eval").mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"class": self.cls, "seed": self.seed}
        for branch, build in (("binary", self.binary_models), ("one_class", self.one_class_models)):
            if branch not in self.cfg.branches:
                continue
            if branch == "one_class" and self.seed not in (self.cfg.one_class_seeds or [self.seed]):
                continue
            done = self.out / f"{branch}.json"
            if not done.exists():
                tic = time.perf_counter()
                try:
                    part = build()
                except ConstructionError as error:
                    # this branch's stage stopped; the other branch and cells still run, and
                    # the study raises the error once its outputs are written
                    self.errors.append(error)
                    result[branch] = {"failed": str(error)}
                    continue
                part["seconds_last_invocation"] = round(time.perf_counter() - tic, 1)
                atomic_write_json(done, part)
            result[branch] = json.loads(done.read_text())
        return result


def best_threshold(scores: torch.Tensor, label: torch.Tensor) -> float:
    """The threshold t (label 1 when score > t) with the best balanced accuracy; midpoints
    between consecutive distinct scores (and below the lowest) are tried."""
    s = scores.double().cpu()
    y = torch.as_tensor(label).cpu()
    u = torch.unique(s)
    cands = torch.cat([u[:1] - 1, (u[1:] + u[:-1]) / 2]) if len(u) > 1 else u - 1
    pred = s[None, :] > cands[:, None]
    tpr = (pred & (y == 1)).sum(1) / max(1, int((y == 1).sum()))
    tnr = (~pred & (y == 0)).sum(1) / max(1, int((y == 0).sum()))
    return float(cands[torch.argmax(tpr + tnr)])


def _views(cfg, gen: torch.Generator):
    """The training view of a recipe: its random augmentation, or the image itself."""
    if not cfg.augment.enabled:
        return lambda x: x
    from firmad.augment import ViewAugment

    a = cfg.augment
    aug = ViewAugment(
        size=cfg.data.size, scale=tuple(a.scale), ratio=tuple(a.ratio), jitter=tuple(a.jitter),
        jitter_p=a.jitter_p, blur_kernel=a.blur_kernel, blur_sigma=tuple(a.blur_sigma),
        blur_p=a.blur_p, hflip_p=a.hflip_p, grayscale_p=a.grayscale_p, cuda_graphs=False,
    )  # fmt: skip
    return lambda x: aug(x, gen).clamp(0.0, 1.0)  # colour ops may overshoot by rounding


def _synthetic_outliers(images: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """One of the recipe's synthetic outlier kinds (rotations if it has none) per image."""
    from firmad.outliers import apply_kinds, parse_outliers

    kinds = parse_outliers(cfg.outliers.kinds or ["rot90", "rot180", "rot270"])
    kind_ids = torch.randint(1, len(kinds) + 1, (len(images),), generator=gen)
    return apply_kinds(images, kind_ids, kinds, gen)


# --- statistics ----------------------------------------------------------------------------------


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    return float(_auroc_rows(s[None, np.argsort(y, kind="stable")], int((y == 0).sum()))[0])


def _auroc_rows(s: np.ndarray, n_normal: int) -> np.ndarray:
    """AUROC of each row of s (B, N) whose first ``n_normal`` columns are normals (ties = ½)."""
    ranks = rankdata(s, axis=1)
    n_anom = s.shape[1] - n_normal
    return (ranks[:, n_normal:].sum(axis=1) - n_anom * (n_anom + 1) / 2.0) / (n_normal * n_anom)


def paired_draws(
    y: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int
) -> tuple[float, np.ndarray]:
    """Paired bootstrap of AUROC(a) - AUROC(b), averaged over seeds: ``pairs`` holds one
    (scores a, scores b) per seed, all on the same test images with labels ``y``. Each draw
    resamples normals and anomalies separately (the same images for every seed and both
    members of a pair) and, with several seeds, the seeds with replacement. Returns the point
    estimate (mean over seeds) and the draws (n_boot,)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable")
    n_normal = int((y == 0).sum())
    diffs = np.array([_auroc(y, a) - _auroc(y, b) for a, b in pairs])
    normals, anomalies = np.arange(n_normal), np.arange(n_normal, len(y))
    draws = np.empty(n_boot)
    chunk = max(1, 2_000_000 // len(y))
    seed_pick = rng.integers(0, len(pairs), size=(n_boot, len(pairs)))
    per_seed = np.empty((n_boot, len(pairs)))
    for lo in range(0, n_boot, chunk):
        hi = min(n_boot, lo + chunk)
        rows = np.concatenate(
            [
                rng.choice(normals, (hi - lo, n_normal)),
                rng.choice(anomalies, (hi - lo, len(y) - n_normal)),
            ],
            axis=1,
        )
        for k, (a, b) in enumerate(pairs):
            a_o, b_o = a[order], b[order]
            per_seed[lo:hi, k] = (_auroc_rows(a_o[rows], n_normal)
                                  - _auroc_rows(b_o[rows], n_normal))  # fmt: skip
    if len(pairs) > 1:
        draws = np.take_along_axis(per_seed, seed_pick, axis=1).mean(axis=1)
    else:
        draws = per_seed[:, 0]
    return float(diffs.mean()), draws


def _judge(low: float, high: float, margin: float) -> str:
    if low > 0:
        return "gain"
    if high < margin:
        return "no gain"
    return "unresolved"


def verdict(judgements: list[str | None]) -> str:
    """Non-robust features are "useful" when every verdict pair shows a gain (interval above 0),
    "not useful" when none can gain more than the margin (interval below it), else
    "inconclusive" (also when a pair is missing: None)."""
    if judgements and all(j == "gain" for j in judgements):
        return "useful"
    if judgements and all(j == "no gain" for j in judgements):
        return "not useful"
    return "inconclusive"


def summarise(cfg: StudyConfig, cells: dict[tuple[int, int], Cell], results: dict) -> dict:
    """Means ± sd per class and set, paired intervals per class and pooled, and the verdicts."""
    out: dict[str, Any] = {"classes": {}, "pooled": {}}
    pooled_draws: dict[str, list[np.ndarray]] = {f"{a} - {b}": [] for a, b in _pairs(cfg)}
    pooled_points: dict[str, list[float]] = {f"{a} - {b}": [] for a, b in _pairs(cfg)}
    for cls in cfg.classes:
        keys = [(cls, s) for s in cfg.seeds if (cls, s) in results]
        if not keys:
            continue
        entry: dict[str, Any] = {"seeds": [s for _, s in keys], "sets": {}, "pairs": {}}
        ok: dict[str, list] = {}  # per branch: the cells whose constructions succeeded
        entry["failed"] = [f"c{k[0]}-s{k[1]} {b}: {results[k][b]['failed']}" for k in keys
                           for b in cfg.branches if "failed" in results[k].get(b, {})]  # fmt: skip
        for branch, names in (("binary", BINARY_SETS), ("one_class", ONE_CLASS_SETS)):
            ok[branch] = [k for k in keys if "sets" in results[k].get(branch, {})]
            for name in names if ok[branch] else ():
                rows = [results[k][branch]["sets"][name] for k in ok[branch]]
                entry["sets"][name] = _mean_sd(rows)
        entry["branch_seeds"] = {b: [k[1] for k in v] for b, v in ok.items()}
        y = cells[keys[0]].test_y.numpy()
        for a, b in _pairs(cfg):
            good = ok["binary" if a in BINARY_SETS else "one_class"]
            if not good:
                continue
            pairs = [(cells[k].scores(_label(a)), cells[k].scores(_label(b))) for k in good]
            point, draws = paired_draws(y, pairs, cfg.n_bootstrap, 1000 + cls)
            lo, hi = np.percentile(draws, [2.5, 97.5])
            key = f"{a} - {b}"
            entry["pairs"][key] = {"diff": point, "ci": [float(lo), float(hi)],
                                   "judgement": _judge(lo, hi, cfg.margin)}  # fmt: skip
            pooled_draws[key].append(draws)
            pooled_points[key].append(point)
        complete = len(ok["binary"]) == len(keys)  # a failed construction: no verdict
        entry["verdict"] = verdict(
            [entry["pairs"].get(f"{a} - {b}", {}).get("judgement") if complete else None
             for a, b in VERDICT_PAIRS]
        )  # fmt: skip
        out["classes"][str(cls)] = entry
    for key, draws in pooled_draws.items():
        if draws:
            d = np.mean(draws, axis=0)
            lo, hi = np.percentile(d, [2.5, 97.5])
            out["pooled"][key] = {"diff": float(np.mean(pooled_points[key])),
                                  "ci": [float(lo), float(hi)],
                                  "judgement": _judge(lo, hi, cfg.margin)}  # fmt: skip
    complete = all(not e["failed"] for e in out["classes"].values())
    out["pooled_verdict"] = verdict(
        [out["pooled"].get(f"{a} - {b}", {}).get("judgement") if complete else None
         for a, b in VERDICT_PAIRS]
    )  # fmt: skip
    n_classes = len(out["classes"])
    min_seeds = min((len(e["seeds"]) for e in out["classes"].values()), default=0)
    out["floors"] = {
        "classes": n_classes, "seeds_min": min_seeds,
        "general_claim_allowed": n_classes >= 3 and min_seeds >= 5,
        "per_class_claim_allowed": min_seeds >= 5,
    }  # fmt: skip
    return out


def _label(name: str) -> str:
    """The evaluation label of the model trained on a set."""
    if name == "D":
        return "standard"
    return ("binary-on_" if name in BINARY_SETS else "on_") + name


def _pairs(cfg: StudyConfig) -> list[tuple[str, str]]:
    """The (set, control) pairs of the branches the study runs."""
    return [(a, b) for a, b in PAIRS
            if ("binary" if a in BINARY_SETS else "one_class") in cfg.branches]  # fmt: skip


def _mean_sd(rows: list[dict]) -> dict[str, Any]:
    clean = np.array([r["clean_auroc"] for r in rows])
    attacked = {e: np.array([r["attacked"][e] for r in rows]) for e in rows[0]["attacked"]}
    sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else None  # noqa: E731
    return {
        "clean": [float(clean.mean()), sd(clean)],
        "attacked": {e: [float(v.mean()), sd(v)] for e, v in attacked.items()},
        "n": len(rows),
    }


# --- the whole study -----------------------------------------------------------------------------


class Study:
    """Runs every cell (class x seed) in ``out_dir`` and writes study.json / study.md."""

    def __init__(self, cfg: StudyConfig, out_dir: Path, log=print) -> None:
        self.cfg, self.out, self.log = cfg, Path(out_dir), log

    def check_settings(self) -> None:
        """Refuse to resume a study directory whose artefacts were built with other settings
        (branches, classes and seeds may be added; the summary settings may change)."""
        free = {"name", "reductions", "branches", "classes", "seeds", "one_class_seeds",
                "margin", "n_bootstrap", "workers"}  # fmt: skip
        mine = {k: v for k, v in self.cfg.model_dump().items() if k not in free}
        path = self.out / "study-settings.json"
        if path.exists():
            theirs = json.loads(path.read_text())
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if changed:
                raise ConfigError(
                    f"{self.out} holds a study built with other settings ({', '.join(changed)}); "
                    "its stages cannot be reused. Give another --out, or restore the settings."
                )
        else:
            atomic_write_json(path, mine)

    def run(self) -> dict[str, Any]:
        tic = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_settings()
        keys = [(cls, seed) for cls in self.cfg.classes for seed in self.cfg.seeds]
        ran = self._run_parallel(keys) if self.cfg.workers > 1 and len(keys) > 1 else {}
        cells, results, errors = {}, {}, []
        for key in keys:
            cell = Cell(self.cfg, *key, self.out, self.log)
            cells[key] = cell
            if key in ran:  # finished in a worker: its results and stopped stages
                results[key], messages = ran[key]
                errors += [ConstructionError(m) for m in messages]
            else:
                results[key] = cell.run()
                errors += cell.errors
        previous = 0.0
        if (self.out / "study.json").exists():
            try:
                previous = float(json.loads((self.out / "study.json").read_text())["wall_time_s"])
            except (OSError, ValueError, KeyError, TypeError):
                previous = 0.0
        summary = summarise(self.cfg, cells, results)
        out = {
            "settings": self.cfg.model_dump(),
            "dropped_sets": DROPPED,
            "cells": {f"c{c}-s{s}": r for (c, s), r in results.items()},
            "summary": summary,
            # over every invocation that completed the study (a resumed study adds its time)
            "wall_time_s": round(previous + time.perf_counter() - tic, 1),
        }
        if self.cfg.drift_eps and "one_class" in self.cfg.branches:
            from firmad.report import plot_drift

            unit = 255.0 if self.cfg.attack_norm == "linf" else 1.0
            drift = {f"{k}, {label}": rows for k, r in out["cells"].items()
                     for label, rows in r["one_class"]["drift"].items()}  # fmt: skip
            plot_drift(self.out / "drift.png", drift, unit)
        atomic_write_json(self.out / "study.json", out)
        atomic_write_text(self.out / "study.md", study_markdown(out))
        if errors:
            raise ConstructionError(
                f"{len(errors)} stage(s) stopped (study.md lists them); the first: {errors[0]}"
            )
        return out

    def _run_parallel(self, keys: list[tuple[int, int]]) -> dict:
        """Run the cells ``keys`` in ``workers`` processes (spawned: no state shared with this
        one); each cell's stages are cached in its own directory, so an interrupted study
        resumes as usual. Returns {key: (result, stopped-stage messages)}."""
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        threads = _threads(self.cfg)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(self.cfg.workers, mp_context=ctx) as pool:
            futures = {key: pool.submit(_run_cell, self.cfg, *key, self.out, threads)
                       for key in keys}  # fmt: skip
            return {key: f.result() for key, f in futures.items()}


def _threads(cfg: StudyConfig) -> int:
    """The torch threads of one worker: the study's train.threads, else one."""
    from firmad.config import load_config

    return load_config(cfg.recipe, cfg.set).train.threads or 1


def _run_cell(cfg: StudyConfig, cls: int, seed: int, out: Path, threads: int):
    """One cell in a worker process; its log lines go to the worker's stdout."""
    torch.set_num_threads(threads)
    cell = Cell(cfg, cls, seed, out, lambda msg: print(msg, flush=True))
    result = cell.run()
    return result, [str(e) for e in cell.errors]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _ms(pair: list) -> str:
    mean, sd = pair
    return _pct(mean) + ("" if sd is None else f" ± {100 * sd:.1f}")


def _save_sets(sets: Path, name: str, images: tuple, labels: tuple, meta: dict) -> None:
    """The constructed set ``name``, its control and D_clean as npz files (normals and
    outliers apart), and a picture of a few originals, their constructed images and the
    perturbation. ``images``: (source, constructed); ``labels``: (label, target)."""
    (source, built), (label, target) = images, labels
    control = "flip" if name == "D_det" else "shuffle"
    for set_name, x, y in ((name, built, target), (control, source, target),
                           ("D_clean", source, label)):  # fmt: skip
        save_constructed(sets / f"{set_name}.npz", x[y == 0], y[y == 0], meta)
        save_constructed(sets / f"{set_name}-outliers.npz", x[y == 1], y[y == 1], meta)
    show = torch.cat([torch.arange(4), len(source) // 2 + torch.arange(4)])
    sample_grid_png(
        sets / f"{name}.png",
        {"original": source[show], name: built[show],
         "perturbation": centre_perturbation(built[show] - source[show])},
    )  # fmt: skip


def study_markdown(results: dict[str, Any]) -> str:
    s, summary = results["settings"], results["summary"]
    pairs = [(a, b) for a, b in PAIRS
             if ("binary" if a in BINARY_SETS else "one_class") in s["branches"]]  # fmt: skip
    eps = next((list(row["attacked"]) for e in summary["classes"].values()
                for row in e["sets"].values()), [])  # fmt: skip
    eps = [e for e in eps if float(e) > 0]
    lines = [
        f"# Robust / non-robust feature study: {s['name']}",
        "",
        f"Recipes {s['recipe']} (one-class) and {s['binary_recipe']} (binary), backbone "
        f"{s['backbone']}, classes {s['classes']}, seeds {s['seeds']}; every model trained for "
        f"{s['train_steps']} SGD steps (the binary robust reference: "
        f"{s['reference_steps'] or s['train_steps']}). Clean AUROC on each class's full test "
        f"split; attacked: {s['attack_norm']} {_attack_name(s)} both sides on "
        f"{s['attack_subset']} stratified test images (exact score, the detector's surrogates "
        f"and a pixel-space target; strongest per image). Wall time "
        f"{results.get('wall_time_s')} s.",
        "",
    ]
    if s.get("one_class_seeds") is not None and "one_class" in s["branches"]:
        lines += [f"The one-class branch ran on seeds {s['one_class_seeds']} only.", ""]
    if s["reductions"]:
        lines += ["Reductions from the full-scale settings: " + "; ".join(s["reductions"]), ""]
    lines += _verdict_lines(summary)
    lines += [
        "",
        "Rule (the binary branch; without it no verdict can be computed): D_det - flip and "
        "D_rand - shuffle (clean AUROC, paired 95 % bootstrap interval "
        'over the same test images and the seeds): "useful" when both intervals lie above 0; '
        f'"not useful" when both lie below +{100 * s["margin"]:.0f} points; else '
        '"inconclusive".',
        "",
        "## Each set minus its control (clean AUROC points, paired 95 % interval)",
        "",
        "| class | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |",
        "|---|" + "---:|" * len(pairs),
    ]
    lines += _pair_rows(summary, pairs)
    head = " | ".join(f"ε={float(e):g}" for e in eps)
    lines += ["", "## AUROC % of the model trained on each set (mean ± sd over seeds)", "",
              f"| class | model | set | seeds | clean | {head} |",
              "|---|---|---|---:|---:|" + "---:|" * len(eps)]  # fmt: skip
    for cls, e in summary["classes"].items():
        for name, row in e["sets"].items():
            kind = "binary" if name in BINARY_SETS else "one-class"
            cells = " | ".join(_ms(row["attacked"][x]) for x in eps)
            lines.append(
                f"| {cls} | {kind} | {name} | {row['n']} | {_ms(row['clean'])} | {cells} |"
            )
    lines += _construction_lines(results)
    lines += ["", "## Dropped sets", ""]
    lines += [f"- {k}: {v}" for k, v in results["dropped_sets"].items()]
    return "\n".join(lines) + "\n"


def _attack_name(settings: dict[str, Any]) -> str:
    schedule = settings.get("attack_schedule", "fixed")
    return ("APGD" if schedule == "apgd" else "PGD") + f"-{settings['attack_steps']}"


def _verdict_lines(summary: dict[str, Any]) -> list[str]:
    """The verdict section of study.md: per class, pooled (with its floors), stopped stages."""
    floors = summary["floors"]
    lines = ["## Verdict: are non-robust features useful for the one-class task?", ""]
    for cls, e in summary["classes"].items():
        lines.append(f"- class {cls} ({len(e['seeds'])} seed(s)): **{e['verdict']}**")
    if floors["general_claim_allowed"]:
        lines.append(f"- pooled over {floors['classes']} classes: **{summary['pooled_verdict']}**")
    else:
        lines.append(
            f"- pooled ({floors['classes']} class(es), at least {floors['seeds_min']} seed(s)): "
            f"**{summary['pooled_verdict']}** — below the floors for a general claim "
            "(>= 3 classes, >= 5 seeds): not a general result"
        )
    for e in summary["classes"].values():
        lines += [f"  - stopped: {msg}" for msg in e.get("failed", [])]
    return lines


def _pair_rows(summary: dict[str, Any], pairs: list) -> list[str]:
    """The rows of the set-minus-control table: each class, then pooled."""
    groups = [(c, e["pairs"]) for c, e in summary["classes"].items()]
    groups.append(("pooled", summary["pooled"]))
    lines = []
    for name, found in groups:
        cells = []
        for a, b in pairs:
            p = found.get(f"{a} - {b}")
            cells.append(
                "–"
                if p is None
                else f"{100 * p['diff']:+.1f} "
                f"[{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}] {p['judgement']}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _construction_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Constructions (per cell)", "",
             "| cell | set | L2 eps | reach to outlier / to normal | radii tried (reach %, "
             "to outlier / to normal) | reference: balanced accuracy / kept | survival (fresh "
             "views / recipe views) |",
             "|---|---|---:|---:|---|---:|---:|"]  # fmt: skip
    for key, r in results["cells"].items():
        for name, m in r.get("binary", {}).get("constructions", {}).items():
            lines.append(
                f"| {key} | {name} | {m['eps']:g} | {_pct(m['reach']['to_outlier'])} / "
                f"{_pct(m['reach']['to_normal'])} | "
                + ", ".join(
                    f"{a['eps']:g}: {_pct(a['to_outlier'])}/{_pct(a['to_normal'])}"
                    for a in m["attempts"]
                )
                + f" | {_pct(m['reference']['balanced_accuracy'])} / "
                f"{_pct(m['reference']['kept_among_clean_correct'])} | "
                f"{_pct(m['survival']['fresh_views'])} / {_pct(m['survival']['recipe_views'])} |"
            )
    lines += ["", "| cell | set | steps | median final/initial | residual < nearest normal | "
              "converged |", "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for key, r in results["cells"].items():
        for name, m in r.get("one_class", {}).get("constructions", {}).items():
            v = m["convergence"]
            lines.append(f"| {key} | {name} | {m['steps']} | {v['median_ratio']:.3f} | "
                         f"{_pct(v['share_below_nearest'])} % | {v['converged']} |")  # fmt: skip
    lines += ["", "| cell | robust model | clean | strength checks passed |", "|---|---|---:|---|"]
    for key, r in results["cells"].items():
        for name, ev in (("binary (reference)", r.get("binary", {}).get("reference")),
                         ("one-class", r.get("one_class", {}).get("robust"))):  # fmt: skip
            if ev is None:
                continue
            lines.append(f"| {key} | {name} | {_pct(ev['clean_auroc'])} | {ev['checks_passed']} |")
    return lines


def run_study(
    config: str | Path, out_dir: Path | None = None, log=print, workers: int | None = None
) -> dict[str, Any]:
    cfg = read_study(config)
    if workers is not None:
        cfg = cfg.model_copy(update={"workers": workers})
    return Study(cfg, out_dir or Path("runs") / "features" / cfg.name, log).run()

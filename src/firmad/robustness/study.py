"""The one-class robust / non-robust feature study (Lau et al. 2024, after Ilyas et al. 2019).

Question: when a lightweight one-class detector is fooled, which features fool it, and are those
non-robust features even useful for the one-class task? For each backbone size:

1. ``standard`` and ``robust`` detectors: the recipe, and the recipe with adversarial training.
2. Constructed training sets (npz datasets, readable by ``load_dataset("npz:...")``):
   - ``D_R`` / ``D_NR``: for each normal training image x, start from another normal image and
     minimise ``||g(z) - g(x)||_2`` over z in [0, 1]^d, g the encoder features of the robust /
     standard detector (normalised-gradient L2 steps, best iterate kept).
   - ``D_NRonly``: images that are not normal (the recipe's synthetic outliers of the normal
     training images) perturbed under the standard detector (L2 PGD towards a low anomaly
     score) until it scores them as normal: only non-robust features say "normal" there.
3. Fresh standard detectors trained on D (the original normals, i.e. ``standard``), D_R, D_NR and
   D_NRonly, each evaluated on the original test set: clean and robust AUROC.
4. Texture probe (low-/high-pass Fourier filters, patch shuffling) of standard vs robust.
5. Adversarial drift: how far attacks move the scores of normals and of each anomaly class,
   as ε grows; classes listed in ``drift_held_out`` are reported apart (they were not looked at
   when the attack settings were chosen).

Every stage writes its artefacts into the study directory and is skipped when they are there,
so an interrupted study resumes and constructed sets are reused, never rebuilt. Every setting,
including every reduction of a CPU-sized study, is written into ``study.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from firmad.config import backbone_overrides
from firmad.data import load_dataset
from firmad.data.pool import load_split, prepare_images
from firmad.errors import ConfigError
from firmad.io import atomic_write_json, atomic_write_text
from firmad.robustness.attacks import pgd, score
from firmad.robustness.construct import (
    centre_perturbation,
    invert_features,
    pick_starts,
    sample_grid_png,
    save_constructed,
)
from firmad.robustness.evaluate import robust_auroc_sweep, stratified_subset
from firmad.robustness.probes import texture_probe

SETS = ("D", "D_R", "D_NR", "D_NRonly")
BINARY_SETS = ("D_det", "D_rand")


class StudyConfig(BaseModel):
    """A study recipe (YAML). Defaults are the full-scale (GPU) settings of Ilyas et al."""

    model_config = ConfigDict(extra="forbid")

    name: str = "features"
    recipe: str = "fmnist-cpu"  # the standard detector's training recipe
    set: list[str] = Field(default_factory=list)  # overrides for every detector trained
    robust_set: list[str] = Field(
        default_factory=lambda: ["adversarial.enabled=true"]
    )  # what makes the robust detector (added to `set`)
    backbones: list[str] = Field(default_factory=lambda: ["resnet_small"])  # "name" or "name@width"
    normal_class: int | str = 0
    scorer: str = "knn_cos:k=5"
    construct_n: int | None = None  # normal images per constructed set (None: all)
    inversion_steps: int = Field(1000, ge=1)
    inversion_step_size: float = Field(0.1, gt=0)
    nonrobust_eps: float = Field(0.5, gt=0)  # L2
    nonrobust_steps: int = Field(100, ge=1)
    nonrobust_step_size: float = Field(0.1, gt=0)
    # The binary detector's non-robust-only sets (Ilyas et al.'s D_det / D_rand): normals and
    # their synthetic outliers, each pushed by targeted L2 PGD to the other label (D_det) or to
    # a random one (D_rand) under a binary classifier trained with this recipe, then relabelled
    # with the target. None: skip them.
    binary_recipe: str | None = None
    binary_eps: float = Field(0.5, gt=0)  # L2
    binary_steps: int = Field(100, ge=1)
    binary_step_size: float = Field(0.1, gt=0)
    attack_norm: Literal["linf", "l2"] = "linf"
    attack_eps: list[float] = Field(default_factory=lambda: [0.0, 2 / 255, 4 / 255, 8 / 255])
    attack_steps: int = Field(100, ge=1)
    attack_subset: int | None = 1000
    attack_checks: bool = True
    probe_radii: list[float] = Field(default_factory=lambda: [2, 4, 8, 16])
    probe_grids: list[int] = Field(default_factory=lambda: [2, 4])
    drift_eps: list[float] = Field(
        default_factory=lambda: [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255]
    )
    drift_held_out: list[int] = Field(default_factory=list)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    reductions: list[str] = Field(default_factory=list)  # free text, copied into the outputs


def read_study(path: str | Path) -> StudyConfig:
    from firmad.config import _build, read_recipe

    return _build(StudyConfig, read_recipe(str(path)), "")


class Study:
    """Runs the study stage by stage in ``out_dir`` (resumable)."""

    def __init__(self, cfg: StudyConfig, out_dir: Path, log=print) -> None:
        from firmad.config import load_config

        self.cfg, self.out, self.log = cfg, Path(out_dir), log
        base = load_config(cfg.recipe, [*cfg.set, f"data.normal_class={cfg.normal_class}"])
        self.run_cfg = base
        self.split = load_split(base)
        size = base.data.size
        self.train_u8 = prepare_images(self.split.train_images, size)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = len(self.train_u8)
        self.construct_idx = (
            torch.randperm(n, generator=gen)[: cfg.construct_n].sort().values
            if cfg.construct_n
            else torch.arange(n)
        )
        idx = stratified_subset(self.split.test_labels, cfg.attack_subset, cfg.seed)
        self.test_x = prepare_images(self.split.test_images[idx], size).float() / 255
        self.test_y = self.split.test_labels[idx]
        self.test_classes = self.split.test_classes[idx]

    # --- stages -------------------------------------------------------------------------------

    def detector(
        self,
        backbone: str,
        kind: str,
        images: torch.Tensor | None = None,
        *,
        binary: bool = False,
        exposure: Path | None = None,
    ):
        """Train (or load) a detector: kind "standard", "robust", or "on_<set>". ``binary``: the
        binary classifier of ``binary_recipe`` (normal vs outliers, its logit the score), with
        ``exposure`` an npz of the images it is to learn as outliers (else the recipe's
        synthetic outliers)."""
        from firmad.detector import OneClassDetector

        name = f"binary-{kind}" if binary else kind
        path = self.out / backbone / "detectors" / name
        if (path / "detector.json").exists():
            return OneClassDetector.load(path)
        extra = list(self.cfg.robust_set) if kind == "robust" else []
        if exposure is not None:
            extra.append(f"outliers.exposure=npz:{exposure}")
        det = OneClassDetector(
            recipe=self.cfg.binary_recipe if binary else self.cfg.recipe,
            scorer="own" if binary else self.cfg.scorer,
            k=None,
            overrides=[*self.cfg.set, *backbone_overrides(backbone), *extra],
        )
        self.log(f"[{backbone}] training the {name} detector")
        tic = time.perf_counter()
        det.fit(self.train_u8 if images is None else images)
        det.calibration_ = {"train_s": round(time.perf_counter() - tic, 1)}
        det.save(path)
        return det

    def binary_constructed(self, backbone: str, name: str, det_bin) -> tuple[torch.Tensor, Path]:
        """D_det / D_rand: the normal images of the set and the npz of its outlier images."""
        path = self.out / backbone / "sets" / f"{name}.npz"
        outliers_path = path.with_name(f"{name}-outliers.npz")
        if not (path.with_suffix(".json").exists() and outliers_path.with_suffix(".json").exists()):
            self._build_binary_set(backbone, name, det_bin, path, outliers_path)
        data = load_dataset(f"npz:{path}", split="train")
        return data.images[data.labels == 0], outliers_path

    def _build_binary_set(self, backbone, name, det_bin, path: Path, outliers_path: Path) -> None:
        c = self.cfg
        normals = self.train_u8[self.construct_idx].float() / 255
        gen = torch.Generator().manual_seed(c.seed + (11 if name == "D_det" else 13))
        source = torch.cat([normals, _synthetic_outliers(normals, det_bin.config_, gen)])
        label = torch.cat([torch.zeros(len(normals)), torch.ones(len(normals))]).long()
        if name == "D_det":
            target = 1 - label
        else:
            target = torch.randint(0, 2, (len(source),), generator=gen)
        self.log(f"[{backbone}] building {name}: {len(source)} images pushed to their target")
        tic = time.perf_counter()
        # pgd raises the score of label 0 and lowers that of label 1: to reach target t, give
        # label 1 - t (target "outlier" = a higher logit).
        images = pgd(
            det_bin, source, 1 - target, eps=c.binary_eps, norm="l2", steps=c.binary_steps,
            step_size=c.binary_step_size, targets="both", seed=c.seed, batch_size=c.batch_size,
        )  # fmt: skip
        after = score(det_bin, images, c.batch_size)
        reached = ((after > 0).long() == target).float()
        meta = {
            "set": name, "backbone": backbone, "n": len(source),
            "share_target_reached": float(reached.mean()),
            "share_relabelled": float((target != label).float().mean()),
            "seconds": round(time.perf_counter() - tic, 1), "settings": c.model_dump(),
        }  # fmt: skip
        save_constructed(outliers_path, images[target == 1], target[target == 1], meta)
        save_constructed(path, images, target, meta, classes=["normal", "outlier"])
        show = torch.cat([torch.arange(4), len(normals) + torch.arange(4)])
        sample_grid_png(
            path.with_suffix(".png"),
            {"original": source[show], name: images[show],
             "perturbation": centre_perturbation(images[show] - source[show])},
        )  # fmt: skip

    def constructed(self, backbone: str, name: str, det_std, det_rob) -> torch.Tensor:
        """The images of a constructed set (built once, then read from its npz)."""
        path = self.out / backbone / "sets" / f"{name}.npz"
        if path.with_suffix(".json").exists():
            return load_dataset(f"npz:{path}", split="train").images
        c = self.cfg
        targets = self.train_u8[self.construct_idx].float() / 255
        gen = torch.Generator().manual_seed(c.seed + 7)
        tic = time.perf_counter()
        if name in ("D_R", "D_NR"):
            det = det_rob if name == "D_R" else det_std
            starts = targets[pick_starts(len(targets), gen)]
            self.log(f"[{backbone}] building {name}: {len(targets)} inversions")
            images, final, initial = invert_features(
                det.extractor_, targets, starts, c.inversion_steps, c.inversion_step_size,
                c.batch_size,
            )  # fmt: skip
            meta = {"feature_distance_final_mean": float(final.mean()),
                    "feature_distance_initial_mean": float(initial.mean())}  # fmt: skip
        else:
            outliers = _synthetic_outliers(targets, self.run_cfg, gen)
            self.log(f"[{backbone}] building {name}: {len(targets)} outliers made to look normal")
            images = pgd(
                det_std, outliers, torch.ones(len(outliers), dtype=torch.long),
                eps=c.nonrobust_eps, norm="l2", steps=c.nonrobust_steps,
                step_size=c.nonrobust_step_size, targets="anomaly", seed=c.seed,
                batch_size=c.batch_size,
            )  # fmt: skip
            before = score(det_std, outliers, c.batch_size)
            after = score(det_std, images, c.batch_size)
            normal = score(det_std, targets, c.batch_size)
            below = (after < normal.median()).float().mean()
            meta = {
                "score_outliers_mean": float(before.mean()),
                "score_perturbed_mean": float(after.mean()),
                "score_normals_mean": float(normal.mean()),
                "share_below_normal_median": float(below),
            }
        meta.update(
            {"set": name, "backbone": backbone, "n": len(targets),
             "seconds": round(time.perf_counter() - tic, 1), "settings": c.model_dump()}
        )  # fmt: skip
        labels = np.zeros(len(images), dtype=np.int64)
        save_constructed(path, images, labels, meta)
        sample_grid_png(
            path.with_suffix(".png"),
            {"original": targets[:8], name: images[:8],
             "perturbation": centre_perturbation(images[:8] - targets[:8])},
        )  # fmt: skip
        return load_dataset(f"npz:{path}", split="train").images

    def evaluate(self, det, backbone: str, label: str) -> dict[str, Any]:
        """Clean and robust AUROC of a detector on the original test subset (cached)."""
        path = self.out / backbone / "eval" / f"{label}.json"
        if path.exists():
            return json.loads(path.read_text())
        c = self.cfg
        self.log(f"[{backbone}] attacking {label}")
        result = robust_auroc_sweep(
            det, self.test_x, self.test_y, eps_list=c.attack_eps, norm=c.attack_norm,
            steps=c.attack_steps, seed=c.seed, batch_size=c.batch_size, subset=None,
            checks=c.attack_checks, targets_list=("both",),
        )  # fmt: skip
        atomic_write_json(path, result)
        return result

    def probe(self, det, backbone: str, label: str) -> list[dict]:
        path = self.out / backbone / "eval" / f"probe-{label}.json"
        if path.exists():
            return json.loads(path.read_text())
        rows = texture_probe(
            lambda x: det.score_tensor(x), self.test_x, self.test_y, self.cfg.probe_radii,
            self.cfg.probe_grids, self.cfg.batch_size, self.cfg.seed,
        )  # fmt: skip
        atomic_write_json(path, rows)
        return rows

    def drift(self, det, backbone: str, label: str) -> list[dict]:
        """Per ε: mean score shift of normals and of each anomaly class, in units of the clean
        normals' score standard deviation (attacked both ways)."""
        path = self.out / backbone / "eval" / f"drift-{label}.json"
        if path.exists():
            return json.loads(path.read_text())
        c = self.cfg
        clean = score(det, self.test_x, c.batch_size)
        normal = self.test_y == 0
        unit = float(clean[normal].std()) or 1.0
        rows = []
        for eps in c.drift_eps:
            adv = self.test_x if eps == 0 else pgd(
                det, self.test_x, self.test_y, eps=eps, norm=c.attack_norm,
                steps=c.attack_steps, seed=c.seed, batch_size=c.batch_size,
            )  # fmt: skip
            shift = (score(det, adv, c.batch_size) - clean) / unit
            row = {"eps": eps, "normal": float(shift[normal].mean())}
            for cls in torch.unique(self.test_classes[~normal]).tolist():
                key = f"class {cls}" + (" (held out)" if cls in c.drift_held_out else "")
                row[key] = float(shift[self.test_classes == cls].mean())
            rows.append(row)
        atomic_write_json(path, rows)
        return rows

    # --- the whole study ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        tic = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {"settings": self.cfg.model_dump(), "backbones": {}}
        for backbone in self.cfg.backbones:
            std = self.detector(backbone, "standard")
            rob = self.detector(backbone, "robust")
            entry: dict[str, Any] = {"detectors": {}, "sets": {}, "probe": {}, "drift": {}}
            for label, det in (("standard", std), ("robust", rob)):
                entry["detectors"][label] = _summary(det, self.evaluate(det, backbone, label))
                entry["probe"][label] = self.probe(det, backbone, label)
                entry["drift"][label] = self.drift(det, backbone, label)
            entry["sets"]["D"] = entry["detectors"]["standard"]
            for name in SETS[1:]:
                images = self.constructed(backbone, name, std, rob)
                det = self.detector(backbone, f"on_{name}", images)
                entry["sets"][name] = _summary(det, self.evaluate(det, backbone, f"on_{name}"))
            if self.cfg.binary_recipe:
                det_bin = self.detector(backbone, "standard", binary=True)
                entry["binary"] = {
                    "D": _summary(det_bin, self.evaluate(det_bin, backbone, "binary-standard"))
                }
                for name in BINARY_SETS:
                    normals, outliers = self.binary_constructed(backbone, name, det_bin)
                    det = self.detector(
                        backbone, f"on_{name}", normals, binary=True, exposure=outliers
                    )
                    sweep = self.evaluate(det, backbone, f"binary-on_{name}")
                    entry["binary"][name] = _summary(det, sweep)
            results["backbones"][backbone] = entry
        # Wall time over every invocation that completed the study (a resumed or re-rendered
        # study adds its own time to the recorded total instead of replacing it).
        previous = 0.0
        if (self.out / "study.json").exists():
            try:
                previous = float(json.loads((self.out / "study.json").read_text())["wall_time_s"])
            except (OSError, ValueError, KeyError, TypeError):
                previous = 0.0
        results["wall_time_s"] = round(previous + time.perf_counter() - tic, 1)
        from firmad.report import plot_drift

        unit = 255.0 if self.cfg.attack_norm == "linf" else 1.0
        drift = {f"{b}, {label}": rows for b, e in results["backbones"].items()
                 for label, rows in e["drift"].items()}  # fmt: skip
        plot_drift(self.out / "drift.png", drift, unit)
        atomic_write_json(self.out / "study.json", results)
        atomic_write_text(self.out / "study.md", study_markdown(results))
        return results


def _synthetic_outliers(images: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """One of the recipe's synthetic outlier kinds (rotations if it has none) per image."""
    from firmad.outliers import apply_kinds, parse_outliers

    kinds = parse_outliers(cfg.outliers.kinds or ["rot90", "rot180", "rot270"])
    kind_ids = torch.randint(1, len(kinds) + 1, (len(images),), generator=gen)
    return apply_kinds(images, kind_ids, kinds, gen)


def _summary(det, sweep: dict) -> dict[str, Any]:
    rows = {r["eps"]: r for r in sweep["rows"] if r["target"] == "both"}
    cfg = det.config_
    return {
        "backbone": cfg.model.backbone,
        "width": cfg.model.width,
        "adversarial": bool(getattr(getattr(cfg, "adversarial", None), "enabled", False)),
        "clean_auroc": sweep["clean"]["auroc"] if "clean" in sweep else rows[0.0]["auroc"],
        "robust": {str(eps): [r["auroc"], r["ci_low"], r["ci_high"]] for eps, r in rows.items()},
        "checks_passed": sweep.get("passed"),
    }


def _eps_text(eps: float, unit: int) -> str:
    """L∞ radii in 1/255 units, rounded as people write them (0.0314 -> 8/255); L2 as is."""
    return f"{eps * 255:.2g}/255" if unit == 255 else f"{eps:g}"


def study_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    eps = [e for e in s["attack_eps"] if e > 0]
    unit = 255 if s["attack_norm"] == "linf" else 1
    head = " | ".join(f"ε={_eps_text(e, unit)}" for e in eps)
    lines = [
        f"# Robust / non-robust feature study: {s['name']}",
        "",
        f"Recipe {s['recipe']} (+ {s['set']}), class {s['normal_class']}, scorer {s['scorer']}; "
        f"attack {s['attack_norm']} PGD-{s['attack_steps']}, both sides, "
        f"{s['attack_subset']} test images. Wall time {results.get('wall_time_s')} s.",
        "",
    ]
    if s["reductions"]:
        lines += ["Reductions from the full-scale settings: " + "; ".join(s["reductions"]), ""]
    lines += [
        "## Detectors trained on each set, tested on the original test set (AUROC %)",
        "",
        f"| backbone | training set | clean | {head} |",
        "|---|---|---:|" + "---:|" * len(eps),
    ]
    for backbone, entry in results["backbones"].items():
        for name, row in [
            *entry["sets"].items(),
            ("robust (adv. trained)", entry["detectors"]["robust"]),
        ]:
            cells = " | ".join(f"{100 * row['robust'][str(e)][0]:.1f}" for e in eps)
            lines.append(f"| {backbone} | {name} | {100 * row['clean_auroc']:.1f} | {cells} |")
    binary = [(b, e["binary"]) for b, e in results["backbones"].items() if "binary" in e]
    if binary:
        lines += [
            "",
            f"## Binary classifiers ({s['binary_recipe']}) trained on D, D_det and D_rand, "
            "tested on the original test set (AUROC %)",
            "",
            f"| backbone | training set | clean | {head} |",
            "|---|---|---:|" + "---:|" * len(eps),
        ]
        for backbone, sets in binary:
            for name, row in sets.items():
                cells = " | ".join(f"{100 * row['robust'][str(e)][0]:.1f}" for e in eps)
                lines.append(f"| {backbone} | {name} | {100 * row['clean_auroc']:.1f} | {cells} |")
    lines += ["", "## Texture probe (AUROC %)", ""]
    for backbone, entry in results["backbones"].items():
        std, rob = entry["probe"]["standard"], entry["probe"]["robust"]
        lines += [f"### {backbone}", "", "| transform | standard | robust |", "|---|---:|---:|"]
        for a, b in zip(std, rob, strict=True):
            name = a["transform"] + ("" if a["param"] is None else f" {a['param']}")
            lines.append(f"| {name} | {100 * a['auroc']:.1f} | {100 * b['auroc']:.1f} |")
        lines.append("")
    lines += ["## Adversarial drift (mean score shift, in clean-normal score std units)", "",
              "![drift curves](drift.png)", ""]  # fmt: skip
    for backbone, entry in results["backbones"].items():
        for label, rows in entry["drift"].items():
            keys = list(rows[0])[1:]
            lines += [f"### {backbone}, {label}", "", "| ε | " + " | ".join(keys) + " |",
                      "|---|" + "---:|" * len(keys)]  # fmt: skip
            for r in rows:
                lines.append(
                    f"| {_eps_text(r['eps'], unit)} | "
                    + " | ".join(f"{r[k]:+.2f}" for k in keys)
                    + " |"
                )
            lines.append("")
    return "\n".join(lines)


def run_study(config: str | Path, out_dir: Path | None = None, log=print) -> dict[str, Any]:
    cfg = read_study(config)
    if cfg.construct_n is not None and cfg.construct_n < 2:
        raise ConfigError("construct_n: must be >= 2 (each image starts from another one)")
    return Study(cfg, out_dir or Path("runs") / "features" / cfg.name, log).run()

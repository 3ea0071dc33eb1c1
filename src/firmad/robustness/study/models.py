"""The models of a cell: trained (or loaded) with their own init seed for exactly the study's
number of SGD steps, a digest of their initial weights recorded, then tested: clean AUROC on
the full test split and attacked AUROC on a stratified subset."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from firmad.io import atomic_write_json
from firmad.robustness.study.config import StudyConfig

if TYPE_CHECKING:
    from firmad.config import RunConfig
    from firmad.robustness.study.cell import Cell


@dataclass(frozen=True)
class ModelSpec:
    """One model of a cell. ``extra``: the study YAML's settings for it (e.g. ``robust_set``);
    ``backbone``: "name@width" (None: the study's); ``exposure``: its outliers (an npz)."""

    label: str
    binary: bool
    seed: int
    steps: int
    extra: tuple[str, ...] = ()
    backbone: str | None = None
    exposure: Path | None = None
    scorer: str | None = field(default=None)  # None: the study's (binary: the logit)


def fresh_seed(seed: int, label: str) -> int:
    """The init seed of a model trained on a constructed set or a control: its own per label,
    never the cell's seed (that of the source models whose directions were planted)."""
    return (seed + 1) * 100_003 + zlib.crc32(label.encode()) % 100_003


def step_plan(n_images: int, n_kinds: int, batch: int, steps: int) -> tuple[int, int]:
    """(epochs, steps per epoch) that train exactly ``steps`` SGD steps on ``n_images``
    normals whose pool adds ``max(1, n_kinds)`` outliers per normal; steps per epoch is a
    divisor of ``steps`` no larger than one pass over the pool."""
    from firmad.errors import ConfigError

    full = n_images * (1 + max(1, n_kinds)) // batch
    if full < 1:
        raise ConfigError(f"{n_images} images give no full batch of {batch}; lower the batch")
    per = max(d for d in range(1, min(full, steps) + 1) if steps % d == 0)
    return steps // per, per


def run_config(cfg: StudyConfig, spec: ModelSpec, n_images: int) -> RunConfig:
    """The typed training config of a model: the recipe with the study YAML's settings (read
    as a recipe is read), then its backbone, seed, step plan and outliers set on a copy, and
    the whole validated again."""
    from firmad.config import config_from_dict, load_config

    recipe = cfg.binary_recipe if spec.binary else cfg.recipe
    run = load_config(recipe, [*cfg.set, *(cfg.binary_set if spec.binary else []), *spec.extra])
    epochs, per = step_plan(n_images, len(run.outliers.kinds), run.train.batch_size, spec.steps)
    update: dict[str, Any] = {
        "model": run.model.model_copy(update=backbone(spec.backbone or cfg.backbone)),
        "train": run.train.model_copy(
            update={"seed": spec.seed, "epochs": epochs, "steps_per_epoch": per}
        ),
    }
    if spec.exposure is not None:
        update["outliers"] = run.outliers.model_copy(update={"exposure": f"npz:{spec.exposure}"})
    return config_from_dict(run.model_copy(update=update).to_dict())


def backbone(entry: str) -> dict[str, Any]:
    """The model settings of a backbone written "name" or "name@width": without a width a
    width-scalable net keeps the recipe's and a fixed-width one takes 1.0."""
    from firmad.models import WIDTH_SCALABLE

    name, _, width = entry.partition("@")
    if width:
        return {"backbone": name, "width": float(width)}
    return {"backbone": name} if name in WIDTH_SCALABLE else {"backbone": name, "width": 1.0}


def init_digest(run: RunConfig, channels: int) -> str:
    """A digest of the initial weights a model of ``run`` starts from: the factory's model
    built right after ``torch.manual_seed(train.seed)``, as the trainer builds it (the
    normalisation buffers aside). The global RNG is left as it was."""
    from firmad.factory import build_method, build_model

    c = run.data.channels if not (channels == 3 and run.data.channels == 1) else 3
    data = run.data.model_copy(update={"channels": c})
    run = run.model_copy(update={"data": data})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.train.seed)
        model = build_model(run, run.data.dataset, ([0.0] * c, [1.0] * c), build_method(run))
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_model(cell: Cell, spec: ModelSpec, images: torch.Tensor):
    """Train (or load) the model ``spec`` on uint8 ``images``; (detector, its record)."""
    from firmad.config import save_config
    from firmad.detector import OneClassDetector

    path = cell.out / "models" / spec.label
    # beside the detector's folder: its training config and its record (seed, digest, time)
    recipe, record_path = path.with_suffix(".yaml"), path.with_suffix(".json")
    if (path / "detector.json").exists():
        det = OneClassDetector.load(path)
        if record_path.exists():
            return det, json.loads(record_path.read_text())
        return det, _record(spec, det.make_config("custom"), images, None)
    c = cell.cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(run_config(c, spec, len(images)), recipe)
    scorer = spec.scorer or ("own" if spec.binary else c.scorer)
    # every image trains (holdout=0): the study uses no threshold
    det = OneClassDetector(recipe=str(recipe), scorer=scorer, k=None, holdout=0)
    record = _record(spec, det.make_config("custom"), images, None)
    cell.log(f"[{cell.tag()}] training {spec.label} on {len(images)} images, {spec.steps} steps")
    tic, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():  # the study sets no threshold: the warning would be noise
        warnings.filterwarnings("ignore", message="no images were held out")
        det.fit(images)
    # wall and CPU seconds (all threads): on a shared machine only the CPU time extrapolates
    record["train_s"] = round(time.perf_counter() - tic, 1)
    record["train_cpu_s"] = round(time.process_time() - cpu, 1)
    det.save(path)
    atomic_write_json(record_path, record)
    return det, record


def _record(spec: ModelSpec, run: RunConfig, images: torch.Tensor, train_s) -> dict[str, Any]:
    width = f"{run.model.backbone}@{run.model.width:g}"
    return {
        "init_seed": run.train.seed,
        "init_digest": init_digest(run, images.shape[1]),
        "sgd_steps": spec.steps,
        "n_images": len(images),
        "backbone": width,
        "train_s": train_s,
    }


def evaluate(cell: Cell, det, label: str, attack: bool = True, checks: bool = False) -> dict:
    """Clean AUROC on the full test split and, with ``attack``, attacked AUROC on the
    stratified subset (APGD on the exact score, the detector's surrogates and a pixel-space
    target, the strongest per image; with ``checks`` the sweep's strength checks). Cached."""
    from firmad.metrics import evaluate_scores
    from firmad.robustness.attacks import score

    path = cell.out / "eval" / f"{label}.json"
    if path.exists():
        return json.loads(path.read_text())
    c, data = cell.cfg, cell.data
    tic, cpu = time.perf_counter(), time.process_time()
    x = data.test_u8
    s = (
        torch.cat(
            [
                score(det, x[i : i + 1000].float() / 255, c.batch_size)
                for i in range(0, len(x), 1000)
            ]
        )
        .double()
        .numpy()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_name(f"{label}-scores.npy"), s, allow_pickle=False)
    result: dict[str, Any] = {
        "clean_auroc": evaluate_scores(data.test_y.numpy(), s)["auroc"],
        "n_test": len(s),
        "n_test_normal": int((data.test_y == 0).sum()),
        "attacked": {},
        "checks_passed": None,
        "verdicts": [],
    }
    if attack:
        result.update(_attacked(cell, det, label, checks))
    result["seconds"] = round(time.perf_counter() - tic, 1)
    result["cpu_s"] = round(time.process_time() - cpu, 1)
    atomic_write_json(path, result)
    return result


def _attacked(cell: Cell, det, label: str, checks: bool) -> dict[str, Any]:
    from firmad.robustness.audit import offered_surrogates
    from firmad.robustness.evaluate import robust_auroc_sweep

    c, data = cell.cfg, cell.data
    cell.log(f"[{cell.tag()}] attacking {label}" + (" (with strength checks)" if checks else ""))
    # the detector's own surrogates plus a per-image pixel-space target (a typical training
    # normal; normals walk to its rotation) under APGD's schedule: with fixed steps and no
    # target one side of the large-eps check stalls on adversarially trained models
    surrogates = offered_surrogates(det, True, data.train_u8.float() / 255, c.target_share)
    sweep = robust_auroc_sweep(
        det,
        data.attack_x,
        data.attack_y,
        eps_list=c.attack_eps,
        norm=c.attack_norm,
        steps=c.attack_steps,
        schedule=c.attack_schedule,
        seed=cell.seed,
        batch_size=c.batch_size,
        subset=None,
        checks=checks,
        targets_list=("both",),
        n_bootstrap=c.n_bootstrap,
        surrogates=surrogates,
    )
    return {
        "attacked": {str(r["eps"]): r["auroc"] for r in sweep["rows"] if r["target"] == "both"},
        "n_attacked": len(data.attack_y),
        "n_attacked_normal": int((data.attack_y == 0).sum()),
        "checks_passed": sweep.get("passed") if checks else None,
        "verdicts": sweep.get("verdicts", []) if checks else [],
    }

"""The binary branch of a cell: Ilyas et al.'s sets for a binary classifier (normals vs their
synthetic outliers, its logit the anomaly score), the one-class task's surrogate.

``D_det``: every image pushed by targeted L2 PGD under the standard classifier to the *other*
label and relabelled; ``D_rand``: pushed to a random label. Controls: ``flip`` / ``shuffle``
(the clean images with the same labels) and ``flip_noise`` / ``shuffle_noise`` (the clean
images moved in a random direction by as much as the constructed set moved each image, with the
same labels), so that "the perturbation plants label signal" and "noise of that size changes
what 300 steps learn" can be told apart. ``D_clean``: the clean images, true labels (ceiling).

A construction must pass its floors or its stage stops (`ConstructionError`): the smallest
radius of ``reach_eps`` at which >= ``reach_floor`` of the *relabelled* stored uint8 images
reach their target in each direction; an adversarially trained reference that classifies
held-out images (balanced accuracy at a threshold chosen on other images) and still reads the
original label on >= ``reference_floor`` of the relabelled images it reads correctly when
clean; and, where the fresh classifiers train on augmented views, planted targets that survive
those views.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from firmad.io import atomic_write_json
from firmad.robustness.study.config import BINARY_SETS, ConstructionError
from firmad.robustness.study.models import ModelSpec, evaluate, fresh_seed, train_model

# each set of the branch and the construction it comes from (None: the clean images)
PARENT = {
    "D_clean": None,
    "D_det": "D_det",
    "flip": "D_det",
    "flip_noise": "D_det",
    "D_rand": "D_rand",
    "shuffle": "D_rand",
    "shuffle_noise": "D_rand",
}


def run_binary(cell) -> dict[str, Any]:
    c, data = cell.cfg, cell.data
    det_bin, rec_bin = train_model(
        cell, ModelSpec("binary-standard", True, cell.seed, c.train_steps), data.train_u8
    )
    ref_spec = ModelSpec(
        "binary-robust",
        True,
        cell.seed,
        c.reference_steps or c.train_steps,
        extra=tuple(c.binary_robust_set),
    )
    det_ref, rec_ref = train_model(cell, ref_spec, data.train_u8)
    out: dict[str, Any] = {
        "models": {"binary-standard": rec_bin, "binary-robust": rec_ref},
        # the reference vouches through its floors (held-out accuracy, labels kept), which
        # read it on the constructions themselves; it is not attacked
        "reference": evaluate(cell, det_ref, "binary-robust", attack=False),
        "constructions": {},
        "stopped": {},
        "sets": {},
        "transfer": {},
    }
    sources = binary_sources(cell, det_bin)
    _save_clean(cell, *sources)
    held = _held_out(cell, det_bin)
    for name in ("D_det", "D_rand"):
        try:
            out["constructions"][name] = build_set(cell, name, (det_bin, det_ref), sources, held)
        except ConstructionError as error:
            cell.stop(out["stopped"], name, error)
    names = [n for n in BINARY_SETS if PARENT[n] is None or PARENT[n] in out["constructions"]]
    _fresh_models(cell, out, names, None)
    if c.transfer_backbone:
        _fresh_models(cell, out, [n for n in names if n in c.transfer_sets], c.transfer_backbone)
    return out


def _fresh_models(cell, out: dict, names: list[str], backbone: str | None) -> None:
    """A fresh classifier per set (its own init seed), tested; ``backbone``: the transfer
    variant (clean AUROC only)."""
    from firmad.data import load_dataset

    c, sets = cell.cfg, cell.out / "sets"
    for name in names:
        label = f"binary-on_{name}" + ("" if backbone is None else "-transfer")
        spec = ModelSpec(
            label,
            True,
            fresh_seed(cell.seed, label),
            c.train_steps,
            extra=tuple(c.fresh_binary_set),
            backbone=backbone,
            exposure=sets / f"{name}-outliers.npz",
        )
        images = load_dataset(f"npz:{sets / f'{name}.npz'}", split="train").images
        det, record = train_model(cell, spec, images)
        out["models"][label] = record
        attack = c.attack_binary_sets and backbone is None
        out["sets" if backbone is None else "transfer"][name] = evaluate(cell, det, label, attack)


def binary_sources(cell, det_bin) -> tuple[torch.Tensor, torch.Tensor]:
    """N normal training images and one synthetic outlier of each (float), labels 0 / 1."""
    data = cell.data
    gen = torch.Generator().manual_seed(cell.seed * 1009 + 5)
    pick = torch.randperm(len(data.train_u8), generator=gen)[: cell.cfg.construct_n].sort()
    normals = data.train_u8[pick.values].float() / 255
    outliers = _synthetic_outliers(normals, det_bin.config_, gen)
    label = torch.cat([torch.zeros(len(normals)), torch.ones(len(normals))]).long()
    return torch.cat([normals, outliers]), label


def _held_out(cell, det_bin) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out normals (no model trained on them) and one synthetic outlier of each."""
    normals = cell.data.holdout_u8.float() / 255
    gen = torch.Generator().manual_seed(cell.seed * 1009 + 19)
    outliers = _synthetic_outliers(normals, det_bin.config_, gen)
    label = torch.cat([torch.zeros(len(normals)), torch.ones(len(normals))]).long()
    return torch.cat([normals, outliers]), label


def build_set(cell, name: str, models, sources, held) -> dict[str, Any]:
    """Build D_det or D_rand and its controls once: npz files and the construction record.
    ``models``: (standard classifier, robust reference). Raises `ConstructionError` when a
    floor is missed (what was measured is kept in ``<name>-failed.json``)."""
    det_bin, det_ref = models
    sets = cell.out / "sets"
    record, failed = sets / f"{name}-construction.json", sets / f"{name}-failed.json"
    if record.exists():
        return json.loads(record.read_text())
    source, label = sources
    gen = torch.Generator().manual_seed(cell.seed * 1009 + (11 if name == "D_det" else 13))
    target = 1 - label if name == "D_det" else torch.randint(0, 2, (len(source),), generator=gen)
    relabelled = target != label
    tic, cpu = time.perf_counter(), time.process_time()
    meta: dict[str, Any] = {
        "set": name,
        "class": cell.cls,
        "seed": cell.seed,
        "n": len(source),
        "n_relabelled": int(relabelled.sum()),
    }
    try:
        meta["attempts"], images, eps = _reach(cell, name, det_bin, (source, target), relabelled)
        if images is None:
            raise _reach_error(cell, name, meta["attempts"])
        meta.update(eps=eps, reach=meta["attempts"][-1])
        meta["reference"] = _reference_check(
            cell, name, det_ref, (source, images, label), relabelled, held
        )
        meta["survival"] = _survival_check(cell, name, det_bin, images, (target, relabelled))
    except ConstructionError as error:
        atomic_write_json(failed, {**meta, "error": str(error)})
        raise
    failed.unlink(missing_ok=True)
    noise, meta["noise_control"] = _noise_control(source, images, gen)
    meta.update(
        share_relabelled=float(relabelled.float().mean()),
        seconds=round(time.perf_counter() - tic, 1),
        cpu_s=round(time.process_time() - cpu, 1),
    )
    _save_sets(cell, name, (source, images, noise), target, meta)
    atomic_write_json(record, meta)
    return meta


def _reach(cell, name: str, det_bin, pushed, relabelled):
    """Attack the images towards their targets at each radius of ``reach_eps`` until both
    directions reach the floor among the *relabelled* images (the others are pushed further
    into their own label and would reach it for free): the attempts, the stored images and the
    radius (None, None when no radius does)."""
    from firmad.robustness.attacks import pgd, score
    from firmad.robustness.construct import reach_by_target, to_uint8

    c = cell.cfg
    source, target = pushed
    attempts = []
    for eps in c.reach_eps:
        cell.log(f"[{cell.tag()}] building {name}: {len(source)} images, L2 eps {eps:g}")
        # pgd raises the score of label 0 and lowers that of label 1: to reach target t, give
        # label 1 - t (target "outlier" = a higher logit)
        adv = pgd(
            det_bin,
            source,
            1 - target,
            eps=eps,
            norm="l2",
            steps=c.construct_steps,
            targets="both",
            seed=cell.seed,
            batch_size=c.batch_size,
        )
        stored = to_uint8(adv).float() / 255  # what the fresh model will read
        read = score(det_bin, stored[relabelled], c.batch_size)
        attempts.append({"eps": eps, **reach_by_target(read, target[relabelled])})
        if min(attempts[-1]["to_normal"], attempts[-1]["to_outlier"]) >= c.reach_floor:
            return attempts, stored, eps
    return attempts, None, None


def _reach_error(cell, name: str, attempts: list[dict]) -> ConstructionError:
    c, last = cell.cfg, attempts[-1]
    return ConstructionError(
        f"{name} ({cell.tag()}): at the largest radius, L2 eps {c.reach_eps[-1]:g}, only "
        f"{100 * last['to_outlier']:.1f} % of the relabelled stored images reach 'outlier' and "
        f"{100 * last['to_normal']:.1f} % reach 'normal'; the floor is "
        f"{100 * c.reach_floor:.0f} % in each direction. Add larger radii to reach_eps or "
        "raise construct_steps, then run the study again (finished stages are kept)."
    )


def _reference_check(cell, name: str, det_ref, images, relabelled, held) -> dict[str, Any]:
    """The robust reference must classify images it never saw, and still read the original
    label of the relabelled images after the construction. Its threshold is the one with the
    best balanced accuracy on the clean source images (its pool holds three outliers per
    normal, which moves the logits away from 0); its accuracy is read on the held-out images,
    not on the ones the threshold was chosen on."""
    from firmad.robustness.attacks import score

    c = cell.cfg
    source, built, label = images
    clean = score(det_ref, source, c.batch_size)
    threshold = best_threshold(clean, label)
    held_x, held_y = held
    held_ok = (score(det_ref, held_x, c.batch_size) > threshold).long() == held_y
    balanced = float(np.mean([float(held_ok[held_y == k].float().mean()) for k in (0, 1)]))
    if balanced < c.reference_min_accuracy:
        raise ConstructionError(
            f"{name} ({cell.tag()}): the adversarially trained reference classifies only "
            f"{100 * balanced:.1f} % of {len(held_y)} held-out images correctly (balanced "
            f"accuracy; floor {100 * c.reference_min_accuracy:.0f} %), so it cannot tell whether "
            "the construction kept the robust content. Train it longer (reference_steps) or at "
            "a smaller radius (binary_robust_set), then run again."
        )
    clean_ok = (clean > threshold).long() == label
    after_ok = (score(det_ref, built, c.batch_size) > threshold).long() == label
    among = clean_ok & relabelled
    kept = float(after_ok[among].float().mean()) if bool(among.any()) else 0.0
    out = {
        "threshold": float(threshold),
        "held_out_balanced_accuracy": balanced,
        "n_held_out": len(held_y),
        "kept_among_relabelled_clean_correct": kept,
        "n_kept_base": int(among.sum()),
        "floor": c.reference_floor,
    }
    if kept < c.reference_floor:
        raise ConstructionError(
            f"{name} ({cell.tag()}): the adversarially trained reference still reads the "
            f"original label on only {100 * kept:.1f} % of the relabelled images it reads "
            f"correctly when clean (floor {100 * c.reference_floor:.0f} %): the perturbation "
            "changed robust content too. Use smaller radii in reach_eps (more construct_steps), "
            "or a reference trained at a larger radius (binary_robust_set), then run again."
        )
    return out


def _survival_check(cell, name: str, det_bin, images, targets) -> dict[str, Any]:
    """Share of the reached targets (relabelled images) still reached on the views the fresh
    classifiers train with. Not measured where they train without augmentation: their view is
    the stored image, and survival would be 1 by construction."""
    from firmad.config import load_config
    from firmad.factory import build_augment
    from firmad.robustness.attacks import score

    c = cell.cfg
    run = load_config(c.binary_recipe, [*c.set, *c.binary_set, *c.fresh_binary_set])
    augment = build_augment(run)
    if augment is None:
        return {
            "measured": False,
            "reason": "the fresh classifiers train without augmentation: "
            "their view is the stored image, so survival is 1 by construction",
        }
    target, relabelled = targets
    gen = torch.Generator().manual_seed(cell.seed * 1009 + 17)
    x, t = images[relabelled], target[relabelled]
    reached = (score(det_bin, x, c.batch_size) > 0).long() == t
    view = augment(x, gen).clamp(0.0, 1.0)  # colour ops may overshoot by rounding
    kept = (score(det_bin, view, c.batch_size) > 0).long() == t
    share = float(kept[reached].float().mean()) if bool(reached.any()) else 0.0
    if share < c.survival_floor:
        raise ConstructionError(
            f"{name} ({cell.tag()}): only {100 * share:.1f} % of the planted targets survive the "
            f"fresh models' training views (floor {100 * c.survival_floor:.0f} %). Train the "
            "fresh models without augmentation (fresh_binary_set: [augment.enabled=false]), then "
            "run again."
        )
    return {"measured": True, "share": share, "floor": c.survival_floor}


def _noise_control(source: torch.Tensor, built: torch.Tensor, gen) -> tuple[torch.Tensor, dict]:
    """The clean images moved in a random direction by each constructed image's own L2
    distance from its source; stored as uint8 like every set. Returns it and its record."""
    from firmad.robustness.construct import same_norm_noise, to_uint8

    norms = (built - source).reshape(len(source), -1).norm(dim=1)
    noise = to_uint8(same_norm_noise(source, norms, gen)).float() / 255
    achieved = (noise - source).reshape(len(source), -1).norm(dim=1)
    ratio = achieved[norms > 0] / norms[norms > 0]
    return noise, {
        "norm_median": float(norms.median()),
        "achieved_over_target_median": float(ratio.median()) if len(ratio) else None,
    }


def _save_clean(cell, source: torch.Tensor, label: torch.Tensor) -> None:
    from firmad.robustness.construct import save_constructed

    sets = cell.out / "sets"
    if (sets / "D_clean-outliers.json").exists():
        return
    meta = {"set": "D_clean", "class": cell.cls, "seed": cell.seed, "n": len(source)}
    save_constructed(sets / "D_clean.npz", source[label == 0], label[label == 0], meta)
    save_constructed(sets / "D_clean-outliers.npz", source[label == 1], label[label == 1], meta)


def _save_sets(cell, name: str, images: tuple, target: torch.Tensor, meta: dict) -> None:
    """The constructed set ``name`` and its two controls as npz files (normals and outliers
    apart, labelled by target), and a picture: originals, constructed, perturbation, noise."""
    from firmad.robustness.construct import centre_perturbation, sample_grid_png, save_constructed

    sets = cell.out / "sets"
    source, built, noise = images
    control = "flip" if name == "D_det" else "shuffle"
    for set_name, x in ((name, built), (control, source), (f"{control}_noise", noise)):
        save_constructed(sets / f"{set_name}.npz", x[target == 0], target[target == 0], meta)
        save_constructed(
            sets / f"{set_name}-outliers.npz", x[target == 1], target[target == 1], meta
        )
    show = torch.cat([torch.arange(4), len(source) // 2 + torch.arange(4)])
    sample_grid_png(
        sets / f"{name}.png",
        {
            "original": source[show],
            name: built[show],
            "perturbation": centre_perturbation(built[show] - source[show]),
            f"{control}_noise": noise[show],
        },
    )


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


def _synthetic_outliers(images: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """One of the recipe's synthetic outlier kinds (rotations if it has none) per image."""
    from firmad.outliers import apply_kinds, parse_outliers

    kinds = parse_outliers(cfg.outliers.kinds or ["rot90", "rot180", "rot270"])
    kind_ids = torch.randint(1, len(kinds) + 1, (len(images),), generator=gen)
    return apply_kinds(images, kind_ids, kinds, gen)

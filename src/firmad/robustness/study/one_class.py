"""The one-class branch of a cell: the paper's question asked of FIRM detectors.

A standard and an adversarially trained ("robust") FIRM encoder learn the class. The robust
one must earn its name (`robust_floor`): at ``robust_floor_eps`` its attacked AUROC lies at
least ``robust_floor_margin`` above the standard one's and its strength checks pass, else the
D_R stage stops. ``invert_n`` normal training images are inverted through each encoder
(`firmad.robustness.construct.invert_features`: cosine distance on the features the kNN scorer
reads, Adam on a sigmoid parametrisation) from two kinds of start: other-class training images
(Ilyas et al.'s choice: the start's robust content contradicts the target's class) and a
class-free mid-grey image (uniform in [0.45, 0.55]: no content, and no speckle to undo, which
uniform noise starts leave behind). A seconds-long reachability check (targets from themselves
plus noise) first tells an optimiser failure from an unreachable target; an inversion that does
not converge (median final/initial distance <= ``convergence_ratio`` and >=
``convergence_share`` of the stored images closer to their target than its nearest other
normal) stops its stage. Fresh FIRM detectors (their own init seeds) train on each set, on its
starts (the control) and on the real normals aimed at (the ceiling); clean and attacked AUROC.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from firmad.io import atomic_write_json
from firmad.robustness.construct import to_uint8
from firmad.robustness.study.celldata import other_class_images
from firmad.robustness.study.config import ConstructionError, StudyConfig
from firmad.robustness.study.models import ModelSpec, evaluate, fresh_seed, train_model

ENCODERS = ("D_R", "D_NR")  # the set an encoder's inversions make: robust, standard


def run_one_class(cell) -> dict[str, Any]:
    c = cell.cfg
    out: dict[str, Any] = {
        "models": {},
        "stopped": {},
        "constructions": {},
        "reachability": {},
        "sets": {},
        "transfer": {},
    }
    std, rob = _source_models(cell, out)
    encoders = {"D_NR": std, **({"D_R": rob} if out["robust_floor"]["passed"] else {})}
    pick, starts = _targets_and_starts(cell)
    for enc, det in encoders.items():
        _inversions(cell, out, (enc, det), pick, starts)
    _picture(cell, pick, starts)
    train = {"normals": cell.data.train_u8[pick]}
    for kind, start in starts.items():
        train[f"starts-{kind}"] = to_uint8(start)  # exact: the starts are uint8 values
        train.update(
            {
                f"{e}-{kind}": _stored(cell, f"{e}-{kind}")
                for e in ENCODERS
                if f"{e}-{kind}" in out["constructions"]
            }
        )
    _fresh_models(cell, out, train, None)
    if c.transfer_backbone:
        chosen = {k: v for k, v in train.items() if k in c.transfer_sets}
        _fresh_models(cell, out, chosen, c.transfer_backbone)
    if c.probe_radii:
        out["probe"] = {k: _probe(cell, d, k) for k, d in (("standard", std), ("robust", rob))}
    if c.drift_eps:
        out["drift"] = {k: _drift(cell, d, k) for k, d in (("standard", std), ("robust", rob))}
    return out


def _source_models(cell, out: dict):
    """The standard and robust encoders of the cell, tested, and the robust one's floor."""
    c, data = cell.cfg, cell.data
    specs = (
        ModelSpec("standard", False, cell.seed, c.train_steps),
        ModelSpec("robust", False, cell.seed, c.train_steps, extra=tuple(c.robust_set)),
    )
    (std, out["models"]["standard"]), (rob, out["models"]["robust"]) = (
        train_model(cell, spec, data.train_u8) for spec in specs
    )
    out["sets"]["D"] = evaluate(cell, std, "standard")
    out["robust"] = evaluate(cell, rob, "robust", checks=c.robust_checks)
    out["robust_floor"] = robust_floor(c, out["sets"]["D"], out["robust"])
    if not out["robust_floor"]["passed"]:
        cell.stop(out["stopped"], "robust_floor", _floor_error(cell, out["robust_floor"]))
    return std, rob


def _inversions(cell, out: dict, encoder, pick, starts: dict) -> None:
    """One encoder's reachability check and its inversions from every kind of start; an
    inversion that does not converge is recorded with its measurements and stops its set."""
    enc, det = encoder
    nearest = _nearest(cell, det, pick)
    reach = out["reachability"][enc] = _reachability(cell, enc, det, (pick, nearest))
    for kind, start in starts.items():
        name = f"{enc}-{kind}"
        try:
            out["constructions"][name] = inverted_set(
                cell, name, det, (pick, start, nearest), reach
            )
        except ConstructionError as error:
            cell.stop(out["stopped"], name, error)
            failed = json.loads((cell.out / "sets" / f"{name}-failed.json").read_text())
            out.setdefault("failed_constructions", {})[name] = failed


def robust_floor(cfg: StudyConfig, standard: dict, robust: dict) -> dict[str, Any]:
    """Is the robust encoder robust? Its attacked AUROC at ``robust_floor_eps`` minus the
    standard encoder's of the same cell, against ``robust_floor_margin``; and its strength
    checks (when the study runs them)."""
    e = str(float(cfg.robust_floor_eps))
    rob, std = robust["attacked"].get(e), standard["attacked"].get(e)
    checks = robust["checks_passed"] if cfg.robust_checks else None
    gain = None if rob is None or std is None else rob - std
    passed = gain is not None and gain >= cfg.robust_floor_margin and checks is not False
    return {
        "eps": cfg.robust_floor_eps,
        "robust": rob,
        "standard": std,
        "gain": gain,
        "margin": cfg.robust_floor_margin,
        "checks_passed": checks,
        "passed": passed,
    }


def _floor_error(cell, floor: dict) -> ConstructionError:
    def pct(v):
        return "not measured" if v is None else f"{100 * v:.1f}"

    return ConstructionError(
        f"D_R ({cell.tag()}): the robust encoder is not robust enough to make D_R: at "
        f"{cell.cfg.attack_norm} eps {floor['eps']:g} its attacked AUROC is {pct(floor['robust'])}"
        f" against the standard encoder's {pct(floor['standard'])} (it must be "
        f"{100 * floor['margin']:.0f} points above), strength checks passed: "
        f"{floor['checks_passed']}. Train it harder (robust_set: more PGD steps, train_steps), "
        "then run again."
    )


def _targets_and_starts(cell) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The normals to invert (indices into the training normals) and, per start kind, their
    starts (float images that are exact uint8 values: the starts control trains on them)."""
    c, data = cell.cfg, cell.data
    gen = torch.Generator().manual_seed(cell.seed * 1009 + 7)
    pick = torch.randperm(len(data.train_u8), generator=gen)[: c.invert_n].sort().values
    shape = data.train_u8[pick].shape
    starts = {}
    for kind in c.inversion_starts:
        gen = torch.Generator().manual_seed(cell.seed * 1009 + (23 if kind == "other" else 29))
        if kind == "other":
            starts[kind] = other_class_images(c, cell.cls, len(pick), gen).float() / 255
        else:
            starts[kind] = ((0.45 + 0.1 * torch.rand(shape, generator=gen)) * 255).round() / 255
    return pick, starts


def _nearest(cell, det, pick) -> torch.Tensor:
    """Each target's cosine distance to its nearest other training normal (this encoder)."""
    from firmad.robustness.construct import nearest_other_distance

    return nearest_other_distance(det.extractor_, cell.data.train_u8, pick, cell.cfg.batch_size)


def _reachability(cell, enc: str, det, targets) -> dict[str, Any]:
    """Invert the first ``reachability_n`` targets from themselves plus noise (cached)."""
    from firmad.robustness.construct import inversion_convergence, invert_features, near_starts

    path = cell.out / "sets" / f"reachability-{enc}.json"
    if path.exists():
        return json.loads(path.read_text())
    c = cell.cfg
    pick, nearest = targets
    n = min(c.reachability_n, len(pick))
    x = cell.data.train_u8[pick[:n]].float() / 255
    start = near_starts(x, c.reachability_noise, torch.Generator().manual_seed(cell.seed + 31))
    tic = time.perf_counter()
    _, final, initial = invert_features(
        det.extractor_, x, start, c.reachability_steps, c.inversion_lr, c.batch_size
    )
    conv = inversion_convergence(
        final, initial, nearest[:n], c.convergence_ratio, c.convergence_share
    )
    out = {
        **conv,
        "reached": conv["converged"],
        "n": n,
        "steps": c.reachability_steps,
        "noise": c.reachability_noise,
        "seconds": round(time.perf_counter() - tic, 1),
    }
    atomic_write_json(path, out)
    return out


def inverted_set(cell, name: str, det, targets, reach: dict) -> dict[str, Any]:
    """D_R-* / D_NR-*: invert the normals ``pick`` from ``start`` (built once), then measure
    convergence on the stored uint8 images. ``targets``: (pick, start, nearest). Raises
    `ConstructionError` (with what was measured in ``<name>-failed.json``) when the inversion
    did not converge."""
    from firmad.robustness.construct import (
        feature_distance,
        inversion_convergence,
        invert_features,
        save_constructed,
        to_uint8,
    )

    sets = cell.out / "sets"
    record, failed, npz = (
        sets / f"{name}{s}" for s in ("-construction.json", "-failed.json", ".npz")
    )
    if record.exists():
        return json.loads(record.read_text())
    c = cell.cfg
    pick, start, nearest = targets
    x = cell.data.train_u8[pick]
    if not npz.with_suffix(".json").exists():
        cell.log(f"[{cell.tag()}] building {name}: {len(x)} inversions, {c.inversion_steps} steps")
        tic, cpu = time.perf_counter(), time.process_time()
        images, _, _ = invert_features(
            det.extractor_, x, start, c.inversion_steps, c.inversion_lr, c.batch_size
        )
        meta = {
            "set": name,
            "class": cell.cls,
            "seed": cell.seed,
            "n": len(x),
            "steps": c.inversion_steps,
            "lr": c.inversion_lr,
            "seconds": round(time.perf_counter() - tic, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
        save_constructed(npz, to_uint8(images), np.zeros(len(x), np.int64), meta)
    meta = json.loads(npz.with_suffix(".json").read_text())
    stored = _stored(cell, name)
    fn, bs = det.extractor_, c.batch_size
    final, initial = feature_distance(fn, stored, x, bs), feature_distance(fn, start, x, bs)
    meta["convergence"] = inversion_convergence(
        final, initial, nearest, c.convergence_ratio, c.convergence_share
    )
    if not meta["convergence"]["converged"]:
        error = _convergence_error(cell, name, meta["convergence"], reach)
        atomic_write_json(failed, {**meta, "error": str(error)})
        raise error
    failed.unlink(missing_ok=True)
    atomic_write_json(record, meta)
    return meta


def _convergence_error(cell, name: str, conv: dict, reach: dict) -> ConstructionError:
    c = cell.cfg
    why = (
        "the same optimiser matched targets from close by (reachability check passed), so "
        "these targets are not reached from these starts in this many steps: raise "
        "inversion_steps"
        if reach["reached"]
        else "the optimiser did not even match targets from close by (reachability check "
        f"failed: median ratio {reach['median_ratio']:.3f}), so its settings are wrong: "
        "change inversion_lr"
    )
    return ConstructionError(
        f"{name} ({cell.tag()}): the inversion did not converge: median final/initial "
        f"distance {conv['median_ratio']:.3f} (floor {c.convergence_ratio:g}), "
        f"{100 * conv['share_below_nearest']:.0f} % of the images closer to their target than "
        f"its nearest other normal (floor {100 * c.convergence_share:.0f} %); {why}."
    )


def _stored(cell, name: str) -> torch.Tensor:
    from firmad.data import load_dataset

    return load_dataset(f"npz:{cell.out / 'sets' / f'{name}.npz'}", split="train").images


def _picture(cell, pick, starts: dict) -> None:
    """Targets, starts and the inversions (converged or not) side by side, first 8 each."""
    from firmad.robustness.construct import sample_grid_png

    rows = {"target": cell.data.train_u8[pick[:8]]}
    for kind, start in starts.items():
        rows[f"start ({kind})"] = start[:8]
        for enc in ENCODERS:
            if (cell.out / "sets" / f"{enc}-{kind}.json").exists():
                rows[f"{enc}-{kind}"] = _stored(cell, f"{enc}-{kind}")[:8]
    sample_grid_png(cell.out / "sets" / "inversions.png", rows)


def _fresh_models(cell, out: dict, train: dict, backbone: str | None) -> None:
    """A fresh FIRM detector per set (its own init seed), tested: clean and attacked AUROC,
    or clean only for the transfer variant (``backbone``)."""
    c = cell.cfg
    for name, images in train.items():
        label = f"on_{name}" + ("" if backbone is None else "-transfer")
        spec = ModelSpec(
            label, False, fresh_seed(cell.seed, label), c.train_steps, backbone=backbone
        )
        det, record = train_model(cell, spec, images)
        out["models"][label] = record
        key = "sets" if backbone is None else "transfer"
        out[key][name] = evaluate(cell, det, label, attack=backbone is None)


def _probe(cell, det, label: str) -> list[dict]:
    from firmad.robustness.probes import texture_probe

    path = cell.out / "eval" / f"probe-{label}.json"
    if path.exists():
        return json.loads(path.read_text())
    c, data = cell.cfg, cell.data
    rows = texture_probe(
        lambda x: det.score_tensor(x),
        data.attack_x,
        data.attack_y,
        c.probe_radii,
        c.probe_grids,
        c.batch_size,
        cell.seed,
    )
    atomic_write_json(path, rows)
    return rows


def _drift(cell, det, label: str) -> list[dict]:
    """Per ε: mean score shift of normals and of each anomaly class, in units of the clean
    normals' score standard deviation (attacked both ways)."""
    from firmad.robustness.attacks import pgd, score

    path = cell.out / "eval" / f"drift-{label}.json"
    if path.exists():
        return json.loads(path.read_text())
    c, data = cell.cfg, cell.data
    x, y = data.attack_x, data.attack_y
    clean = score(det, x, c.batch_size)
    normal = y == 0
    unit = float(clean[normal].std()) or 1.0
    rows = []
    for eps in c.drift_eps:
        adv = (
            x
            if eps == 0
            else pgd(
                det,
                x,
                y,
                eps=eps,
                norm=c.attack_norm,
                steps=c.attack_steps,
                seed=cell.seed,
                batch_size=c.batch_size,
            )
        )
        shift = (score(det, adv, c.batch_size) - clean) / unit
        row = {"eps": eps, "normal": float(shift[normal].mean())}
        for cls in torch.unique(data.attack_classes[~normal]).tolist():
            key = f"class {cls}" + (" (held out)" if cls in c.drift_held_out else "")
            row[key] = float(shift[data.attack_classes == cls].mean())
        rows.append(row)
    atomic_write_json(path, rows)
    return rows

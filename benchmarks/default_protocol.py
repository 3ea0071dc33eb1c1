"""The protocol that chooses `firmad fit`'s default budget and scorer (RESULTS.md, "The default
detector"): a user's folder of normal image files, `fit`'s own code path, its own threshold.

Per normal class and seed: 1 000 training images of that Fashion-MNIST class drawn with the
seed and written as files the way users have them (PNG and JPEG, some at 64 x 64); a test
folder per class (300 unseen normals + 100 of each other class, test split, drawn once). For
each budget one detector is trained as `firmad fit --steps B --seed S` trains it (200 of the
1 000 held out for the threshold); each candidate scorer is fitted on the same network and
bank and thresholded on the same held-out images at a 5 % target (the conformal rule). Per
candidate: AUROC, the share of test normals flagged, recall overall and per anomaly class at
the detector's own threshold, and the fit's CPU and wall seconds.

    python benchmarks/default_protocol.py run --out runs/protocol --classes 0 2 4 --seeds 0 1 2
    python benchmarks/default_protocol.py table --out runs/protocol

Protocol II (RESULTS.md, "The default detector II"): the shipped training (1 500 steps), and
Mahalanobis scored plain, angled (4 rotations) or as the crop ensemble, on the same folders:

    python benchmarks/default_protocol.py run2 --out runs/protocol --classes 0 2 4 6 7 8
    python benchmarks/default_protocol.py table2 --out runs/protocol

Protocol III (RESULTS.md, "The default detector III"): fresh folders (training seeds 10-12, a
new test draw), the shipped training, Mahalanobis against the rotation scorer:

    python benchmarks/default_protocol.py run3 --out runs/protocol3 --classes 0 2 4 6 7 8
    python benchmarks/default_protocol.py table3 --out runs/protocol3

Protocol IV (RESULTS.md, "The default detector IV"): fresh folders again (training seeds 30-32,
another test draw); `fit`'s training with the recipe's crops and with milder ones, each scored
by Mahalanobis and by maha_rotation (Mahalanobis and the rotation scorer, standardised):

    python benchmarks/default_protocol.py run4 --out runs/protocol4 --classes 0 2 4 6 7 8
    python benchmarks/default_protocol.py table4 --out runs/protocol4

`run` resumes: a (class, seed, budget) with its JSON is not trained again. Run two at once
with one thread each (`--threads 1`, the default) on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from firmad import calibration as cal
from firmad.data.sources import load_dataset
from firmad.detector import OneClassDetector
from firmad.fitting import FitOptions, detector_for_fit, fit_images
from firmad.inputs import find_images, load_files

BUDGETS = (400, 1500, 3000)
SCORERS = ("knn_cos:k=5", "mahalanobis", "z-mean(knn_cos:k=5, mahalanobis)")
CANDIDATES = SCORERS[:2]  # the ensemble is reported beside them, not a candidate (no scorer yet)
CHOOSE, CONFIRM = (0, 2, 4), (6, 7, 8)
TARGET = 0.05
N_TRAIN, N_TEST_NORMAL, N_TEST_OTHER = 1000, 300, 100
TIE = 0.3  # AUROC points: a cheaper candidate this close to the best is chosen instead


def _write(image: np.ndarray, path: Path, index: int) -> Path:
    """One 28 x 28 grey image as a user's file: PNG or JPEG, every third one at 64 x 64."""
    img = Image.fromarray(image)
    if index % 3 == 2:
        img = img.resize((64, 64), Image.BICUBIC)
    if index % 2:
        path = path.with_suffix(".jpg")
        img.save(path, quality=95)
    else:
        path = path.with_suffix(".png")
        img.save(path)
    return path


def make_train_folder(out: Path, images: np.ndarray, labels: np.ndarray, c: int, seed: int) -> Path:
    folder = out / "data" / f"train-c{c}-s{seed}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.flatnonzero(labels == c)
    pick = np.random.default_rng(seed).choice(ids, N_TRAIN, replace=False)
    for i, j in enumerate(pick):
        _write(images[j], folder / f"img{i:04d}", i)
    (folder / "done").write_text("")
    return folder


def make_test_folder(out: Path, images: np.ndarray, labels: np.ndarray, c: int,
                     draw: int = 1234) -> Path:  # fmt: skip
    """Test files named by their true class (label_i.ext); drawn once per class (seed draw + c:
    1234 for protocols I and II, `DRAW_III` for the fresh folders of protocol III)."""
    folder = out / "data" / f"test-c{c}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(draw + c)
    for k in range(10):
        n = N_TEST_NORMAL if k == c else N_TEST_OTHER
        for i, j in enumerate(rng.choice(np.flatnonzero(labels == k), n, replace=False)):
            _write(images[j], folder / f"{k}_{i:04d}", i)
    (folder / "done").write_text("")
    return folder


def measure(scores: np.ndarray, threshold: float, true: np.ndarray, c: int) -> dict:
    anomaly = true != c
    flagged = scores > threshold
    per_class = {
        str(k): float(flagged[true == k].mean()) for k in range(10) if k != c
    }  # fmt: skip
    return {
        "auroc": float(roc_auc_score(anomaly, scores)),
        "fpr": float(flagged[~anomaly].mean()),
        "recall": float(flagged[anomaly].mean()),
        "recall_per_class": per_class,
        "threshold": float(threshold),
    }


@dataclass
class Trial:
    """One detector trained as `fit` trains it on a training folder, and the test folder it is
    measured on: ``kept`` marks the bank images, ``held`` the held-out ones."""

    det: OneClassDetector
    images: torch.Tensor
    files: list[Path]
    true: np.ndarray
    held: torch.Tensor
    kept: torch.Tensor
    fit_s: float
    fit_cpu_s: float

    def detector(self, scorer: str, variant: str = "plain") -> OneClassDetector:
        """Another scorer on the same network, bank and held-out images."""
        one = OneClassDetector.from_model(self.det.model_, self.det.config_, scorer=scorer,
                                          k=None, variant=variant)  # fmt: skip
        return one.fit_bank(self.images[self.kept]).calibrate(
            self.images[self.held], target_fpr=TARGET
        )

    def save(self, path: Path, c: int, seed: int, budget: int, rows: dict, **extra) -> None:
        record = {
            "class": c, "seed": seed, "budget": budget, "fit_s": round(self.fit_s, 1),
            "fit_cpu_s": round(self.fit_cpu_s, 1), "threads": torch.get_num_threads(),
            "n_train": int(self.kept.sum()), "n_held": len(self.held), "n_test": len(self.files),
            "numerics": self.det.config_.train.amp, "scorers": rows, **extra,
        }  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))


# The training and scorer `fit` shipped while protocols I-IV ran: the recipe's random crops and
# Mahalanobis, plain. Pinned, so that each protocol's script trains what it trained then,
# whatever `fit`'s defaults are now (a later override, e.g. protocol IV's milder crops, wins).
RECIPE_CROP = "augment.scale=[0.25,1.0]"


def as_shipped_then(seed: int, overrides: tuple[str, ...] = (), **kwargs) -> FitOptions:
    """`fit`'s options as protocols I-IV ran them (``kwargs``: steps, scorer)."""
    kwargs.setdefault("scorer", "mahalanobis")
    return FitOptions(seed=seed, verbose=False, variant="plain",
                      overrides=[RECIPE_CROP, *overrides], **kwargs)  # fmt: skip


def train_trial(opts: FitOptions, train: Path, test: Path) -> Trial:
    det = detector_for_fit(opts)
    images = fit_images(train, det, say=lambda m: None, warn=lambda m: None)
    tic, cpu = time.perf_counter(), time.process_time()
    det.fit(images)
    fit_s, fit_cpu_s = time.perf_counter() - tic, time.process_time() - cpu
    files = find_images([test])[0]
    true = np.array([int(f.name.split("_")[0]) for f in files])
    held = torch.as_tensor(det.heldout_indices_)
    kept = torch.ones(len(images), dtype=torch.bool)
    kept[held] = False
    return Trial(det, images, files, true, held, kept, fit_s, fit_cpu_s)


def _standardised(test: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A score standardised on the held-out normals (test, held-out)."""
    return (test - held.mean()) / held.std(), (held - held.mean()) / held.std()


def _mean_of(a: tuple, b: tuple, true: np.ndarray, c: int) -> dict:
    """The rank-free ensemble of two standardised scores, thresholded on its held-out scores."""
    test, held = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
    return measure(test, cal.conformal_threshold(held, TARGET), true, c)


def run_one(out: Path, train: Path, test: Path, c: int, seed: int, budget: int) -> None:
    path = out / "results" / f"c{c}-s{seed}-b{budget}.json"
    if path.exists():
        return
    # the kNN row by name: `fit`'s default scorer changed (to Mahalanobis) during the protocol
    t = train_trial(as_shipped_then(seed, steps=budget, scorer="knn_cos:k=5"), train, test)
    maha = t.detector("mahalanobis")
    knn_scores, maha_scores = t.det.decision_function(t.files), maha.decision_function(t.files)
    rows = {
        "knn_cos:k=5": measure(knn_scores, t.det.threshold_, t.true, c),
        "mahalanobis": measure(maha_scores, maha.threshold_, t.true, c),
        SCORERS[2]: _mean_of(_standardised(knn_scores, t.det.heldout_scores_),
                             _standardised(maha_scores, maha.heldout_scores_), t.true, c),
    }  # fmt: skip
    t.save(path, c, seed, budget, rows)
    knn = rows["knn_cos:k=5"]
    print(
        f"class {c} seed {seed} budget {budget}: fit {t.fit_s:.0f} s; AUROC knn "
        f"{100 * knn['auroc']:.1f}, maha {100 * rows['mahalanobis']['auroc']:.1f}, ens "
        f"{100 * rows[SCORERS[2]]['auroc']:.1f}",
        flush=True,
    )


VARIANTS_II = ("plain", "angled", "ensemble")  # the candidates, cheapest first
BESIDE_II = ("knn_cos:k=5/angled", "z-mean(mahalanobis/angled, pixel-knn)")


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Grey pixels in [0, 1], one row per image (the raw-pixel kNN beside the candidates)."""
    return images[:, 0].reshape(len(images), -1).double() / 255.0


def _pixel_knn(bank: torch.Tensor, x: torch.Tensor, k: int = 5) -> np.ndarray:
    return torch.cdist(x, bank).topk(k, largest=False).values.mean(1).numpy()


def _scored(t: Trial, name: str, c: int) -> tuple[dict, tuple, float]:
    """One "scorer/variant" on a trial's network, bank and held-out images: its measured row
    (with the scoring CPU ms per test file), its (test, held-out) scores, and the CPU ms its
    fitting and calibration took."""
    scorer, variant = name.split("/")
    cpu = time.process_time()
    one = t.detector(scorer, variant)
    fit_ms = 1000 * (time.process_time() - cpu)
    cpu = time.process_time()
    scores = one.decision_function(t.files)
    row = measure(scores, one.threshold_, t.true, c)
    row["score_cpu_ms_per_image"] = 1000 * (time.process_time() - cpu) / len(t.files)
    return row, (scores, one.heldout_scores_), fit_ms


def run_two(out: Path, train: Path, test: Path, c: int, seed: int) -> None:
    """Protocol II for one (class, seed): `fit`'s default training, then each candidate
    variant of Mahalanobis (and the rows beside them) on the same network, bank and held-out."""
    path = out / "results-ii" / f"c{c}-s{seed}.json"
    if path.exists():
        return
    t = train_trial(as_shipped_then(seed), train, test)
    rows, raw = {}, {}
    for scorer, variant in [("mahalanobis", v) for v in VARIANTS_II] + [("knn_cos:k=5", "angled")]:
        name = f"{scorer}/{variant}"
        rows[name], raw[name], _ = _scored(t, name, c)
    test_images = load_files(t.files, t.det.size, t.det.config_.data.channels)
    bank, held = _pixels(t.images[t.kept]), _pixels(t.images[t.held])
    pix = _standardised(_pixel_knn(bank, _pixels(test_images)), _pixel_knn(bank, held))
    rows[BESIDE_II[1]] = _mean_of(_standardised(*raw["mahalanobis/angled"]), pix, t.true, c)
    t.save(path, c, seed, t.det.steps, rows)
    print(f"class {c} seed {seed}: fit {t.fit_s:.0f} s; AUROC " + ", ".join(
        f"{n} {100 * r['auroc']:.1f}" for n, r in rows.items()), flush=True)  # fmt: skip


def choose_two(records: list[dict]) -> tuple[str, dict]:
    """Protocol II's rule: highest mean AUROC over the choice cells; a cheaper variant within
    TIE points of it is chosen instead. Compared on the (class, seed) cells all records share."""
    cells = sorted((r["class"], r["seed"]) for r in records if r["class"] in CHOOSE)
    means = {
        v: 100 * float(np.mean([r["scorers"][f"mahalanobis/{v}"]["auroc"] for r in records
                                if r["class"] in CHOOSE]))
        for v in VARIANTS_II
    }  # fmt: skip
    best = max(means.values())
    pick = next(v for v in VARIANTS_II if means[v] >= best - TIE)
    return pick, {"means": means, "cells": cells}


def print_scorer_table(records: list[dict], rows: list[str], pick: str) -> None:
    """The markdown table of protocols II and III: per scorer row, AUROC, recall and FPR over
    the choice and the confirmation cells, and the scoring time; the chosen row marked."""
    print("| scorer | choice 0, 2, 4: AUROC | recall | FPR | confirm 6, 7, 8: AUROC | recall "
          "| FPR | scoring CPU ms / image |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---:|")
    for s in rows:
        cols = []
        for group in (CHOOSE, CONFIRM):
            sel = [r["scorers"][s] for r in records if r["class"] in group]
            cols += [
                _mean_ci([x[k] for x in sel]) if sel else "—" for k in ("auroc", "recall", "fpr")
            ]
        ms = [r["scorers"][s].get("score_cpu_ms_per_image") for r in records]
        ms = f"{np.mean(ms):.2f}" if ms and ms[0] is not None else "—"
        mark = " **(chosen)**" if s == pick else ""
        print(f"| {s}{mark} | " + " | ".join(cols) + f" | {ms} |")


def cmd_table_two(args: argparse.Namespace) -> None:
    records = _load(args.out, "results-ii")
    names = load_dataset("fashion-mnist", "test").classes
    pick, info = choose_two(records)
    print_scorer_table(records, [f"mahalanobis/{v}" for v in VARIANTS_II] + list(BESIDE_II),
                       f"mahalanobis/{pick}")  # fmt: skip
    print(f"\nchosen: mahalanobis/{pick} (rule: max mean AUROC on {CHOOSE}, cheaper within {TIE})")
    print("cells:", info["cells"])
    print("means:", {v: round(m, 2) for v, m in info["means"].items()})
    print("\nPer normal class (mean over seeds; % flagged per anomaly class):")
    for c in CHOOSE + CONFIRM:
        for s in dict.fromkeys(["mahalanobis/plain", f"mahalanobis/{pick}"]):
            sel = [r["scorers"][s] for r in records if r["class"] == c]
            if sel:
                print(summary(sel, names, c, s, with_range=True))


CANDIDATES_III = ("mahalanobis/plain", "rotation/plain", "rotation/angled")  # cheapest first
BESIDE_III = ("mahalanobis/angled",)
SEEDS_III, DRAW_III = (10, 11, 12), 5678
GUARD_III = 0.5  # AUROC points the choice may lose on the confirmation classes


def run_three(out: Path, train: Path, test: Path, c: int, seed: int) -> None:
    """Protocol III for one (class, seed): `fit`'s default training, then every candidate (and
    the row beside them) on the same network, bank and held-out images."""
    path = out / "results-iii" / f"c{c}-s{seed}.json"
    if path.exists():
        return
    t = train_trial(as_shipped_then(seed), train, test)
    rows = {}
    for name in CANDIDATES_III + BESIDE_III:
        rows[name], _, fit_ms = _scored(t, name, c)
        rows[name]["scorer_fit_cpu_ms"] = fit_ms
    t.save(path, c, seed, t.det.steps, rows)
    print(f"class {c} seed {seed}: fit {t.fit_s:.0f} s; AUROC " + ", ".join(
        f"{n} {100 * r['auroc']:.1f}" for n, r in rows.items()), flush=True)  # fmt: skip


def choose_guarded(records: list[dict], candidates: tuple[str, ...]) -> tuple[str, dict]:
    """Protocols III and IV's rule: highest mean AUROC over the choice cells, a cheaper
    candidate (earlier in ``candidates``) within TIE points of it chosen instead; then the
    guard: a choice other than the shipped one (the first) whose mean AUROC on the confirmation
    classes is more than GUARD_III points below the shipped one's is dropped, and the shipped
    one stays."""

    def mean(name: str, group: tuple[int, ...]) -> float:
        return 100 * float(np.mean([r["scorers"][name]["auroc"] for r in records
                                    if r["class"] in group]))  # fmt: skip

    means = {n: mean(n, CHOOSE) for n in candidates}
    best = max(means.values())
    pick = next(n for n in candidates if means[n] >= best - TIE)
    confirm = {n: mean(n, CONFIRM) for n in candidates}
    guarded = pick != candidates[0] and confirm[pick] < confirm[candidates[0]] - GUARD_III
    cells = sorted((r["class"], r["seed"]) for r in records)
    info = {"means": means, "confirm": confirm, "by_rule": pick, "guard": guarded, "cells": cells}
    return (candidates[0] if guarded else pick), info


def print_choice(records: list[dict], candidates: tuple[str, ...], beside: tuple[str, ...],
                 extra: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Protocols III and IV's table, the rule's answer and the per-class lines of the shipped
    candidate, the chosen one and ``extra``."""
    names = load_dataset("fashion-mnist", "test").classes
    pick, info = choose_guarded(records, candidates)
    print_scorer_table(records, list(candidates + beside), pick)
    print(f"\nchosen: {pick} (rule: max mean AUROC on {CHOOSE}, cheaper within {TIE}; guard "
          f"{GUARD_III} on {CONFIRM})")  # fmt: skip
    print("cells:", info["cells"])
    for key in ("means", "confirm"):
        print(f"{key}:", {n: round(m, 2) for n, m in info[key].items()})
    print("by the rule alone:", info["by_rule"], "| dropped by the guard:", info["guard"])
    print("\nPer normal class (mean over seeds; % flagged per anomaly class):")
    for c in CHOOSE + CONFIRM:
        for s in dict.fromkeys([candidates[0], pick, *extra]):
            sel = [r["scorers"][s] for r in records if r["class"] == c]
            if sel:
                print(summary(sel, names, c, s, with_range=True))


def cmd_table_three(args: argparse.Namespace) -> None:
    print_choice(_load(args.out, "results-iii"), CANDIDATES_III, BESIDE_III, ("rotation/angled",))


def cmd_run_three(args: argparse.Namespace) -> None:
    run_cells(args, run_three, DRAW_III)


CROP_IV = "augment.scale=[0.6,1.0]"  # milder random crops than the recipe's [0.25, 1.0]
# name: (training overrides, scorer/variant); cheapest first (the shipped detector first)
CANDIDATES_IV = {
    "crop0.25 mahalanobis/plain": ((), "mahalanobis/plain"),
    "crop0.6 mahalanobis/plain": ((CROP_IV,), "mahalanobis/plain"),
    "crop0.25 maha_rotation/angled": ((), "maha_rotation/angled"),
    "crop0.6 maha_rotation/angled": ((CROP_IV,), "maha_rotation/angled"),
}
SEEDS_IV, DRAW_IV = (30, 31, 32), 9012


def run_four(out: Path, train: Path, test: Path, c: int, seed: int) -> None:
    """Protocol IV for one (class, seed): `fit`'s default training and the same with milder
    crops, each network scored by Mahalanobis and by maha_rotation on its own bank and
    held-out images."""
    path = out / "results-iv" / f"c{c}-s{seed}.json"
    if path.exists():
        return
    rows, fits = {}, {}
    for overrides in dict.fromkeys(o for o, _ in CANDIDATES_IV.values()):
        t = train_trial(as_shipped_then(seed, overrides), train, test)
        fits[" ".join(overrides) or "recipe"] = {"fit_s": round(t.fit_s, 1),
                                                 "fit_cpu_s": round(t.fit_cpu_s, 1)}  # fmt: skip
        for name, (o, scorer) in CANDIDATES_IV.items():
            if o == overrides:
                rows[name], _, fit_ms = _scored(t, scorer, c)
                rows[name]["scorer_fit_cpu_ms"] = fit_ms
    t.save(path, c, seed, t.det.steps, rows, fits=fits)
    print(f"class {c} seed {seed}: fits {fits}; AUROC " + ", ".join(
        f"{n} {100 * r['auroc']:.1f}" for n, r in rows.items()), flush=True)  # fmt: skip


def cmd_run_four(args: argparse.Namespace) -> None:
    run_cells(args, run_four, DRAW_IV)


def cmd_table_four(args: argparse.Namespace) -> None:
    print_choice(_load(args.out, "results-iv"), tuple(CANDIDATES_IV), (),
                 tuple(CANDIDATES_IV)[1:])  # fmt: skip


def run_cells(args: argparse.Namespace, run: Callable, draw: int = 1234) -> None:
    """Protocols II-IV: ``run(out, train folder, test folder, class, seed)`` for every seed and
    class asked for, seed by seed; the test folder of each class drawn with ``draw`` + class."""
    torch.set_num_threads(args.threads)
    tr_img, tr_lab, te_img, te_lab = _arrays()
    for seed in args.seeds:
        for c in args.classes:
            test_folder = make_test_folder(args.out, te_img, te_lab, c, draw=draw)
            folder = make_train_folder(args.out, tr_img, tr_lab, c, seed)
            run(args.out, folder, test_folder, c, seed)


def _arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST's training and test images (N, 28, 28) and labels, as numpy arrays."""
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    return (train.images[:, 0].numpy(), train.labels.numpy(),
            test.images[:, 0].numpy(), test.labels.numpy())  # fmt: skip


def cmd_run_two(args: argparse.Namespace) -> None:
    run_cells(args, run_two)


def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tr_img, tr_lab, te_img, te_lab = _arrays()
    for c in args.classes:
        test_folder = make_test_folder(args.out, te_img, te_lab, c)
        for seed in args.seeds:
            folder = make_train_folder(args.out, tr_img, tr_lab, c, seed)
            for budget in args.budgets:
                run_one(args.out, folder, test_folder, c, seed, budget)


def _load(out: Path, folder: str = "results") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / folder).glob("*.json"))]


def _mean_ci(values: list[float]) -> str:
    from scipy import stats

    v = 100 * np.asarray(values)
    if len(v) < 2:
        return f"{v.mean():.1f}"
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.1f} [{v.mean() - half:.1f}, {v.mean() + half:.1f}]"


def choose(records: list[dict]) -> tuple[int, str, dict]:
    """The rule, as written in RESULTS before the run: highest mean AUROC over the choice
    classes x seeds; a candidate within TIE points with a smaller budget (then kNN before
    Mahalanobis) is preferred. A budget counts once it has run on every choice class; all are
    compared on the (class, seed) cells they have in common."""
    cells = {}
    for r in records:
        if r["class"] in CHOOSE:
            cells.setdefault(r["budget"], set()).add((r["class"], r["seed"]))
    budgets = [b for b, cs in cells.items() if {c for c, _ in cs} == set(CHOOSE)]
    common = set.intersection(*(cells[b] for b in budgets))
    means = {}
    for b in sorted(budgets):
        for s in CANDIDATES:
            vals = [r["scorers"][s]["auroc"] for r in records
                    if r["budget"] == b and (r["class"], r["seed"]) in common]  # fmt: skip
            means[(b, s)] = 100 * float(np.mean(vals))
    best = max(means.values())
    close = [key for key, m in means.items() if m >= best - TIE]
    pick = min(close, key=lambda key: (key[0], SCORERS.index(key[1])))
    return pick[0], pick[1], {"means": means, "cells": sorted(common)}


def cmd_table(args: argparse.Namespace) -> None:
    records = _load(args.out)
    names = load_dataset("fashion-mnist", "test").classes
    budget, scorer, means = choose(records)
    print(
        "| budget | scorer | choice classes 0, 2, 4: AUROC | recall | FPR "
        "| confirm 6, 7, 8: AUROC | recall | FPR | fit CPU s |"
    )
    print("|---:|---|---|---|---|---|---|---|---:|")
    for b in sorted({r["budget"] for r in records}):
        for s in SCORERS:
            sel = [r for r in records if r["budget"] == b]
            cols = []
            for group in (CHOOSE, CONFIRM):
                rows = [r["scorers"][s] for r in sel if r["class"] in group]
                cols += [
                    _mean_ci([x[k] for x in rows]) if rows else "—"
                    for k in ("auroc", "recall", "fpr")
                ]  # noqa: E501
            cpu = np.mean([r["fit_cpu_s"] for r in sel]) if sel else float("nan")
            mark = " **(chosen)**" if (b, s) == (budget, scorer) else ""
            print(f"| {b} | {s}{mark} | " + " | ".join(cols) + f" | {cpu:.0f} |")
    print(
        f"\nchosen: {budget} steps, {scorer} (rule: max mean AUROC on {CHOOSE}, ties within {TIE})"
    )
    print("compared on (class, seed):", means["cells"])
    print("means:", {f"{b} {s}": round(m, 2) for (b, s), m in means["means"].items()})
    print("\nPer normal class (mean over seeds; % flagged per anomaly class):")
    for c in CHOOSE + CONFIRM:
        for b, s in dict.fromkeys([(budget, scorer), (BUDGETS[0], CANDIDATES[0])]):
            line = class_line(records, names, c, b, s)
            if line:
                print(line)


def class_line(records: list[dict], names: list[str], c: int, budget: int, scorer: str) -> str:
    """One normal class under one candidate ("" when the class has no run of that budget)."""
    rows = [r["scorers"][scorer] for r in records if r["class"] == c and r["budget"] == budget]
    return summary(rows, names, c, f"{budget} steps, {scorer}") if rows else ""


def summary(rows: list[dict], names: list[str], c: int, label: str, with_range=False) -> str:
    """AUROC (and its range), recall and FPR of one normal class over its seeds' rows, and the
    share flagged of each anomaly class."""
    per = {
        k: np.mean([x["recall_per_class"][k] for x in rows]) for k in rows[0]["recall_per_class"]
    }
    flagged = ", ".join(f"{names[int(k)]} {100 * v:.0f}" for k, v in per.items())
    auroc, recall = _mean_ci([x["auroc"] for x in rows]), _mean_ci([x["recall"] for x in rows])
    if with_range:
        lo, hi = (100 * f(x["auroc"] for x in rows) for f in (min, max))
        auroc += f" ({lo:.1f}-{hi:.1f})"
    fpr = _mean_ci([x["fpr"] for x in rows])
    return (
        f"- {c} {names[c]}, {label} ({len(rows)} seeds): AUROC {auroc}, "
        f"recall {recall}, FPR {fpr}; {flagged}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--classes", type=int, nargs="+", default=list(CHOOSE + CONFIRM))
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    run.add_argument("--threads", type=int, default=1)
    table = sub.add_parser("table")
    table.add_argument("--out", type=Path, required=True)
    run2 = sub.add_parser("run2")
    run2.add_argument("--out", type=Path, required=True)
    run2.add_argument("--classes", type=int, nargs="+", default=list(CHOOSE + CONFIRM))
    run2.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run2.add_argument("--threads", type=int, default=1)
    table2 = sub.add_parser("table2")
    table2.add_argument("--out", type=Path, required=True)
    run3 = sub.add_parser("run3")
    run3.add_argument("--out", type=Path, required=True)
    run3.add_argument("--classes", type=int, nargs="+", default=list(CHOOSE + CONFIRM))
    run3.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS_III))
    run3.add_argument("--threads", type=int, default=1)
    table3 = sub.add_parser("table3")
    table3.add_argument("--out", type=Path, required=True)
    run4 = sub.add_parser("run4")
    run4.add_argument("--out", type=Path, required=True)
    run4.add_argument("--classes", type=int, nargs="+", default=list(CHOOSE + CONFIRM))
    run4.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS_IV))
    run4.add_argument("--threads", type=int, default=1)
    table4 = sub.add_parser("table4")
    table4.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    commands = {"run": cmd_run, "table": cmd_table, "run2": cmd_run_two, "table2": cmd_table_two,
                "run3": cmd_run_three, "table3": cmd_table_three, "run4": cmd_run_four,
                "table4": cmd_table_four}  # fmt: skip
    commands[args.cmd](args)


if __name__ == "__main__":
    main()

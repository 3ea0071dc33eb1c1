"""Does the ensemble reach the per-image worst case over independent attacks?

On a stratified test subset of a run's headline detector (or a detector folder with --data and
--normal-class), L∞, both sides attacked:

1. firmad's ensemble (``attack="ensemble"``: per image the worst over the exact score, the
   detector's surrogates, the pixel-space target, the targeted start and the CE-style member,
   each with ``--restarts`` random restarts of APGD);
2. twelve independent attacks: APGD on the exact score with three seeds, fixed-step PGD on it,
   fixed-step PGD with the surrogates (the old protocol of benchmarks/RESULTS.md), APGD with
   the surrogates, each targeted member alone, the CE-style member alone, APGD without a random
   start, the kNN feature target (where there is a bank), and the Square attack;
3. the per-image worst case over (2): per normal the highest score, per anomaly the lowest.

The ensemble should land within 1 AUROC point of (3). Writes a JSON with every AUROC, the gap
and the wall time of each attack.

    python benchmarks/attack_worstcase.py RUN_DIR [--eps 8] [--steps 100] [--restarts 2]
        [--subset 200] [--queries 1000] [--out FILE.json]
    python benchmarks/attack_worstcase.py DET_DIR --data fashion-mnist --normal-class 0 ...
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from firmad.robustness.attacks import (
    AttackSpec,
    NearestTarget,
    TwoLogitCE,
    run_attack,
    run_sources,
    run_square,
    score,
    score_fn_of,
)
from firmad.robustness.audit import _features, offered_surrogates, test_images
from firmad.robustness.evaluate import stratified_subset
from firmad.robustness.folders import headline_scorer


def load(args):
    """The detector, test images and labels, and training normals (model input space)."""
    from firmad.detector import OneClassDetector

    path = Path(args.target)
    if (path / "config.yaml").is_file():
        from firmad.factory import build_split
        from firmad.run import RunDir

        cfg = RunDir(path).read_config()
        name, _, k = headline_scorer(cfg).partition(":k=")
        det = OneClassDetector.from_run(path, scorer=name, k=int(k) if k else None)
        split, size = build_split(cfg), cfg.data.size
    else:
        from firmad.data import one_vs_rest

        det = OneClassDetector.load(path)
        klass = int(args.normal_class) if args.normal_class.isdigit() else args.normal_class
        split = one_vs_rest(args.data, klass, root=args.root, seed=det.config_.train.seed)
        size = det.config_.data.size
    x = test_images(split.test_images, size)
    y = torch.as_tensor(split.test_labels).reshape(-1).long()
    pick = stratified_subset(y, args.subset, 0)
    return det, x[pick], y[pick], test_images(split.train_images, size)


def members(det, normals, spec: AttackSpec, queries: int) -> dict:
    """The independent attacks: name -> a function of (x, y) giving an AttackResult."""
    one = replace(spec, restarts=1)
    fixed = replace(one, schedule="fixed", step_size=2.5 * spec.eps / spec.steps)
    targets = offered_surrogates(det, True, normals, start=True)
    own = {k: v for k, v in targets.items() if k not in ("image", "start")}
    fn = score_fn_of(det)
    out = {f"APGD exact, seed {s}": (replace(one, seed=s), {"exact": None}) for s in (0, 1, 2)}
    out.update({
        "PGD exact (fixed step)": (fixed, {"exact": None}),
        "PGD + surrogates (fixed step)": (fixed, {"exact": None, **own}),
        "APGD + surrogates": (one, {"exact": None, **own}),
        "APGD image target alone": (replace(one, seed=3), {"image": targets["image"]}),
        "APGD targeted start alone": (replace(one, seed=4), {"start": targets["start"]}),
        "APGD CE-style alone": (replace(one, seed=5), {"ce": TwoLogitCE(fn)}),
        "APGD exact, no random start": (replace(one, random_start=False), {"exact": None}),
    })  # fmt: skip
    bank = getattr(det.scorer_.per_angle[0], "bank_", None)
    if isinstance(bank, torch.Tensor) and bank.ndim == 2:
        near = NearestTarget(lambda z: _features(det, z), bank)
        out["APGD feature target alone"] = (replace(one, seed=6), {"nearest": near})
    runs = {k: (lambda x, y, a=a, s=s: run_sources(det, x, y, a, s)) for k, (a, s) in out.items()}
    square = AttackSpec(spec.eps, steps=queries, seed=7, batch_size=spec.batch_size)
    runs["Square"] = lambda x, y: run_square(det, x, y, square)
    return runs


def auroc(y, s) -> float:
    return 100 * roc_auc_score(y.numpy(), s.double().cpu().numpy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("target")
    p.add_argument("--data")
    p.add_argument("--normal-class")
    p.add_argument("--root")
    p.add_argument("--eps", type=float, default=8.0, help="L-inf radius in 1/255 units")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--subset", type=int, default=200)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    det, x, y, normals = load(args)
    spec = AttackSpec(args.eps / 255, steps=args.steps, restarts=args.restarts,
                      schedule="apgd", batch_size=args.batch_size)  # fmt: skip
    clean = score(det, x, args.batch_size).cpu()
    report = {"target": args.target, "n": len(y), "n_normal": int((y == 0).sum()),
              "eps_255": args.eps, "steps": args.steps, "restarts": args.restarts,
              "clean": auroc(y, clean), "attacks": {}}  # fmt: skip
    up = (y == 0).double()  # normals: the highest score is the worst; anomalies: the lowest
    worst = None
    for name, run in members(det, normals, spec, args.queries).items():
        t0 = time.monotonic()
        s = score(det, run(x, y).images, args.batch_size).double().cpu()
        report["attacks"][name] = {"auroc": auroc(y, s), "seconds": time.monotonic() - t0}
        print(f"{name}: {report['attacks'][name]['auroc']:.1f}", flush=True)
        signed = torch.where(up > 0, s, -s)
        worst = signed if worst is None else torch.maximum(worst, signed)
    report["worst_case"] = auroc(y, torch.where(up > 0, worst, -worst))
    t0 = time.monotonic()
    targets = offered_surrogates(det, True, normals, start=True)
    sources = {**targets, "ce": TwoLogitCE(score_fn_of(det))}
    ens = score(det, run_attack(det, x, y, spec, surrogates=sources).images, args.batch_size)
    report["ensemble"] = {"auroc": auroc(y, ens.double().cpu()),
                          "seconds": time.monotonic() - t0}  # fmt: skip
    report["gap"] = report["ensemble"]["auroc"] - report["worst_case"]
    print(f"worst case {report['worst_case']:.1f}, ensemble {report['ensemble']['auroc']:.1f}, "
          f"gap {report['gap']:+.1f} (goal <= +1.0)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Why does the anomalies-only AUROC of an undefended FIRM + kNN detector stay high at a large
L∞ ε? Compares, on the anomalies of a stratified test subset (normals clean):

- APGD on the exact kNN score (top-k gradient, the neighbours move with the image);
- APGD with a fixed per-image target in feature space (each anomaly's nearest typical normal
  feature: no top-k switching) beside the exact score;
- no gradient at all: each anomaly moved straight towards a typical normal training image (its
  projection onto the ε-ball, the pixel blend);
- firmad's targeted surrogate (`ImageTarget`: that blend as start, then its gradient) beside the
  detector's own surrogates, as `firmad attack` runs it.

Usage: python benchmarks/anomaly_stall.py RUN_DIR [--n 100] [--steps 100] [--eps 128,255]
       [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from firmad.detector import OneClassDetector
from firmad.factory import build_split
from firmad.metrics import evaluate_scores
from firmad.robustness.attacks import ImageTarget, NearestTarget, attack_detector, score
from firmad.robustness.audit import _features, _test_images
from firmad.robustness.evaluate import stratified_subset
from firmad.run import RunDir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eps", default="128,255", help="L∞ radii in 1/255 units")
    ap.add_argument("--out")
    args = ap.parse_args()
    cfg = RunDir(args.run).read_config()
    split = build_split(cfg)
    det = OneClassDetector.from_run(args.run, scorer="knn_cos", k=5)
    x, y = _test_images(split.test_images, cfg.data.size), split.test_labels
    idx = stratified_subset(y, args.n, 0)
    x, y = x[idx], y[idx]
    clean = score(det, x, 256)
    features = partial(_features, det)
    normals = _test_images(split.train_images, cfg.data.size)
    image = ImageTarget(features, normals, score(det, normals, 256))
    nearest = NearestTarget(features, det.scorer_.per_angle[0].bank_)
    rows = [{"what": "clean", "auroc": evaluate_scores(y, clean)["auroc"]}]

    def side(s: torch.Tensor) -> float:  # anomalies attacked, normals clean
        return evaluate_scores(y, torch.where(y == 1, s, clean))["auroc"]

    for e in [int(v) for v in args.eps.split(",")]:
        eps = e / 255
        target = image.targets(x)
        blend = x + (target - x).clamp(-eps, eps)
        rows.append({"eps_255": e, "what": "pixel blend towards a typical normal image, no "
                     "gradient", "auroc": side(score(det, blend, 256).double())})  # fmt: skip
        for what, sur in [
            ("APGD exact kNN score", False),
            ("APGD exact + fixed nearest typical normal feature", {"nearest": nearest}),
            ("APGD exact + KDE + centre (firmad's surrogates)", True),
            ("APGD exact + KDE + centre + ImageTarget (firmad attack --targeted)",
             {**det.surrogate_scores(), "image": image}),
        ]:  # fmt: skip
            t = time.time()
            r = attack_detector(
                det, x, y, eps=eps, steps=args.steps, targets="anomaly", surrogates=sur,
                schedule="apgd", batch_size=256,
            )  # fmt: skip
            rows.append({"eps_255": e, "what": what, "steps": args.steps, "auroc": side(r.scores),
                         "wins": r.wins, "seconds": round(time.time() - t, 1)})  # fmt: skip
        for row in rows[-5:]:
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"run": args.run, "n": args.n, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

"""The pixels as a floor: kNN cosine (k=5) on raw pixels, the quality benchmark's protocol.

Per class of a dataset: the normal training images are the bank, the full test split is scored
(one-vs-rest), AUROC of the mean cosine distance to the 5 nearest training images, in the
same kNN code the learned detectors use. No training, no test data seen before scoring.

    python benchmarks/pixel_floor.py [--dataset fashion-mnist] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from firmad.config import load_config
from firmad.data import describe
from firmad.factory import build_split
from firmad.scoring.scorers import build_scorer


def pixel_auroc(dataset: str, normal_class: int, k: int = 5) -> float:
    cfg = load_config(
        "fmnist-cpu", [f"data.dataset={dataset}", f"data.normal_class={normal_class}"]
    )
    split = build_split(cfg)
    bank = split.train_images.flatten(1).float() / 255
    scorer = build_scorer("knn_cos", k=k).fit(bank)
    scores = np.concatenate(
        [scorer.score(chunk.flatten(1).float() / 255) for chunk in split.test_images.split(2000)]
    )
    return float(roc_auc_score(np.asarray(split.test_labels), scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tic = time.perf_counter()
    names = [row["name"] for row in describe(args.dataset)]
    rows = {}
    for c, name in enumerate(names):
        rows[name] = pixel_auroc(args.dataset, c, args.k)
        print(f"{c} {name}: {100 * rows[name]:.1f}", flush=True)
    mean = float(np.mean(list(rows.values())))
    print(f"mean: {100 * mean:.1f} ({time.perf_counter() - tic:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"dataset": args.dataset, "scorer": f"knn_cos k={args.k} on raw pixels",
                  "auroc": rows, "mean": mean, "torch": torch.__version__}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Exploration before protocol III, on VALIDATION images: the rotation scorer against
Mahalanobis on networks the exploration of protocol II trained (its explore.py, run first from
the project root, wrote runs/explore/det-*/ and the validation folder runs/explore/val-c0/).

    python benchmarks/results/default-protocol-iii/explore_rotation.py runs/explore/det-c0-s0-b1500

Prints, per scorer: AUROC, recall at the detector's own 5 % threshold (held-out images), and
recall at exactly 5 % of these validation normals (per anomaly class), which does not depend
on how the held-out images fall.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import default_protocol as dp  # noqa: E402

from firmad.detector import OneClassDetector  # noqa: E402
from firmad.fitting import fit_images  # noqa: E402
from firmad.inputs import find_images  # noqa: E402

torch.set_num_threads(1)
det_dir = Path(sys.argv[1])
det = OneClassDetector.load(det_dir)
c, seed = det.config_.data.normal_class, det.config_.train.seed
train = Path(f"runs/protocol/data/train-c{c}-s{seed}")
images = fit_images(train, det, say=lambda m: None, warn=lambda m: None)
held = torch.as_tensor(np.load(det_dir / "held.npy"))
kept = torch.ones(len(images), dtype=torch.bool)
kept[held] = False
files = find_images([Path(f"runs/explore/val-c{c}")])[0]
true = np.array([int(f.name.split("_")[0]) for f in files])


def at_exact_fpr(scores: np.ndarray, fpr: float = 0.05) -> str:
    flagged = scores > np.quantile(scores[true == c], 1 - fpr)
    per = " ".join(f"{k}:{100 * flagged[true == k].mean():.0f}" for k in range(10) if k != c)
    return f"{100 * flagged[true != c].mean():.0f} % ({per})"


for scorer, variant in [("mahalanobis", "plain"), ("rotation", "plain"), ("rotation", "angled"),
                        ("rotation:c=1", "angled"), ("rotation:c=10", "angled")]:  # fmt: skip
    one = OneClassDetector.from_model(det.model_, det.config_, scorer=scorer, k=None,
                                      variant=variant)  # fmt: skip
    one.fit_bank(images[kept]).calibrate(images[held], target_fpr=dp.TARGET)
    scores = one.decision_function(files)
    r = dp.measure(scores, one.threshold_, true, c)
    print(f"{scorer}/{variant}: AUROC {100 * r['auroc']:.1f}; at the detector's threshold recall "
          f"{100 * r['recall']:.0f} %, FPR {100 * r['fpr']:.1f} %; at exactly 5 % of these "
          f"normals: recall {at_exact_fpr(scores)}", flush=True)  # fmt: skip

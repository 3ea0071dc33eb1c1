"""Exploration before protocol IV, on VALIDATION images only: does `fit`'s training keep the
garment's outline if its random crops are milder? Training folders drawn with seed 20 (a draw
no protocol uses), validation folders from the rest of the training split (300 normals and 100
of each other class, none in that training folder). Run from the project root:

    python benchmarks/results/default-protocol-iv/explore.py CLASS TAG [key=value ...]

TAG names the run; key=value are recipe overrides (e.g. augment.scale=[0.6,1.0]); a TAG ending
in -steps3000 trains 3 000 steps instead of `fit`'s 1 500. Prints per
scorer: AUROC, recall at the detector's own 5 % threshold, and recall at exactly 5 % of these
validation normals (per anomaly class).
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import default_protocol as dp  # noqa: E402

SEED, OUT = 20, Path("runs/explore4")
torch.set_num_threads(1)
c, tag, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
tr_img, tr_lab, _, _ = dp._arrays()
folder = dp.make_train_folder(OUT, tr_img, tr_lab, c, SEED)
val = OUT / "data" / f"val-c{c}"
if not (val / "done").exists():
    val.mkdir(parents=True, exist_ok=True)
    ids = np.flatnonzero(tr_lab == c)
    used = set(np.random.default_rng(SEED).choice(ids, dp.N_TRAIN, replace=False).tolist())
    rng = np.random.default_rng(4321 + c)
    for k in range(10):
        pool = [i for i in np.flatnonzero(tr_lab == k) if i not in used]
        n = dp.N_TEST_NORMAL if k == c else dp.N_TEST_OTHER
        for i, j in enumerate(rng.choice(pool, n, replace=False)):
            dp._write(tr_img[j], val / f"{k}_{i:04d}", i)
    (val / "done").write_text("")

steps = 3000 if tag.endswith("-steps3000") else None
t = dp.train_trial(dp.as_shipped_then(SEED, tuple(overrides), steps=steps), folder, val)


def at_exact_fpr(scores: np.ndarray, fpr: float = 0.05) -> str:
    flagged = scores > np.quantile(scores[t.true == c], 1 - fpr)
    per = " ".join(f"{k}:{100 * flagged[t.true == k].mean():.0f}" for k in range(10) if k != c)
    return f"{100 * flagged[t.true != c].mean():.0f} % ({per})"


raw = {}
for name in ("mahalanobis/plain", "mahalanobis/angled", "rotation/angled", "maha_rotation/angled"):
    row, raw[name], _ = dp._scored(t, name, c)
    print(f"c{c} {tag} {name}: AUROC {100 * row['auroc']:.1f}; recall {100 * row['recall']:.0f} "
          f"% at FPR {100 * row['fpr']:.1f} %; exact 5 %: {at_exact_fpr(raw[name][0])}",
          flush=True)  # fmt: skip
rot = dp._standardised(*raw["rotation/angled"])
for maha in ("mahalanobis/plain", "mahalanobis/angled"):
    a = dp._standardised(*raw[maha])
    row = dp._mean_of(a, rot, t.true, c)
    print(f"c{c} {tag} z-mean({maha}, rotation/angled): AUROC {100 * row['auroc']:.1f}; recall "
          f"{100 * row['recall']:.0f} %; exact 5 %: {at_exact_fpr((a[0] + rot[0]) / 2)}; fit "
          f"{t.fit_s:.0f} s", flush=True)  # fmt: skip

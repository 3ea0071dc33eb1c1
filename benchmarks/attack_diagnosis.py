"""Is the attack weak, or is the detector hard to move? Diagnostics for one trained run.

On a stratified test subset of the run's headline kNN detector (L∞):
1. the library's attack (`attack_detector`: exact kNN + KDE + centre surrogates), both sides,
   with the fixed step and with APGD's schedule (``schedule="apgd"``), and the strongest mode
   (`firmad attack --full`'s ensemble: the targeted members and the CE-style member beside
   them, APGD with 2 restarts);
2. hand-written PGD variants on the exact score: no random start, step-size decay, momentum,
   and a feature-matching objective (each anomaly pulled towards its nearest training normal);
3. anomalies only at large ε (32, 64 /255): a working attack should reach AUROC near 0;
4. how far the encoder's features move at all: untargeted PGD minimising cos(f(x'), f(x)),
   against the typical cosine between two different test images.

    python benchmarks/attack_diagnosis.py RUN_DIR [--n 100] [--steps 100] [--out FILE.json]
        [--library-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from firmad.detector import OneClassDetector
from firmad.factory import build_split
from firmad.robustness import attack_detector
from firmad.robustness.attacks import TwoLogitCE, score_fn_of
from firmad.robustness.audit import _test_images, offered_surrogates
from firmad.robustness.evaluate import stratified_subset

EPS = 8 / 255


def pgd_variant(fn, select, x, eps, steps=100, decay=False, momentum=0.0, start=True):
    """Sign-gradient L∞ PGD ascending ``fn``; per image the iterate with the highest
    ``select`` (the true objective) is returned."""
    gen = torch.Generator().manual_seed(1)
    xa = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1) if start else x
    best_x = x.clone()
    with torch.no_grad():
        best = select(x)
    m = torch.zeros_like(x)
    for k in range(steps + 1):
        with torch.no_grad():
            obj = select(xa)
            better = obj > best
            best, best_x[better] = torch.where(better, obj, best), xa[better]
        if k == steps:
            break
        xi = xa.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xi).sum(), xi)
        m = momentum * m + g / (g.abs().flatten(1).mean(1).view(-1, 1, 1, 1) + 1e-12)
        alpha = (eps / 4) * 0.5 ** (k // 25) if decay else 2.5 * eps / steps
        xa = (x + (xa + alpha * m.sign() - x).clamp(-eps, eps)).clamp(0, 1).detach()
    return best_x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100, help="steps of the library's attacks")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--library-only", action="store_true", help="only step 1 (the library's attacks)"
    )
    args = parser.parse_args()
    tic = time.perf_counter()
    det = OneClassDetector.from_run(args.run)
    cfg = det.config_
    split = build_split(cfg)
    idx = stratified_subset(split.test_labels, args.n, cfg.train.seed)
    x = _test_images(split.test_images[idx], cfg.data.size)
    y = torch.as_tensor(np.asarray(split.test_labels)[idx]).long()
    with torch.no_grad():
        clean = det.score_tensor(x).double()
    out: dict = {"run": str(args.run), "n": len(y), "clean": roc_auc_score(y, clean)}

    def auroc(adv, side):  # side: which group carries the attacked scores
        mask = {"both": torch.ones_like(y, dtype=torch.bool), "anomaly": y == 1, "normal": y == 0}
        return float(roc_auc_score(y, torch.where(mask[side], adv, clean)))

    for schedule in ("fixed", "apgd"):
        r = attack_detector(
            det, x, y, eps=EPS, steps=args.steps, targets="both", batch_size=256, schedule=schedule
        )
        out["library both" + ("" if schedule == "fixed" else " (apgd)")] = auroc(r.scores, "both")
    normals = _test_images(split.train_images, cfg.data.size)
    sources = offered_surrogates(det, True, normals, start=True)
    sources["ce"] = TwoLogitCE(score_fn_of(det))
    r = attack_detector(
        det, x, y, eps=EPS, steps=args.steps, restarts=2, targets="both", batch_size=256,
        schedule="apgd", surrogates=sources,
    )  # fmt: skip
    out["library both (ensemble, apgd, 2 restarts)"] = auroc(r.scores, "both")
    if args.library_only:
        return _finish(out, tic, args.out)
    sign = (1 - 2 * y).float()

    def exact(xi):  # higher = attack succeeds: normals up, anomalies down
        return sign * det.score_tensor(xi)

    def true_scores(images):
        with torch.no_grad():
            return det.score_tensor(images).double()

    ext = det.extractor_
    bank = det.scorer_.per_angle[0].bank_.float()
    with torch.no_grad():
        nearest = (F.normalize(ext(x), dim=1) @ F.normalize(bank, dim=1).T).argmax(1)
    target = F.normalize(bank[nearest], dim=1)

    def matching(xi):  # anomalies: towards their nearest normal; normals: the exact score
        pull = -(F.normalize(ext(xi), dim=1) - target).pow(2).sum(1)
        return torch.where(y == 1, pull, sign * det.score_tensor(xi))

    variants = {
        "pgd (random start)": dict(fn=exact),
        "pgd, no random start": dict(fn=exact, start=False),
        "pgd, step eps/4 halved every 25": dict(fn=exact, decay=True),
        "pgd, momentum 0.9": dict(fn=exact, momentum=0.9),
        "feature matching": dict(fn=matching),
    }
    for name, kw in variants.items():
        adv = pgd_variant(select=exact, x=x, eps=EPS, **kw)
        out[f"{name} both"] = auroc(true_scores(adv), "both")
    for e in (32, 64):
        adv = pgd_variant(exact, exact, x, e / 255)
        out[f"pgd anomaly eps={e}/255"] = auroc(true_scores(adv), "anomaly")
    with torch.no_grad():
        f0 = F.normalize(ext(x), dim=1)
        pair = (f0 @ f0.T)[~torch.eye(len(x), dtype=torch.bool)].mean()
    out["typical cos between two test images"] = float(pair)

    def away(xi):  # untargeted: move the features away from the clean ones
        return -(F.normalize(ext(xi), dim=1) * f0).sum(1)

    for e in (8, 32):
        adv = pgd_variant(away, away, x, e / 255)
        with torch.no_grad():
            out[f"cos(f(x'), f(x)) after untargeted PGD eps={e}/255"] = float(-away(adv).mean())
    _finish(out, tic, args.out)


def _finish(out: dict, tic: float, path: Path | None) -> None:
    out["seconds"] = round(time.perf_counter() - tic, 1)
    for k, v in out.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

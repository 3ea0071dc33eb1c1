"""Recorded attack results: PGD, APGD, FGSM, the exact + surrogate attack, Square and three
robust-AUROC sweeps on a toy detector, with fixed seeds -- made to hold on any x86-64 CPU.

The toy detector and its images are *exact*: dyadic values from integers (`exact_toy`,
`exact_images`), the same bits on every CPU (torch's normal sampler, which the toy of
test_attacks uses, has ISA-specific kernels). What an attack computes from them is float32
arithmetic, and what each record holds follows from that:

- images of L∞ attacks (PGD, FGSM, the exact + surrogate attack, Square) as a SHA-256: they
  are the exact images moved by ±α steps (the sign of a gradient) or by random ±ε squares,
  kept by comparing scores, so rounding changes them only where a gradient or a score
  difference lies within rounding of 0;
- images of L2 and APGD attacks (continuous steps: the gradient itself) as each image's pixel
  sum and perturbation norm, and every score: numbers compared within RTOL (see there);
- the sweeps' rows: AUROCs and their bootstrap intervals depend on the order of the scores
  only: exact, as are the verdicts.

``python -m tests.golden_attacks record`` rewrites tests/fixtures/golden_attacks.json (only
when a change of the numbers is deliberate); ``python -m tests.golden_attacks spread OUT.json``
measures the results at every ATEN_CPU_CAPABILITY level x threads 1, 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from firmad.robustness import attack_detector, fgsm, pgd, robust_auroc_sweep
from firmad.robustness.attacks import square_attack
from tests.test_attacks import ToyKNN

GOLDEN = Path(__file__).parent / "fixtures" / "golden_attacks.json"
# Scores and continuous images against the record. A score is 1 - a cosine similarity of
# float32 features from 8 x 8 images (sums of <= 72 products): the cosine carries an error of
# a few u = 2**-24 = 6e-8, absolute, and scores near 0 (a cosine near 1) keep that absolute
# error, so ATOL = 1e-6; larger scores and pixels move by a few u relative, and the attacks'
# few steps amplify that little, so RTOL = 1e-5. Measured (`spread`, default/avx2/native x
# threads 1, 2): scores differ by <= 1.8e-7 absolute and <= 1.9e-6 relative, the L2 attack's
# pixel sums and perturbation norms by <= 1.3e-7 relative; the digests of the L∞ images,
# APGD's pixels, the winners and the sweeps were identical in all six runs.
RTOL = 1e-5
ATOL = 1e-6


def exact_images(n: int, horizontal: bool, gen: torch.Generator) -> torch.Tensor:
    """Normals: brightness ramp top to bottom; anomalies: left to right; noise of +-24/256."""
    ramp = (torch.arange(8) * 5 + 13) / 64  # 0.20 .. 0.75, dyadic
    base = ramp.view(1, 1, 1, 8) if horizontal else ramp.view(1, 1, 8, 1)
    noise = torch.randint(-24, 25, (n, 3, 8, 8), generator=gen) / 256
    return (base + noise).clamp(0, 1)


def exact_toy(bank: torch.Tensor, seed: int = 0) -> ToyKNN:
    """test_attacks' toy detector with dyadic conv weights (std ~0.29, as its 0.3 normals)."""
    toy = ToyKNN(bank, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [toy.conv1.weight, toy.conv1.bias, toy.conv2.weight, toy.conv2.bias]:
            p.copy_(torch.randint(-32, 33, p.shape, generator=gen) / 64)
        toy.bank = toy.features(bank)
    return toy


def _data():
    gen = torch.Generator().manual_seed(0)
    bank = exact_images(30, False, gen)
    x = torch.cat([exact_images(10, False, gen), exact_images(10, True, gen)])
    y = torch.cat([torch.zeros(10), torch.ones(10)]).long()
    return exact_toy(bank), x, y


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _image_summary(images: torch.Tensor, x: torch.Tensor) -> list[float]:
    """Per image: the sum of its pixels and the L2 norm of its perturbation (float64)."""
    delta = (images - x).flatten(1).double()
    return images.flatten(1).double().sum(1).tolist() + delta.norm(dim=1).tolist()


def results() -> dict:
    """Every attack's images and scores, and the sweeps."""
    with warnings.catch_warnings():
        return _results()


def _results() -> dict:
    det, x, y = _data()
    out: dict = {}
    for name, kw in {
        "pgd_linf": dict(eps=0.05, steps=5, restarts=2, seed=3),
        "pgd_eot": dict(eps=0.03, steps=3, eot=2, random_start=False, step_size=0.02),
    }.items():
        out[name] = {"images": _digest(pgd(det, x, y, **kw))}
    out["fgsm"] = {"images": _digest(fgsm(det, x, y, eps=0.04))}
    for name, kw in {
        "pgd_l2_normal": dict(eps=0.5, norm="l2", steps=4, targets="normal", seed=1),
        "apgd": dict(eps=0.05, steps=8, schedule="apgd", batch_size=7),
    }.items():
        out[name] = {"pixels": _image_summary(pgd(det, x, y, **kw), x)}
    res = attack_detector(det, x, y, eps=0.05, steps=4, restarts=2, seed=5, targets="anomaly")
    out["attack_detector"] = {
        "images": _digest(res.images),
        "scores": res.scores.tolist(),
        "winner": res.winner.tolist(),
        "attacks": res.attacks,
        "wins": res.wins,
    }
    sq = square_attack(det, x, y, eps=0.05, queries=30, restarts=2, seed=2, batch_size=6)
    out["square"] = {"images": _digest(sq.images), "scores": sq.scores.tolist()}
    warnings.simplefilter("ignore", RuntimeWarning)  # the toy's stalled sides are expected
    out["sweep"] = robust_auroc_sweep(
        det, x, y, eps_list=[0.0, 0.02, 0.035, 0.05], steps=3, n_bootstrap=50, seed=4,
        square_check=True, transfer_from=exact_toy(x[:10], seed=1),
    )  # fmt: skip
    out["sweep_apgd_l2"] = robust_auroc_sweep(
        det, x, y, eps_list=[0.3], norm="l2", steps=3, schedule="apgd", n_bootstrap=20,
        subset=16, targets_list=["anomaly"], surrogates=False, checks=True, check_eps=0.3,
    )  # fmt: skip
    out["sweep_square"] = robust_auroc_sweep(
        det, x, y, eps_list=[0.05], attack="square", steps=20, n_bootstrap=20, checks=False,
    )  # fmt: skip
    return json.loads(json.dumps(out))


def spread(out: Path) -> None:
    """The results at every level x threads 1, 2 (subprocesses): which entries differ."""
    from tests.golden_losses import LEVELS

    runs = {}
    for level, env in LEVELS.items():
        for threads in (1, 2):
            code = (
                f"import json, torch, tests.golden_attacks as g; torch.set_num_threads({threads}); "
                "print(json.dumps(g.results()))"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code], env={**os.environ, **env},
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[f"{level}/threads={threads}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    first = next(iter(runs.values()))
    report = {}
    for key in first:
        same = all(r[key] == first[key] for r in runs.values())
        report[key] = {"identical": same, "worst_rel": _worst(first[key], list(runs.values()), key)}
    out.write_text(json.dumps({"report": report, "runs": runs}, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def _worst(first, runs, key) -> float:
    """Greatest relative difference of the float lists under ``key`` (scores, pixels)."""
    worst = 0.0
    for field in ("scores", "pixels"):
        if isinstance(first, dict) and field in first:
            for r in runs:
                for a, b in zip(first[field], r[key][field], strict=True):
                    worst = max(worst, abs(a - b) / max(abs(a), ATOL))
    return worst


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"]:
        GOLDEN.write_text(json.dumps(results(), indent=1, sort_keys=True) + "\n")
    elif sys.argv[1:2] == ["spread"] and len(sys.argv) == 3:
        spread(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)

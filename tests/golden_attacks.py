"""Attack results held across the robustness reshape: PGD, APGD, the exact + surrogate attack,
Square and two robust-AUROC sweeps on the toy detector of test_attacks, with fixed seeds.

``python -m tests.golden_attacks`` rewrites tests/fixtures/attacks_before_spec.json; run it
only when a change of the numbers is deliberate.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from firmad.robustness import attack_detector, fgsm, pgd, robust_auroc_sweep
from firmad.robustness.attacks import square_attack
from tests.test_attacks import ToyKNN, _images

GOLDEN = Path(__file__).parent / "fixtures" / "attacks_before_spec.json"


def _data():
    gen = torch.Generator().manual_seed(0)
    bank = _images(30, False, gen)
    x = torch.cat([_images(10, False, gen), _images(10, True, gen)])
    y = torch.cat([torch.zeros(10), torch.ones(10)]).long()
    return ToyKNN(bank), x, y


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def results() -> dict:
    """Every attack's images (as a SHA-256 of their bytes) and scores, and the sweeps."""
    with warnings.catch_warnings():
        return _results()


def _results() -> dict:
    det, x, y = _data()
    out: dict = {}
    for name, kw in {
        "pgd_linf": dict(eps=0.05, steps=5, restarts=2, seed=3),
        "pgd_l2_normal": dict(eps=0.5, norm="l2", steps=4, targets="normal", seed=1),
        "apgd": dict(eps=0.05, steps=8, schedule="apgd", batch_size=7),
        "pgd_eot": dict(eps=0.03, steps=3, eot=2, random_start=False, step_size=0.02),
    }.items():
        out[name] = _digest(pgd(det, x, y, **kw))
    out["fgsm"] = _digest(fgsm(det, x, y, eps=0.04))
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
        det, x, y, eps_list=[0.0, 0.02, 0.05], steps=3, n_bootstrap=50, seed=4,
        square_check=True, transfer_from=ToyKNN(x[:10], seed=1),
    )  # fmt: skip
    out["sweep_apgd_l2"] = robust_auroc_sweep(
        det, x, y, eps_list=[0.3], norm="l2", steps=3, schedule="apgd", n_bootstrap=20,
        subset=16, targets_list=["anomaly"], surrogates=False, checks=True, check_eps=0.3,
    )  # fmt: skip
    out["sweep_square"] = robust_auroc_sweep(
        det, x, y, eps_list=[0.05], attack="square", steps=20, n_bootstrap=20, checks=False,
    )  # fmt: skip
    return json.loads(json.dumps(out))


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(results(), indent=1, sort_keys=True) + "\n")

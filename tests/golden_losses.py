"""Per-step training losses of every method on the fixture, to hold them across refactors.

`python -m tests.golden_losses` rewrites tests/fixtures/fixture_losses_before_reshape3.json
from the code as it is (only ever run before a refactor); test_golden_losses.py compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from firmad.config import load_config
from tests.conftest import DSVDD_TINY, TINY

GOLDEN = Path(__file__).parent / "fixtures" / "fixture_losses_before_reshape3.json"
STEPS = 6

# name -> overrides on top of TINY: every method, plus the trainer's optional paths.
CASES = {
    "firm": ["method.name=firm"],
    "firm-concat": ["method.name=firm", "method.loss_mode=concat"],
    "ntxent": ["method.name=ntxent"],
    "ntxent-symmetric": ["method.name=ntxent", "method.symmetric=true"],
    "rotsupcon": ["method.name=rotsupcon"],
    "supcon-binary": ["method.name=supcon-binary"],
    "binary": ["method.name=binary"],
    "dsvdd": [*DSVDD_TINY, "train.optimizer=adam", "train.lr=0.001"],
    "firm-fresh": ["outliers.mode=fresh", "outliers.kinds=[cutpaste, scramble]"],
    "firm-adversarial": ["adversarial.enabled=true", "adversarial.steps=2"],
    "firm-multiclass": ["data.normal_class=[0, Trouser]"],
}


def case_losses(name: str, build) -> list[float]:
    """The first STEPS step losses of a case, one thread (float sums depend on threads)."""
    threads = torch.get_num_threads()
    try:
        cfg = load_config("fmnist-cpu", [*TINY, *CASES[name], "train.threads=1"])
        trainer = build(cfg)
        trainer._fit_begin()  # the method's start (Deep SVDD's centre)
        return [float(trainer.train_step()) for _ in range(STEPS)]
    finally:
        torch.set_num_threads(threads)


def method_aurocs(method: str, out_dir: Path) -> dict[str, float]:
    """Every result row of a tiny run of `method` (its own score first), by result label."""
    from firmad.pipeline import train_run

    case = CASES[method]
    threads = torch.get_num_threads()
    try:
        cfg = load_config("fmnist-cpu", [*TINY, *case, "train.threads=1"])
        rows = train_run(cfg, out_dir=out_dir, quiet=True)["results"]["results"]
    finally:
        torch.set_num_threads(threads)
    return {f"{r['scorer']} k={r['k']} ({r['variant']})": r["auroc"] for r in rows}


AUROC_METHODS = ("firm", "ntxent", "rotsupcon", "supcon-binary", "binary", "dsvdd")

if __name__ == "__main__":
    import tempfile

    from firmad.training import Trainer

    losses = {name: case_losses(name, Trainer) for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        aurocs = {m: method_aurocs(m, Path(tmp) / m) for m in AUROC_METHODS}
    data = {"steps": STEPS, "losses": losses, "aurocs": aurocs}
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1))

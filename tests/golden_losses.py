"""Recorded numbers of every method on the fixture, made to hold on any x86-64 CPU.

Each case trains the tiny recipe (tests.conftest.TINY) with one method or optional path of the
trainer, from *exact* weights: dyadic values drawn from integers (`exact_weights`), the same
bits on every machine -- torch's own initialisation draws normals with ISA-specific kernels,
so its weights differ in the last bits between CPUs. The record (tests/fixtures/
golden_losses.json) holds per case:

- ``pool``: a SHA-256 of the training pool (uint8 images, class and outlier-kind ids), and
  ``schedule``: the learning rate, momentum and weight decay of every step (the optimiser and
  schedule the factory builds; Python floats): exact;
- ``losses``: the first STEPS step losses, and ``grad_norms``: the L2 norm of each parameter's
  gradient at the first step: float32 arithmetic, compared within TOLERANCE (see there);
- ``aurocs`` (AUROC_CASES only): every result row of a two-step run with torch's own
  initialisation, compared within AUROC_TOLERANCE (see there).

Commands (run from the repository root, with the package importable):

    python -m tests.golden_losses record          # rewrite the record from the code as it is
    python -m tests.golden_losses spread OUT.json  # the record's numbers at every
                                                    # ATEN_CPU_CAPABILITY level x threads 1, 2

Record only when a change of the numbers is deliberate, and measure the spread again then.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from firmad.config import load_config
from tests.conftest import DSVDD_TINY, TINY

GOLDEN = Path(__file__).parent / "fixtures" / "golden_losses.json"
STEPS = 2

# name -> overrides on top of TINY: every method, plus the trainer's optional paths. Numbers
# compared with stored ones pin what another default could change (bf16 autocast on CPUs with
# native bf16, the memory format).
PINNED = ["train.amp=none", "train.channels_last='on'"]
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
AUROC_METHODS = ("firm", "ntxent", "rotsupcon", "supcon-binary", "binary", "dsvdd")
# FIRM with every scorer and variant (was test_detector's record from before the reshape into
# methods / training / scoring / detector).
ALL_SCORERS = [
    "eval.scorers=[knn_cos:k=1, knn_cos:k=5, knn_cos_norm:k=5, kde, centre, mahalanobis, "
    "ocsvm_rbf, ocsvm_linear]",
    "eval.variants=[plain, angled, ensemble]",
    "eval.n_crops=2",
]
# Two steps, as the losses: after TINY's 8 the trajectories of two CPUs have parted (rounding
# grows chaotically through ReLU kinks) and the fixture AUROCs differ by up to 0.07.
SHORT = ["train.epochs=1", "train.steps_per_epoch=2"]
AUROC_CASES = {
    **{m: [*CASES[m], *SHORT] for m in AUROC_METHODS},
    "firm-all-scorers": [*ALL_SCORERS, *SHORT],
}

# Relative tolerances of the float32 numbers against the record: the same exact weights and
# uint8 images on every CPU; what differs is the rounding of each sum (vector width, blocking,
# threads). With u = 2**-24 = 6.0e-8, a sum of n terms is off by about sqrt(n)·u relative; the
# longest here (BatchNorm over 32 views x 16 x 16 = 8192 values) gives 5e-6, a dozen layers
# in a row and the losses' division by the temperature (0.2) some 1e-5 at most. Measured
# over ATEN_CPU_CAPABILITY default/avx2/native x threads 1, 2 (`spread`), largest over cases:
# - step-1 loss: 1.0e-5 (firm-multiclass; most <= 6e-6): tolerance 1e-4;
# - step-2 loss (after one SGD update, which amplifies): 7.0e-5 (firm-multiclass): 1e-3;
#   firm-adversarial 3.3e-3: its PGD steps are signs of gradients, which flip where a pixel's
#   gradient lies within rounding of 0: 3e-2;
# - step-1 gradient norms (plus ReLU inputs within rounding of 0 landing on either side):
#   9.3e-5 (rotsupcon): 1e-3; firm-multiclass 1.6e-3: 1e-2.
TOLERANCE = {
    "*": {"loss1": 1e-4, "losses": 1e-3, "grad_norms": 1e-3},
    "firm-adversarial": {"loss1": 1e-4, "losses": 3e-2, "grad_norms": 1e-3},
    "firm-multiclass": {"loss1": 1e-4, "losses": 1e-3, "grad_norms": 1e-2},
}
# AUROCs after AUROC_CASES' two steps (from torch's own initialisation, whose last bits differ
# between CPUs): a pair of test images swaps order only where their scores lie within rounding
# of each other. Measured (`spread`): <= 0.0022 (38 rows; most identical at one thread count
# across levels, threads 1 vs 2 moving some by a pair or a few). After TINY's 8 steps the
# same rows spread by up to 0.069 (rotsupcon's centre score): the runs have parted.
AUROC_TOLERANCE = 0.02


def case_config(overrides: list[str], threads: int = 1):
    return load_config("fmnist-cpu", [*TINY, *overrides, *PINNED, f"train.threads={threads}"])


def exact_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace every float parameter and buffer by a dyadic value k / 2**m (k a small integer
    from ``seed``): exact in float32 on every CPU. Scales as a He initialisation would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            k = torch.randint(-128, 129, t.shape, generator=gen).to(t.dtype)
            if t.dim() >= 2:  # 2**-7 * k has std ~74 * 2**-7; aim at sqrt(2 / fan_in)
                shift = round(math.log2(math.sqrt(t[0].numel() / 2))) + 7
                t.copy_(k * 2.0**-shift)
            elif name.endswith("running_var"):
                t.copy_(1 + k.abs() / 256)
            elif name.endswith("weight"):  # BatchNorm's scale: near 1
                t.copy_(1 + k / 512)
            else:
                t.copy_(k / 512)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def case_numbers(name: str, threads: int = 1) -> dict:
    """The case's pool digest, first STEPS losses and first-step gradient norms."""
    from firmad.factory import build_trainer

    before = torch.get_num_threads()
    try:
        trainer = build_trainer(case_config(CASES[name], threads))
        exact_weights(trainer.model)
        pool = trainer.pool
        trainer._fit_begin()  # the method's start (Deep SVDD's centre)
        losses = [float(trainer.train_step())]
        norms = {
            n: float(p.grad.norm())
            for n, p in trainer.model.named_parameters()
            if p.grad is not None
        }
        losses += [float(trainer.train_step()) for _ in range(STEPS - 1)]
    finally:
        torch.set_num_threads(before)
    digest = _digest(pool.images, pool.class_ids, pool.kind_ids)
    schedule = _schedule(case_config(CASES[name], threads), trainer)
    return {"pool": digest, "schedule": schedule, "losses": losses, "grad_norms": norms}


def _schedule(cfg, trainer) -> list[list[float]]:
    """(learning rate, momentum or Adam's beta1, weight decay) at every step of the case's run,
    from the optimiser and schedule the factory builds: Python floats, the same on every CPU."""
    from firmad.factory import build_optimizer, build_scheduler

    optimizer = build_optimizer(cfg, trainer.model, trainer.device)
    scheduler = build_scheduler(cfg, optimizer, trainer.total_steps)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the schedule steps without optimizer steps
        for _ in range(trainer.total_steps):
            group = optimizer.param_groups[0]
            first = group.get("momentum", group.get("betas", (None,))[0])
            out.append([group["lr"], first, group["weight_decay"]])
            scheduler.step()
    return out


def method_aurocs(case: str, out_dir: Path, threads: int = 1) -> dict[str, float]:
    """Every result row of a tiny run of an AUROC case (torch's own initialisation), by label."""
    from firmad.pipeline import train_run

    before = torch.get_num_threads()
    try:
        cfg = case_config(AUROC_CASES[case], threads)
        rows = train_run(cfg, out_dir=out_dir, quiet=True)["results"]
    finally:
        torch.set_num_threads(before)
    return {f"{r['scorer']} k={r['k']} ({r['variant']})": r["auroc"] for r in rows["results"]}


def numbers(threads: int = 1) -> dict:
    cases = {name: case_numbers(name, threads) for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        aurocs = {m: method_aurocs(m, Path(tmp) / m, threads) for m in AUROC_CASES}
    return {"steps": STEPS, "cases": cases, "aurocs": aurocs}


# What each ATEN_CPU_CAPABILITY level is measured (and checked in CI) with: oneDNN (the
# convolutions) and MKL (the matrix products) choose their own kernels, so they are limited to
# the same instruction sets; MKL_CBWR=COMPATIBLE is MKL's ISA-independent code path.
LEVELS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41",
                "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "native": {},
}  # fmt: skip


def _spread(values: list[float]) -> float:
    """Greatest relative distance of the values from their first."""
    return max(abs(v - values[0]) / max(abs(values[0]), 1e-30) for v in values)


def spread(out: Path) -> None:
    """The record's numbers at every level x threads 1, 2 (subprocesses), and their spread."""
    runs = {}
    for level, env in LEVELS.items():
        for threads in (1, 2):
            code = f"import json, tests.golden_losses as g; print(json.dumps(g.numbers({threads})))"
            proc = subprocess.run(
                [sys.executable, "-c", code], env={**os.environ, **env},
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[f"{level}/threads={threads}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    all_runs = list(runs.values())
    worst: dict[str, float] = {"loss1": 0.0, "losses": 0.0, "grad_norms": 0.0, "auroc": 0.0}
    for name in CASES:
        cases = [r["cases"][name] for r in all_runs]
        assert len({c["pool"] for c in cases}) == 1, f"{name}: the pool differs"
        worst["loss1"] = max(worst["loss1"], _spread([c["losses"][0] for c in cases]))
        for i in range(1, STEPS):
            worst["losses"] = max(worst["losses"], _spread([c["losses"][i] for c in cases]))
        for n in cases[0]["grad_norms"]:
            worst["grad_norms"] = max(
                worst["grad_norms"], _spread([c["grad_norms"][n] for c in cases])
            )
    for m in AUROC_CASES:
        for row in all_runs[0]["aurocs"][m]:
            got = [r["aurocs"][m][row] for r in all_runs]
            worst["auroc"] = max(worst["auroc"], max(got) - min(got))
    out.write_text(json.dumps({"worst": worst, "runs": runs}, indent=1) + "\n")
    print(json.dumps(worst, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"]:
        GOLDEN.write_text(json.dumps(numbers(), indent=1) + "\n")
    elif sys.argv[1:2] == ["spread"] and len(sys.argv) == 3:
        spread(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)

"""Robust AUROC: attack a detector at several ε, measure AUROC, check that the attack is strong.

For every ε the detector is attacked once with ``targets="both"`` (exact score plus any
surrogates, see ``attack_detector``); since scores are per sample, the "normal" (false alarms
only) and "anomaly" (evasion only) rows reuse those images for one group and the clean images
for the other. ε = 0 is the clean AUROC. Clean scores are computed once. Intervals: see
`firmad.robustness.bootstrap`; strength checks: see `firmad.robustness.verdicts`.

A detector with a decision threshold (``threshold_``, as `OneClassDetector.fit` sets it) also
gets, per row, the decisions the attack flipped at that threshold: normals pushed over it
(false alarms) and anomalies pulled under it (misses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from firmad.errors import InputError
from firmad.metrics import evaluate_scores
from firmad.robustness.base import check_images, check_labels, score, score_fn_of
from firmad.robustness.bootstrap import (
    bootstrap,
    bootstrap_auroc,
    interval,
    resamples,
    stratified_subset,
)
from firmad.robustness.gradient import in_ball, run_attack, surrogates_of
from firmad.robustness.markdown import format_markdown
from firmad.robustness.spec import ATTACKS, TARGETS, AttackSpec, SweepSpec, eps_text
from firmad.robustness.square import run_square
from firmad.robustness.targets import TwoLogitCE
from firmad.robustness.verdicts import (
    CONVERGENCE_TOL,
    Verdict,
    check_large_eps,
    check_monotone,
)

__all__ = [
    "ATTACKS",
    "SweepHooks",
    "SweepSpec",
    "Verdict",
    "bootstrap_auroc",
    "format_markdown",
    "robust_auroc_sweep",
    "stratified_subset",
    "sweep",
]

_check_monotone = check_monotone  # the name the tests and older scripts import

SQUARE_CHECK_QUERIES = 1000
SQUARE_STEP_COST = 1 / 3  # a query is one forward pass; a gradient step about three


@dataclass
class SweepHooks:
    """What a sweep tells and keeps besides its result (all optional).

    progress: ``progress(done, total, what)`` before each attack and once at the end
        (``done == total``); ``what`` names the attack with ε in the CLI's units.
    on_step: ``on_step(done, total)`` after every step of the current attack.
    plan: ``plan([(what, cost), ...])`` once, before the first attack: every attack of the
        sweep in order with its cost in gradient steps x images (for an honest ETA, see
        `firmad.robustness.progress`).
    cache: a store of finished attacks and of the attack in progress (``get(key)``,
        ``put(key, value)``, ``drop(key)``, ``checkpoint(key)``; `firmad.robustness.resume`),
        so an interrupted sweep continues; what it returns is checked again here.
    note: ``note(message)`` for what was reused or discarded.
    """

    progress: Callable[[int, int, str], None] | None = None
    on_step: Callable[[int, int], None] | None = None
    plan: Callable[[list[tuple[str, float]]], None] | None = None
    cache: Any = None
    note: Callable[[str], None] | None = None


def _mode_scores(mode: str, y: Tensor, clean: Tensor, adv: Tensor) -> Tensor:
    if mode == "both":
        return adv
    group = 0 if mode == "normal" else 1
    return torch.where(y == group, adv, clean)


def _sweep_data(x, y, subset: int | None, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The checked images and labels, cut to the stratified subset; and the subset's indices."""
    x = check_images(x)
    y = y_all = check_labels(y, x.shape[0], x.device)
    if not (y == 0).any() or not (y == 1).any():
        raise InputError("robust AUROC needs both normal (0) and anomalous (1) images.")
    idx = stratified_subset(y.cpu(), subset, seed)
    if subset is not None:
        x, y = x[idx.to(x.device)], y[idx.to(y.device)]
        if not (y == 0).any() or not (y == 1).any():
            missing = "normal" if (y == 1).all() else "anomalous"
            counts = f"{int((y_all == 0).sum())} normal, {int((y_all == 1).sum())} anomalous"
            raise InputError(
                f"a subset of {subset} image(s) holds no {missing} image (the test set has "
                f"{counts}); AUROC needs both: use a larger subset"
            )
    return x, y, idx


def _threshold_of(detector) -> float | None:
    """The detector's decision threshold (``threshold_``), when it has a finite one."""
    t = getattr(detector, "threshold_", None)
    if isinstance(t, bool) or not isinstance(t, int | float | np.floating):
        return None
    return float(t) if math.isfinite(t) else None


def _decisions(y: Tensor, clean: Tensor, s: Tensor, t: float) -> dict[str, Any]:
    """Decisions at threshold ``t`` (flagged = score > t): how many normals and anomalies are
    flagged, how many normals the attack pushed over it and how many anomalies it pulled under
    it."""
    normal, anomaly = y == 0, y == 1
    return {
        "threshold": t,
        "normals_flagged": int((s[normal] > t).sum()),
        "anomalies_flagged": int((s[anomaly] > t).sum()),
        "normals_pushed_over": int(((clean <= t) & (s > t) & normal).sum()),
        "anomalies_pulled_under": int(((clean > t) & (s <= t) & anomaly).sum()),
    }


class _Sweep:
    """One sweep's images, bootstrap resamples and attack bookkeeping (progress, cache)."""

    def __init__(self, detector, x: Tensor, y: Tensor, spec: SweepSpec, transfer_from, hooks):
        self.detector, self.x, self.y, self.spec = detector, x, y, spec
        self.hooks = hooks
        self.y_cpu = y.cpu()
        self.y_np = y_np = self.y_cpu.numpy()
        self.n_normal, self.n_anomaly = int((y_np == 0).sum()), int((y_np == 1).sum())
        # The bootstrap sees normals first, then anomalies; every score vector is put in that
        # order.
        self.order = np.concatenate([np.flatnonzero(y_np == 0), np.flatnonzero(y_np == 1)])
        self.resamples = resamples(np.sort(y_np), spec.n_bootstrap, spec.seed)
        self.boot: dict[tuple[float, str], np.ndarray] = {}
        self.transfer_from = transfer_from
        self.threshold = _threshold_of(detector)
        self.plan = _plan(self)
        self.done, self.total = 0, len(self.plan)
        self.reused: list[str] = []
        self.continued: list[tuple[str, int, int]] = []
        if hooks.plan is not None:
            hooks.plan(list(self.plan))
        self.clean = score(detector, x, spec.batch_size).double().cpu()

    def _sources(self, det, kind: str) -> dict[str, Any]:
        """The surrogates of an attack through ``det``: the sweep's (the audited detector's),
        a transferred attack's own (True: the other detector's), plus the CE-style member in
        the ensemble."""
        given = self.spec.surrogates
        if det is not self.detector and isinstance(given, Mapping):
            given = True  # built on the audited detector: a transfer uses the other's own
        out = surrogates_of(det, given)
        if kind == "ensemble":
            out["ce"] = TwoLogitCE(score_fn_of(det))
        return out

    def attack(self, det, eps: float, targets: str = "both", key=None, **override):
        """Scores of the detector on images attacked through ``det``, the winning attack per
        image and the attacks' names; taken from the cache when it holds ``key``."""
        what = self.plan[self.done][0] if self.done < self.total else f"eps={eps:.4g}"
        if self.hooks.progress is not None:
            self.hooks.progress(self.done, self.total, what)
        self.done += 1
        key = key or what
        kind = override.pop("kind", self.spec.attack)
        a = self.spec.attack_at(eps, targets, **override)
        hit = self._cached(key, a, what)
        if hit is not None:
            return hit
        res = self._run(det, kind, a, key)
        if res.resumed:
            self.continued.append((what, res.resumed, res.units))
            self._note(f"{what}: continued after {res.resumed} of {res.units} finished batches")
        adv = score(self.detector, res.images, self.spec.batch_size).double().cpu()
        cache = self.hooks.cache
        if cache is not None:
            value = {"images": res.images, "winner": res.winner, "attacks": res.attacks}
            cache.put(key, value)
        return adv, res.winner.cpu(), res.attacks

    def _run(self, det, kind: str, a: AttackSpec, key: str):
        on_step, cache = self.hooks.on_step, self.hooks.cache
        if kind == "square":
            a = AttackSpec(a.eps, a.norm, a.steps, None, a.restarts, a.targets, 1, True, a.seed,
                           a.batch_size)  # fmt: skip
        checkpoint = cache.checkpoint(key) if cache is not None else None
        if kind == "square":
            return run_square(det, self.x, self.y, a, on_step=on_step, checkpoint=checkpoint)
        return run_attack(
            det, self.x, self.y, a, surrogates=self._sources(det, kind), on_step=on_step,
            checkpoint=checkpoint,
        )  # fmt: skip

    def _cached(self, key: str, a: AttackSpec, what: str):
        """A finished attack from the cache, checked here: its images lie in this attack's
        ε-ball around these images and in [0, 1], its winners index its attacks; they are
        scored again now (never a stored score). Anything else is dropped and recomputed."""
        cache = self.hooks.cache
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            return None
        images, winner, names = hit.get("images"), hit.get("winner"), hit.get("attacks")
        ok = (
            isinstance(images, Tensor) and tuple(images.shape) == tuple(self.x.shape)
            and isinstance(winner, Tensor) and tuple(winner.shape) == (self.x.shape[0],)
            and isinstance(names, list) and all(isinstance(n, str) for n in names)
        )  # fmt: skip
        if ok:
            images = images.to(self.x.device, self.x.dtype)
            ok = in_ball(images, self.x, a.norm, a.eps) and bool(
                ((winner >= -1) & (winner < len(names))).all()
            )
        if not ok:
            self._note(f"{what}: a kept attack does not fit these images and settings; "
                       "discarded, attacking again")  # fmt: skip
            cache.drop(key)
            return None
        self.reused.append(what)
        adv = score(self.detector, images, self.spec.batch_size).double().cpu()
        return adv, winner.cpu().long(), names

    def _note(self, message: str) -> None:
        note = self.hooks.note or getattr(self.hooks.cache, "note", None)  # the cache's own
        if note is not None:
            note(message)

    def auroc_of(self, s: Tensor) -> float:
        return evaluate_scores(self.y_np, s.double().cpu().numpy())["auroc"]

    def attacked_auroc(self, eps: float, source=None, key=None, **override) -> float:
        """'both' AUROC of the detector on images attacked through ``source``."""
        source = self.detector if source is None else source
        return self.auroc_of(self.attack(source, eps, key=key, **override)[0])

    def row(self, eps: float, mode: str, s: Tensor, wins: dict[str, int]) -> dict:
        """One result row, its bootstrap kept in ``boot`` for the monotone check."""
        s_np = s.double().cpu().numpy()
        m = evaluate_scores(self.y_np, s_np)
        self.boot[(eps, mode)] = bootstrap(s_np[self.order], self.resamples, self.n_normal)
        lo, hi = interval(self.boot[(eps, mode)])
        row = {
            "eps": eps, "target": mode, "auroc": m["auroc"], "ci_low": lo, "ci_high": hi,
            "n": len(self.y_np), "n_normal": self.n_normal, "n_anomaly": self.n_anomaly,
            "aupr_anomaly": m["aupr_anomaly"], "aupr_normal": m["aupr_normal"],
            "fpr95": m["fpr95"], "wins": wins,
        }  # fmt: skip
        if self.threshold is not None:
            row["decisions"] = _decisions(self.y_cpu, self.clean, s.double().cpu(),
                                          self.threshold)  # fmt: skip
        return row

    def eps_rows(self) -> tuple[list[dict], dict[float, float]]:
        """The rows of every ε and mode (one attack per ε), and the 'both' AUROC per ε."""
        spec, rows, both_auroc = self.spec, [], {}
        for eps in spec.eps_list:
            if eps == 0:
                adv, res = self.clean, None
            else:
                adv, *res = self.attack(self.detector, eps, spec.attack_targets, key=f"eps={eps!r}")
            if spec.attack_targets == "both":
                both_auroc[eps] = self.auroc_of(adv)
            for mode in spec.targets_list:
                wins = {} if res is None else _wins(res[0], res[1], self.y_cpu, mode)
                scores = _mode_scores(mode, self.y_cpu, self.clean, adv)
                rows.append(self.row(eps, mode, scores, wins))
        return rows, both_auroc

    def strength_checks(self, rows: list[dict], both_auroc: dict) -> tuple[list[Verdict], list]:
        """The verdicts of the strength checks (see `firmad.robustness.verdicts`) and those
        skipped."""
        spec = self.spec
        if not spec.checks:
            return [], ["monotone", "large_eps", "more_steps", "more_restarts", "transfer"]
        verdicts = [check_monotone(rows, self.boot, spec.targets_list)]
        large_eps = spec.large_at(self.x[0].numel())
        large = self.attack(self.detector, large_eps, key="large_eps")[0]
        sides = {m: self.auroc_of(_mode_scores(m, self.y_cpu, self.clean, large)) for m in TARGETS}
        verdicts.append(check_large_eps(sides, spec.norm, large_eps))
        check_eps = spec.check_at
        if check_eps is None or check_eps <= 0:
            return verdicts, ["more_steps", "more_restarts", "transfer"]
        ref = both_auroc.get(check_eps)
        if ref is None:
            ref = self.attacked_auroc(check_eps, key="check_eps")
        return self._convergence(verdicts, check_eps, ref)

    def _convergence(self, verdicts: list[Verdict], check_eps: float, ref: float):
        """The more_steps, more_restarts, transfer and square checks at ``check_eps``."""
        steps, restarts, skipped = self.spec.steps, self.spec.restarts, []
        head = f"'both' AUROC at eps={check_eps:.4g}: {ref:.4f} with steps={steps}"
        tail = f"(may be lower by {CONVERGENCE_TOL} at most)"
        more = self.attacked_auroc(check_eps, key="more_steps", steps=2 * steps)
        detail = f"{head}; {more:.4f} with steps={2 * steps} {tail}"
        verdicts.append(Verdict("more_steps", more >= ref - CONVERGENCE_TOL, detail))
        more = self.attacked_auroc(
            check_eps, key="more_restarts", restarts=restarts + 1, random_start=True
        )
        detail = f"{head}, restarts={restarts}; {more:.4f} with restarts={restarts + 1} {tail}"
        verdicts.append(Verdict("more_restarts", more >= ref - CONVERGENCE_TOL, detail))
        if self.transfer_from is None:
            skipped.append("transfer")
        else:
            black = self.attacked_auroc(check_eps, source=self.transfer_from, key="transfer")
            name = _name_of(self.transfer_from)
            detail = f"{head} (white-box); {black:.4f} transferred from {name} {tail}"
            verdicts.append(Verdict("transfer", black >= ref - CONVERGENCE_TOL, detail))
        if self.spec.square_check:
            queries = _square_queries(self.spec)
            black = self.attacked_auroc(
                check_eps, key="square", kind="square", steps=queries, restarts=1
            )
            what = f"the black-box Square attack ({queries} queries)"
            detail = f"{head}; {black:.4f} with {what} {tail}"
            verdicts.append(Verdict("square", black >= ref - CONVERGENCE_TOL, detail))
        return verdicts, skipped


def _plan(run: _Sweep) -> list[tuple[str, float]]:
    """Every attack the sweep will run, in order: (what, cost), the cost in gradient steps x
    sources x attacked images (a Square query counts a third of a step)."""
    spec, norm = run.spec, run.spec.norm
    rows = {"both": len(run.y_np), "normal": run.n_normal, "anomaly": run.n_anomaly}

    def cost(det, steps, restarts, targets="both", kind=spec.attack) -> float:
        if kind == "square":
            return SQUARE_STEP_COST * steps * restarts * rows[targets]
        n_sources = 1 + len(run._sources(det, kind))
        return float(n_sources * steps * restarts * rows[targets])

    det, s, r = run.detector, spec.steps, spec.restarts
    plan = [
        (f"eps={eps_text(e, norm)}", cost(det, s, r, spec.attack_targets)) for e in spec.nonzero
    ]
    if not spec.checks:
        return plan
    big = spec.large_at(run.x[0].numel())
    plan.append((f"large_eps: eps={eps_text(big, norm)}", cost(det, s, r)))
    at = spec.check_at
    if at is None or at <= 0:
        return plan
    e = eps_text(at, norm)
    if not (spec.attack_targets == "both" and at in spec.nonzero):
        plan.append((f"check: eps={e}", cost(det, s, r)))
    plan.append((f"more_steps: eps={e}, steps={2 * s}", cost(det, 2 * s, r)))
    plan.append((f"more_restarts: eps={e}, restarts={r + 1}", cost(det, s, r + 1)))
    if run.transfer_from is not None:
        plan.append((f"transfer: eps={e}", cost(run.transfer_from, s, r)))
    if spec.square_check:
        q = _square_queries(spec)
        plan.append((f"square: eps={e}, {q} queries", cost(det, q, 1, kind="square")))
    return plan


def _square_queries(spec: SweepSpec) -> int:
    return max(spec.steps, SQUARE_CHECK_QUERIES)


def _sweep_settings(spec: SweepSpec, detector, transfer_from, dims: int) -> dict:
    """The ``settings`` of a sweep's result."""
    return {
        "norm": spec.norm,
        "eps_list": spec.eps_list,
        "steps": spec.steps,
        "restarts": spec.restarts,
        "step_size": _step_text(spec.attack, spec.schedule, spec.step_factor),
        "schedule": spec.schedule,
        "targets_list": spec.targets_list,
        "attack_targets": spec.attack_targets,
        "eot": spec.eot,
        "random_start": spec.random_start,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "surrogates": _describe(spec.surrogates),
        "n_bootstrap": spec.n_bootstrap,
        "check_eps": spec.check_at,
        "large_eps": spec.large_at(dims),
        "transfer_from": None if transfer_from is None else _name_of(transfer_from),
        "attack": spec.attack,
        "square_check": spec.square_check,
        "square_queries": _square_queries(spec) if spec.square_check else None,
        "detector": type(detector).__name__,
    }


def robust_auroc_sweep(
    detector, x: Tensor, y, *, transfer_from=None,
    progress: Callable[[int, int, str], None] | None = None, cache=None,
    on_step: Callable[[int, int], None] | None = None, **settings,
) -> dict:  # fmt: skip
    """AUROC under attack for every ε and target mode, with intervals and strength checks.

    ``detector``: object with ``score_tensor`` (or a callable), higher = more anomalous;
    ``x``, ``y``: float images (N, C, H, W) in [0, 1], labels 1 = anomaly, 0 = normal.
    ``settings``: the fields of `SweepSpec` by keyword (see there); ``sweep`` takes them as one
    spec, and the other arguments as `SweepHooks`.
    """
    hooks = SweepHooks(progress=progress, on_step=on_step, cache=cache)
    return sweep(detector, x, y, SweepSpec(**settings), hooks, transfer_from=transfer_from)


def sweep(detector, x, y, spec: SweepSpec, hooks: SweepHooks | None = None, *,
          transfer_from=None) -> dict:  # fmt: skip
    """``robust_auroc_sweep`` with its settings in a `SweepSpec`.

    Args:
        hooks: progress, the attack plan, a cache of finished attacks, notes (`SweepHooks`).
        transfer_from: optional surrogate detector for the black-box transfer check.

    Returns:
        A JSON-serialisable dict: ``settings``, ``subset``, ``clean``, ``rows`` (one per ε and
        mode: auroc, ci_low, ci_high, n, n_normal, n_anomaly, aupr_anomaly, fpr95, wins, and
        ``decisions`` when the detector has a threshold), ``verdicts``, ``checks_skipped`` and
        ``passed`` (all verdicts passed); ``threshold`` and ``resumed`` when there are any.
    """
    hooks = hooks or SweepHooks()
    x, y, idx = _sweep_data(x, y, spec.subset, spec.seed)
    run = _Sweep(detector, x, y, spec, transfer_from, hooks)
    clean_row = run.row(0.0, "clean", run.clean, {})
    rows, both_auroc = run.eps_rows()
    verdicts, skipped = run.strength_checks(rows, both_auroc)
    if hooks.progress is not None:
        hooks.progress(run.total, run.total, "done")
    result = {
        "settings": _sweep_settings(spec, detector, transfer_from, x[0].numel()),
        "subset": {
            "requested": spec.subset,
            "n": len(run.y_np),
            "n_normal": run.n_normal,
            "n_anomaly": run.n_anomaly,
            "seed": spec.seed,
            "indices": idx.tolist() if spec.subset is not None else None,
        },
        "clean": clean_row,
        "rows": rows,
        "verdicts": [asdict(v) for v in verdicts],
        "checks_skipped": skipped,
        "passed": all(v.passed for v in verdicts),
    }
    if run.threshold is not None:
        result["threshold"] = run.threshold
    if run.reused or run.continued:
        result["resumed"] = {
            "reused_attacks": run.reused,
            "continued": [
                {"attack": w, "batches_kept": k, "batches": n} for w, k, n in run.continued
            ],  # fmt: skip
        }
    return result


def _step_text(attack: str, schedule: str, step_factor: float) -> str:
    if attack == "square":
        return "square (no gradient)"
    return f"{step_factor}*eps/steps" if schedule == "fixed" else "2*eps, halved"


def _name_of(obj) -> str:
    """How a transfer source is named in the results: its ``name`` attribute or its type."""
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) else type(obj).__name__


def _wins(winner: Tensor, names: list[str], y: Tensor, mode: str) -> dict[str, int]:
    """How many images of this mode's attacked group each attack won."""
    if mode == "both":
        group = torch.ones_like(y, dtype=torch.bool)
    else:
        group = y == (0 if mode == "normal" else 1)
    return {n: int(((winner == i) & group).sum()) for i, n in enumerate(names)}


def _describe(surrogates) -> bool | list[str]:
    if isinstance(surrogates, Mapping):
        return sorted(str(k) for k in surrogates)
    return bool(surrogates)

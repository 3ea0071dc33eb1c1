"""Robust AUROC: attack a detector at several ε, measure AUROC, check that the attack is strong.

For every ε the detector is attacked once with ``targets="both"`` (exact score plus any
surrogates, see ``attack_detector``); since scores are per sample, the "normal" (false alarms
only) and "anomaly" (evasion only) rows reuse those images for one group and the clean images
for the other. ε = 0 is the clean AUROC. Clean scores are computed once.

Intervals: 95 % percentile bootstrap, resampling normals and anomalies separately (stratified
by label), seeded; the same resamples are used for every row, so rows are paired.

Strength checks (verdicts ``{"name", "passed", "detail"}``):

- ``monotone``: AUROC does not rise with ε. Fails when a rise between consecutive ε is larger
  than 0.5 points even at the lower end of its paired-bootstrap 95 % interval.
- ``large_eps``: at a very large ε (L∞ 1.0; L2 the diameter √d of [0, 1]^d) the AUROC must
  fall below 0.05 with both groups attacked (else gradients are probably masked or
  obfuscated) and with each group attacked alone (the same attack's images for one group,
  clean ones for the other: one side can stall while "both" falls).
- ``more_steps`` / ``more_restarts``: at one ε, twice the steps or one more restart must not
  lower the "both" AUROC by more than 1 point; else the attack has not converged.
- ``transfer``: (only with ``transfer_from``) a black-box transfer attack, white-box on another
  detector, must not beat the white-box attack by more than 1 point.
- ``square``: (only with ``square_check``) the score-based black-box Square attack must not
  beat the white-box attack by more than 1 point either.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from firmad.data.protocol import stratified_indices
from firmad.errors import ConfigError, InputError
from firmad.metrics import evaluate_scores
from firmad.perturb import attack_name
from firmad.robustness.base import check_images as _check_images
from firmad.robustness.base import check_labels as _check_labels
from firmad.robustness.base import score
from firmad.robustness.pgd import attack_detector
from firmad.robustness.spec import ATTACKS, TARGETS, AttackSpec, SweepSpec
from firmad.robustness.square import run_square

__all__ = [
    "Verdict",
    "bootstrap_auroc",
    "format_markdown",
    "ATTACKS",
    "SweepSpec",
    "robust_auroc_sweep",
    "stratified_subset",
    "sweep",
]

SQUARE_CHECK_QUERIES = 1000
_SIDE_NAMES = {"both": "'both'", "normal": "normals-only", "anomaly": "anomalies-only"}
MONOTONE_TOL = 0.005  # AUROC may rise by half a point with ε (beyond its interval)
LARGE_EPS_MAX_AUROC = 0.05
CONVERGENCE_TOL = 0.01  # more steps / restarts / transfer may lower AUROC by one point at most


@dataclass
class Verdict:
    """One strength check: its name, whether it passed, and what was measured."""

    name: str
    passed: bool
    detail: str


def stratified_subset(y, n: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded subset of size min(N, n) keeping the normal/anomaly shares."""
    y = torch.as_tensor(y).reshape(-1).long()
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"subset size must be a positive integer or None, got {n!r}.")
    gen = torch.Generator().manual_seed(int(seed))
    return stratified_indices(y, n, gen)


# --------------------------------------------------------------------------- bootstrap


def _resamples(y: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(B, N) indices: each row resamples normals and anomalies separately, with replacement."""
    rng = np.random.default_rng(seed)
    normals, anomalies = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    pick_n = rng.integers(0, len(normals), size=(n_resamples, len(normals)))
    pick_a = rng.integers(0, len(anomalies), size=(n_resamples, len(anomalies)))
    return np.concatenate([normals[pick_n], anomalies[pick_a]], axis=1)


def _auroc_rows(s: np.ndarray, n_normal: int) -> np.ndarray:
    """AUROC of each row of s (B, N) whose first ``n_normal`` columns are normals (ties = ½)."""
    ranks = rankdata(s, axis=1)
    n_anom = s.shape[1] - n_normal
    u = ranks[:, n_normal:].sum(axis=1) - n_anom * (n_anom + 1) / 2.0
    return u / (n_normal * n_anom)


def _bootstrap(scores: np.ndarray, resamples: np.ndarray, n_normal: int) -> np.ndarray:
    return _auroc_rows(scores[resamples], n_normal)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_auroc(
    y, scores, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC and its stratified percentile-bootstrap 95 % interval: ``(auroc, low, high)``."""
    point = evaluate_scores(y, scores)["auroc"]  # validates the inputs
    y = np.asarray(torch.as_tensor(y).reshape(-1).cpu()).astype(np.int64)
    s = np.asarray(torch.as_tensor(scores).reshape(-1).double().cpu())
    res = _resamples(y, n_resamples, seed)
    return (point, *_interval(_bootstrap(s, res, int((y == 0).sum()))))


# --------------------------------------------------------------------------- the sweep


def _mode_scores(mode: str, y: Tensor, clean: Tensor, adv: Tensor) -> Tensor:
    if mode == "both":
        return adv
    group = 0 if mode == "normal" else 1
    return torch.where(y == group, adv, clean)


def _sweep_data(x, y, subset: int | None, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The checked images and labels, cut to the stratified subset; and the subset's indices."""
    x = _check_images(x)
    y = y_all = _check_labels(y, x.shape[0], x.device)
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


def _attack_count(spec: SweepSpec, transfer: bool) -> int:
    """How many attacks the sweep runs (for ``progress``)."""
    total = len(spec.nonzero)
    check_eps = spec.check_at
    if spec.checks:
        total += 1  # large_eps
        if check_eps is not None and check_eps > 0:
            reused = spec.attack_targets == "both" and check_eps in spec.nonzero
            total += 2 + (0 if reused else 1) + transfer + spec.square_check
    return total


class _Sweep:
    """One sweep's images, bootstrap resamples and attack bookkeeping (progress, cache)."""

    def __init__(self, detector, x: Tensor, y: Tensor, spec: SweepSpec, transfer_from, hooks):
        self.detector, self.x, self.y, self.spec = detector, x, y, spec
        self.progress, self.cache, self.on_step = hooks
        self.y_cpu = y.cpu()
        self.y_np = y_np = self.y_cpu.numpy()
        self.n_normal, self.n_anomaly = int((y_np == 0).sum()), int((y_np == 1).sum())
        # The bootstrap sees normals first, then anomalies; every score vector is put in that
        # order.
        self.order = np.concatenate([np.flatnonzero(y_np == 0), np.flatnonzero(y_np == 1)])
        self.resamples = _resamples(np.sort(y_np), spec.n_bootstrap, spec.seed)
        self.boot: dict[tuple[float, str], np.ndarray] = {}
        self.done, self.total = 0, _attack_count(spec, transfer_from is not None)
        self.transfer_from = transfer_from
        self.clean = score(detector, x, spec.batch_size).double().cpu()

    def attack(self, det, eps: float, targets: str = "both", key=None, **override):
        """Scores of the detector on images attacked through ``det``, the winning attack per
        image and the attacks' names; taken from the cache when it holds ``key``."""
        what = ", ".join(f"{k}={v}" for k, v in override.items() if k != "kind")
        what = f"eps={eps:.4g}" + (f" ({what})" if what else "")
        if self.progress is not None:
            self.progress(self.done, self.total, what)
        self.done += 1
        key = key or what
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            return (torch.tensor(hit["scores"], dtype=torch.float64), torch.tensor(hit["winner"]),
                    hit["attacks"])  # fmt: skip
        kind = override.pop("kind", self.spec.attack)
        a = self.spec.attack_at(eps, targets, **override)
        if kind == "square":
            a = AttackSpec(eps, a.norm, a.steps, None, a.restarts, targets, 1, True, a.seed,
                           a.batch_size)  # fmt: skip
            res = run_square(det, self.x, self.y, a, on_step=self.on_step)
        else:
            res = attack_detector(  # by keywords: one name to wrap (the tests count attacks)
                det, self.x, self.y, **asdict(a), surrogates=self.spec.surrogates,
                on_step=self.on_step,
            )  # fmt: skip
        adv = score(self.detector, res.images, self.spec.batch_size).double().cpu()
        if self.cache is not None:
            self.cache.put(key, {"scores": adv.tolist(), "winner": res.winner.cpu().tolist(),
                                 "attacks": res.attacks})  # fmt: skip
        return adv, res.winner.cpu(), res.attacks

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
        self.boot[(eps, mode)] = _bootstrap(s_np[self.order], self.resamples, self.n_normal)
        lo, hi = _interval(self.boot[(eps, mode)])
        return {
            "eps": eps,
            "target": mode,
            "auroc": m["auroc"],
            "ci_low": lo,
            "ci_high": hi,
            "n": len(self.y_np),
            "n_normal": self.n_normal,
            "n_anomaly": self.n_anomaly,
            "aupr_anomaly": m["aupr_anomaly"],
            "aupr_normal": m["aupr_normal"],
            "fpr95": m["fpr95"],
            "wins": wins,
        }

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
        """The verdicts of the strength checks (see the module docstring) and those skipped."""
        spec = self.spec
        if not spec.checks:
            return [], ["monotone", "large_eps", "more_steps", "more_restarts", "transfer"]
        verdicts = [_check_monotone(rows, self.boot, spec.targets_list)]
        large_eps = spec.large_at(self.x[0].numel())
        large = self.attack(self.detector, large_eps, key="large_eps")[0]
        sides = {m: self.auroc_of(_mode_scores(m, self.y_cpu, self.clean, large)) for m in TARGETS}
        verdicts.append(_check_large_eps(sides, spec.norm, large_eps))
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
    detector,
    x: Tensor,
    y,
    *,
    eps_list: Sequence[float],
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    targets_list: Sequence[str] = ("normal", "anomaly", "both"),
    step_factor: float = 2.5,
    schedule: str = "fixed",
    eot: int = 1,
    random_start: bool = True,
    seed: int = 0,
    batch_size: int | None = None,
    surrogates: bool | Mapping = True,
    subset: int | None = None,
    n_bootstrap: int = 1000,
    checks: bool = True,
    check_eps: float | None = None,
    large_eps: float | None = None,
    transfer_from=None,
    progress: Callable[[int, int, str], None] | None = None,
    attack: str = "pgd",
    square_check: bool = False,
    cache=None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """AUROC under attack for every ε and target mode, with intervals and strength checks.

    ``detector``: object with ``score_tensor`` (or a callable), higher = more anomalous;
    ``x``, ``y``: float images (N, C, H, W) in [0, 1], labels 1 = anomaly, 0 = normal. The
    settings are the fields of `SweepSpec` (see there); ``sweep`` takes them as one spec.
    """
    spec = SweepSpec(
        eps_list, norm, steps, restarts, targets_list, step_factor, schedule, eot,
        random_start, seed, batch_size, surrogates, subset, n_bootstrap, checks, check_eps,
        large_eps, attack, square_check,
    )  # fmt: skip
    return sweep(detector, x, y, spec, transfer_from, progress, cache, on_step)


def sweep(detector, x, y, spec: SweepSpec, transfer_from=None, progress=None, cache=None,
          on_step=None) -> dict:  # fmt: skip
    """``robust_auroc_sweep`` with its settings in a `SweepSpec`.

    Args:
        transfer_from: optional surrogate detector for the black-box transfer check.
        progress: called as ``progress(done, total, what)`` before each attack and once at the
            end (``done == total``), e.g. to drive a progress bar.
        cache: optional store of finished attacks (``get(key) -> dict | None`` and
            ``put(key, dict)``) so an interrupted sweep continues; the caller keeps it to one
            set of settings (see ``firmad.robustness.audit``).
        on_step: ``on_step(done, total)`` after every step of the current attack.

    Returns:
        A JSON-serialisable dict: ``settings``, ``subset``, ``clean``, ``rows`` (one per ε and
        mode: auroc, ci_low, ci_high, n, n_normal, n_anomaly, aupr_anomaly, fpr95, wins),
        ``verdicts``, ``checks_skipped`` and ``passed`` (all verdicts passed).
    """
    x, y, idx = _sweep_data(x, y, spec.subset, spec.seed)
    run = _Sweep(detector, x, y, spec, transfer_from, (progress, cache, on_step))
    clean_row = run.row(0.0, "clean", run.clean, {})
    rows, both_auroc = run.eps_rows()
    verdicts, skipped = run.strength_checks(rows, both_auroc)
    if progress is not None:
        progress(run.total, run.total, "done")
    return {
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


def _step_text(attack: str, schedule: str, step_factor: float) -> str:
    if attack == "square":
        return "square (no gradient)"
    return f"{step_factor}*eps/steps" if schedule == "fixed" else "2*eps, halved"


def _name_of(obj) -> str:
    """How a transfer source is named in the results: its ``name`` attribute or its type."""
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) else type(obj).__name__


def _check_large_eps(aurocs: dict[str, float], norm: str, eps: float) -> Verdict:
    """At a huge eps any image is reachable: the AUROC must collapse with both groups
    attacked and with each group attacked alone (one side can stall while 'both' falls)."""
    high = {m: a for m, a in aurocs.items() if not a < LARGE_EPS_MAX_AUROC}
    passed = not high
    shown = ", ".join(f"{_SIDE_NAMES[m]} {a:.4f}" for m, a in aurocs.items())
    detail = f"AUROC {shown} at {norm} eps={eps:.4g} (each needs < {LARGE_EPS_MAX_AUROC})"
    if "both" in high:
        hint = (
            "gradients may be masked or obfuscated (non-differentiable, detached or saturated "
            "score): the robust AUROC is likely overestimated; try surrogate scores, eot, or "
            "more steps"
        )
    elif high:
        hint = (
            f"the attack stalls when only the {' and '.join(_SIDE_NAMES[m] for m in high)} "
            "side is attacked (its images cannot be moved past the other group): that row's "
            "robust AUROC is likely overestimated; try a targeted surrogate, the apgd schedule "
            "or more steps"
        )
    if not passed:
        worst = max(high.values())
        warnings.warn(
            f"AUROC stays at {worst:.3f} at eps={eps:.3g}; {hint}.", RuntimeWarning, stacklevel=3
        )
        detail += f"; WARNING: {hint}"
    return Verdict("large_eps", passed, detail)


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


def _check_monotone(rows: list[dict], boot: dict, modes: list[str]) -> Verdict:
    """AUROC must not rise with ε: a rise counts when even the lower 2.5 % of its paired
    bootstrap distribution exceeds MONOTONE_TOL."""
    problems, worst = [], 0.0
    for mode in modes:
        mine = [r for r in rows if r["target"] == mode]
        for prev, cur in zip(mine, mine[1:], strict=False):
            diff = boot[(cur["eps"], mode)] - boot[(prev["eps"], mode)]
            low = float(np.percentile(diff, 2.5))
            rise = cur["auroc"] - prev["auroc"]
            worst = max(worst, rise)
            if low > MONOTONE_TOL:
                problems.append(
                    f"{mode}: eps {prev['eps']:.4g} -> {cur['eps']:.4g} AUROC "
                    f"{prev['auroc']:.4f} -> {cur['auroc']:.4f} (interval low of the rise "
                    f"{low:.4f})"
                )
    if problems:
        detail = "AUROC rises with eps (attack too weak or step size too large): " + "; ".join(
            problems
        )
        return Verdict("monotone", False, detail)
    return Verdict(
        "monotone", True, f"AUROC does not rise with eps (largest rise {max(worst, 0):.4f})"
    )


# --------------------------------------------------------------------------- report


def _eps_text(eps: float, norm: str) -> str:
    if eps == 0:
        return "0 (clean)"
    k = eps * 255
    if norm == "linf" and abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{eps:.4g}"


def format_markdown(result: dict) -> str:
    """A Markdown table (rows: ε, columns: target modes; AUROC % [95 % CI]) and the verdicts."""
    st = result["settings"]
    modes = st["targets_list"]
    sub = result["subset"]
    lines = [
        f"Robust AUROC, {st['norm']} {attack_name(st)}-{st['steps']} x {st['restarts']} "
        "restart(s), "
        f"step {st['step_size']}, eot {st['eot']}, n = {sub['n']} "
        f"({sub['n_normal']} normal / {sub['n_anomaly']} anomalous), seed {st['seed']}.",
        "",
        "| eps | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for eps in st["eps_list"]:
        cells = []
        for mode in modes:
            r = next(r for r in result["rows"] if r["eps"] == eps and r["target"] == mode)
            cells.append(
                f"{100 * r['auroc']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
            )
        lines.append(f"| {_eps_text(eps, st['norm'])} | " + " | ".join(cells) + " |")
    if result["verdicts"] or result["checks_skipped"]:
        lines.append("")
        lines.append("Strength checks:")
        for v in result["verdicts"]:
            mark = "pass" if v["passed"] else "FAIL"
            lines.append(f"- {mark} `{v['name']}`: {v['detail']}")
        for name in result["checks_skipped"]:
            lines.append(f"- not run `{name}`")
    return "\n".join(lines) + "\n"

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

import math
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
from firmad.robustness.attacks import (
    _check_images,
    _check_labels,
    _check_settings,
    attack_detector,
    score,
    square_attack,
)
from firmad.robustness.spec import NORMS, TARGETS

__all__ = [
    "Verdict",
    "bootstrap_auroc",
    "format_markdown",
    "robust_auroc_sweep",
    "stratified_subset",
]

ATTACKS = ("pgd", "square")
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


def _check_sweep(norm, eps_list, targets_list, n_bootstrap):
    norm = str(norm).lower()
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}.")
    if isinstance(eps_list, str) or not isinstance(eps_list, Sequence) or not eps_list:
        raise ConfigError("eps_list must be a non-empty list of radii in [0, 1] pixel space.")
    for e in eps_list:
        if isinstance(e, bool) or not isinstance(e, int | float) or not math.isfinite(e) or e < 0:
            raise ConfigError(f"every eps must be a finite number >= 0, got {e!r}.")
    if isinstance(targets_list, str):
        targets_list = (targets_list,)
    bad = [t for t in targets_list if t not in TARGETS]
    if bad or not targets_list:
        raise ConfigError(f"targets_list must name some of {TARGETS}, got {list(targets_list)}.")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise ConfigError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}.")
    return norm, sorted({float(e) for e in eps_list}), list(dict.fromkeys(targets_list))


def _mode_scores(mode: str, y: Tensor, clean: Tensor, adv: Tensor) -> Tensor:
    if mode == "both":
        return adv
    group = 0 if mode == "normal" else 1
    return torch.where(y == group, adv, clean)


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

    Args:
        detector: object with ``score_tensor`` (or a callable), higher = more anomalous.
        x, y: float images (N, C, H, W) in [0, 1]; labels 1 = anomaly, 0 = normal.
        eps_list: radii in [0, 1] pixel space; 0 gives the clean AUROC.
        norm, steps, restarts, eot, random_start, batch_size, surrogates: as in
            ``attack_detector``; step size = ``step_factor``·ε/steps.
        schedule: ``"fixed"`` steps, or ``"apgd"`` (first step 2·ε, halved where progress
            stalls; ``step_factor`` is then unused).
        targets_list: rows to report among "normal", "anomaly", "both".
        seed: seeds the attacks, the subset and the bootstrap.
        subset: evaluate on a stratified seeded subset of this size (None = all images).
        n_bootstrap: bootstrap resamples for the 95 % intervals.
        checks: run the strength checks (they cost about four more attacks).
        check_eps: ε of the steps/restarts/transfer checks; default the median non-zero ε.
        large_eps: ε of the masking check; default 1.0 (L∞) or √d (L2).
        transfer_from: optional surrogate detector for the black-box transfer check.
        progress: called as ``progress(done, total, what)`` before each attack and once at the
            end (``done == total``), e.g. to drive a progress bar.
        attack: ``"pgd"`` (gradient attacks, ``schedule`` picks PGD or APGD) or ``"square"``
            (the score-based black-box Square attack, L∞; ``steps`` is then its number of
            queries and surrogates are unused).
        square_check: with the checks, also run the Square attack (``steps`` queries, at least
            1000) at ``check_eps``: it must not beat the attack by more than 1 point.
        cache: optional store of finished attacks (``get(key) -> dict | None`` and
            ``put(key, dict)``) so an interrupted sweep continues; the caller keeps it to one
            set of settings (see ``firmad.robustness.audit``).
        on_step: ``on_step(done, total)`` after every step of the current attack.

    Returns:
        A JSON-serialisable dict: ``settings``, ``subset``, ``clean``, ``rows`` (one per ε and
        mode: auroc, ci_low, ci_high, n, n_normal, n_anomaly, aupr_anomaly, fpr95, wins),
        ``verdicts``, ``checks_skipped`` and ``passed`` (all verdicts passed).
    """
    norm, eps_sorted, modes = _check_sweep(norm, eps_list, targets_list, n_bootstrap)
    _check_settings(
        norm, 0.0, steps, None, restarts, "both", eot, random_start, batch_size, schedule
    )
    if attack not in ATTACKS:
        raise ConfigError(f"attack must be one of {ATTACKS}, got {attack!r}.")
    if attack == "square" and norm != "linf":
        raise ConfigError("the Square attack is implemented for norm='linf' only.")
    for name, value in [
        ("step_factor", step_factor),
        ("check_eps", check_eps),
        ("large_eps", large_eps),
    ]:
        if value is not None and not _positive(value):
            raise ConfigError(f"{name} must be a positive number, got {value!r}.")
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
    y_np = y.cpu().numpy()
    n_normal, n_anomaly = int((y_np == 0).sum()), int((y_np == 1).sum())
    # The bootstrap sees normals first, then anomalies; every score vector is put in that order.
    order = np.concatenate([np.flatnonzero(y_np == 0), np.flatnonzero(y_np == 1)])
    resamples = _resamples(np.sort(y_np), n_bootstrap, seed)
    # One attack per eps serves every mode: both groups unless only one mode is asked for.
    both_needed = "both" in modes or {"normal", "anomaly"} <= set(modes)
    attack_targets = "both" if both_needed else modes[0]
    attack_kind = attack
    settings = dict(
        norm=norm,
        steps=steps,
        restarts=restarts,
        eot=eot,
        random_start=random_start,
        batch_size=batch_size,
        surrogates=surrogates,
        schedule=schedule,
    )

    nonzero = [e for e in eps_sorted if e > 0]
    if check_eps is None and nonzero:
        check_eps = float(nonzero[(len(nonzero) - 1) // 2])
    if large_eps is None:
        large_eps = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
    total = len(nonzero)
    if checks:
        total += 1  # large_eps
        if check_eps is not None and check_eps > 0:
            reused = attack_targets == "both" and check_eps in nonzero
            total += 2 + (0 if reused else 1) + (transfer_from is not None) + square_check
    done = [0]
    square_queries = max(steps, SQUARE_CHECK_QUERIES)

    def run_attack(det, eps: float, targets: str = "both", key: str | None = None, **override):
        """Scores of the detector on images attacked through ``det``, the winning attack per
        image and the attacks' names; taken from ``cache`` when it holds ``key``."""
        what = ", ".join(f"{k}={v}" for k, v in override.items() if k != "kind")
        what = f"eps={eps:.4g}" + (f" ({what})" if what else "")
        if progress is not None:
            progress(done[0], total, what)
        done[0] += 1
        key = key or what
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            return (torch.tensor(hit["scores"], dtype=torch.float64), torch.tensor(hit["winner"]),
                    hit["attacks"])  # fmt: skip
        kw = {**settings, **override}
        kind = kw.pop("kind", attack_kind)
        if kind == "square":
            res = square_attack(
                det, x, y, eps=eps, norm=norm, queries=kw["steps"], restarts=kw["restarts"],
                targets=targets, seed=seed, batch_size=batch_size, on_step=on_step,
            )  # fmt: skip
        else:
            fixed = eps > 0 and kw["schedule"] == "fixed"
            step_size = step_factor * eps / kw["steps"] if fixed else None
            res = attack_detector(
                det, x, y, eps=eps, step_size=step_size, targets=targets, seed=seed,
                on_step=on_step, **kw,
            )  # fmt: skip
        adv = score(detector, res.images, batch_size).double().cpu()
        if cache is not None:
            cache.put(key, {"scores": adv.tolist(), "winner": res.winner.cpu().tolist(),
                            "attacks": res.attacks})  # fmt: skip
        return adv, res.winner.cpu(), res.attacks

    def auroc_of(s: Tensor) -> float:
        return evaluate_scores(y_np, s.double().cpu().numpy())["auroc"]

    def attacked_auroc(eps: float, source=detector, key=None, **override) -> float:
        """'both' AUROC of the detector on images attacked through ``source``."""
        return auroc_of(run_attack(source, eps, key=key, **override)[0])

    boot: dict[tuple[float, str], np.ndarray] = {}

    def row(eps: float, mode: str, s: Tensor, wins: dict[str, int]) -> dict:
        s_np = s.double().cpu().numpy()
        m = evaluate_scores(y_np, s_np)
        boot[(eps, mode)] = _bootstrap(s_np[order], resamples, n_normal)
        lo, hi = _interval(boot[(eps, mode)])
        return {
            "eps": eps,
            "target": mode,
            "auroc": m["auroc"],
            "ci_low": lo,
            "ci_high": hi,
            "n": len(y_np),
            "n_normal": n_normal,
            "n_anomaly": n_anomaly,
            "aupr_anomaly": m["aupr_anomaly"],
            "aupr_normal": m["aupr_normal"],
            "fpr95": m["fpr95"],
            "wins": wins,
        }

    clean = score(detector, x, batch_size).double().cpu()
    y_cpu = y.cpu()
    clean_row = row(0.0, "clean", clean, {})
    rows = []
    both_auroc: dict[float, float] = {}  # reused by the checks
    for eps in eps_sorted:
        if eps == 0:
            adv, res = clean, None
        else:
            adv, *res = run_attack(detector, eps, attack_targets, key=f"eps={eps!r}")
        if attack_targets == "both":
            both_auroc[eps] = auroc_of(adv)
        for mode in modes:
            wins = {} if res is None else _wins(res[0], res[1], y_cpu, mode)
            rows.append(row(eps, mode, _mode_scores(mode, y_cpu, clean, adv), wins))

    verdicts: list[Verdict] = []
    skipped: list[str] = []
    if not checks:
        skipped += ["monotone", "large_eps", "more_steps", "more_restarts", "transfer"]
    else:
        verdicts.append(_check_monotone(rows, boot, modes))
        large = run_attack(detector, large_eps, key="large_eps")[0]
        sides = {m: auroc_of(_mode_scores(m, y_cpu, clean, large)) for m in TARGETS}
        verdicts.append(_check_large_eps(sides, norm, large_eps))
        if check_eps is None or check_eps <= 0:
            skipped += ["more_steps", "more_restarts", "transfer"]
        else:
            ref = both_auroc.get(check_eps)
            if ref is None:
                ref = attacked_auroc(check_eps, key="check_eps")
            head = f"'both' AUROC at eps={check_eps:.4g}: {ref:.4f} with steps={steps}"
            tail = f"(may be lower by {CONVERGENCE_TOL} at most)"
            more = attacked_auroc(check_eps, key="more_steps", steps=2 * steps)
            detail = f"{head}; {more:.4f} with steps={2 * steps} {tail}"
            verdicts.append(Verdict("more_steps", more >= ref - CONVERGENCE_TOL, detail))
            more = attacked_auroc(
                check_eps, key="more_restarts", restarts=restarts + 1, random_start=True
            )
            detail = f"{head}, restarts={restarts}; {more:.4f} with restarts={restarts + 1} {tail}"
            verdicts.append(Verdict("more_restarts", more >= ref - CONVERGENCE_TOL, detail))
            if transfer_from is None:
                skipped.append("transfer")
            else:
                black = attacked_auroc(check_eps, source=transfer_from, key="transfer")
                name = _name_of(transfer_from)
                detail = f"{head} (white-box); {black:.4f} transferred from {name} {tail}"
                verdicts.append(Verdict("transfer", black >= ref - CONVERGENCE_TOL, detail))
            if square_check:
                black = attacked_auroc(
                    check_eps, key="square", kind="square", steps=square_queries, restarts=1
                )
                what = f"the black-box Square attack ({square_queries} queries)"
                detail = f"{head}; {black:.4f} with {what} {tail}"
                verdicts.append(Verdict("square", black >= ref - CONVERGENCE_TOL, detail))

    if progress is not None:
        progress(total, total, "done")
    return {
        "settings": {
            "norm": norm,
            "eps_list": eps_sorted,
            "steps": steps,
            "restarts": restarts,
            "step_size": _step_text(attack, schedule, step_factor),
            "schedule": schedule,
            "targets_list": modes,
            "attack_targets": attack_targets,
            "eot": eot,
            "random_start": random_start,
            "seed": seed,
            "batch_size": batch_size,
            "surrogates": _describe(surrogates),
            "n_bootstrap": n_bootstrap,
            "check_eps": check_eps,
            "large_eps": large_eps,
            "transfer_from": None if transfer_from is None else _name_of(transfer_from),
            "attack": attack_kind,
            "square_check": square_check,
            "square_queries": square_queries if square_check else None,
            "detector": type(detector).__name__,
        },
        "subset": {
            "requested": subset,
            "n": len(y_np),
            "n_normal": n_normal,
            "n_anomaly": n_anomaly,
            "seed": seed,
            "indices": idx.tolist() if subset is not None else None,
        },
        "clean": clean_row,
        "rows": rows,
        "verdicts": [asdict(v) for v in verdicts],
        "checks_skipped": skipped,
        "passed": all(v.passed for v in verdicts),
    }


def _positive(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and v > 0 and math.isfinite(v)


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

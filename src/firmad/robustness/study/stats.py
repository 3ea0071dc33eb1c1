"""The study's statistics and its verdict rule.

Intervals are t-intervals over seeds: per class over that class's seeds (n - 1 degrees of
freedom); pooled over the class means (k - 1 degrees of freedom), so classes are a random
effect and a pooled claim rests on k classes, not on k x n cells. A difference between a set
and its control is taken per seed (the same seed's cell built both) before the interval.

The rule, in Ilyas et al.'s sense (a model trained only on the set generalises to the clean
test set), the same for both branches, is `RULE` word for word.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as st

from firmad.robustness.study.config import (
    BINARY_RULE,
    CEILING,
    StudyConfig,
    branch_of,
    one_class_rule,
)

USEFUL = "useful"
SIGNAL = "carries signal, not sufficient"
NOT_USEFUL = "not useful"
NO_VERDICT = "no verdict"
ORDER = (NOT_USEFUL, SIGNAL, USEFUL)  # weakest first

RULE = (
    'A set is "useful" when the interval of its own clean AUROC lies above chance (50) and '
    'the interval of its difference from each of its controls lies above 0; it "carries '
    'signal, not sufficient" when it beats every control but its own interval does not lie '
    'above chance; otherwise it is "not useful". Without an interval (one seed, or a stage '
    "that missed its floor in too many cells) there is no verdict. A branch answers with the "
    "weakest verdict of its key sets."
)
# the sets whose verdicts answer each question (the weakest of them is the answer)
QUESTIONS = {
    "one_class": "non-robust features of a FIRM encoder (D_NR), the paper's question",
    "robust_features": "robust features of a FIRM encoder (D_R)",
    "binary": "non-robust features of a binary classifier (D_det, D_rand), a surrogate",
}


def key_sets(cfg: StudyConfig) -> dict[str, tuple[str, ...]]:
    starts = cfg.inversion_starts
    return {
        "one_class": tuple(f"D_NR-{k}" for k in starts),
        "robust_features": tuple(f"D_R-{k}" for k in starts),
        "binary": ("D_det", "D_rand"),
    }


def rule_sets(cfg: StudyConfig) -> dict[str, tuple[str, ...]]:
    """Every set the rule reads, with its controls, for the study's branches."""
    every = {**BINARY_RULE, **one_class_rule(cfg.inversion_starts)}
    return {s: c for s, c in every.items() if branch_of(s) in cfg.branches}


def measured(cfg: StudyConfig, variant: str, metric: str) -> list[str]:
    """The rule's sets a view measures: every one clean; attacked, the binary ones only when
    the study attacks them; the transfer variant, those it trains with all their controls."""
    sets = rule_sets(cfg)
    if variant == "transfer":
        chosen = set(cfg.transfer_sets)
        return [n for n, ctl in sets.items() if n in chosen and chosen.issuperset(ctl)]
    if metric != "clean" and not cfg.attack_binary_sets:
        return [n for n in sets if branch_of(n) != "binary"]
    return list(sets)


def t_interval(values, confidence: float) -> dict[str, Any]:
    """Mean and two-sided t-interval of ``values`` (None bounds below two values)."""
    v = np.asarray(list(values), dtype=float)
    n = len(v)
    mean = float(v.mean()) if n else None
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": n, "sd": None}
    sd = float(v.std(ddof=1))
    half = float(st.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def rule(own: dict, diffs: dict[str, dict], chance: float) -> str:
    """`RULE` applied to a set's own interval and its differences from its controls."""
    if own["lo"] is None or any(d["lo"] is None for d in diffs.values()):
        return NO_VERDICT
    beats = all(d["lo"] > 0 for d in diffs.values())
    if beats and own["lo"] > chance:
        return USEFUL
    return SIGNAL if beats else NOT_USEFUL


def weakest(verdicts: list[str]) -> str:
    """A question's answer: the weakest verdict of its key sets (none if one has none)."""
    if not verdicts or NO_VERDICT in verdicts:
        return NO_VERDICT
    return min(verdicts, key=ORDER.index)


# --- per-cell values -----------------------------------------------------------------------------


def cell_values(result: dict, variant: str, metric: str) -> dict[str, float]:
    """{set: AUROC} of one cell: ``variant`` "sets" (the study's backbone) or "transfer";
    ``metric`` "clean" or an attack radius ("0.5")."""
    out = {}
    for branch in ("binary", "one_class"):
        for name, ev in result.get(branch, {}).get(variant, {}).items():
            value = ev["clean_auroc"] if metric == "clean" else ev.get("attacked", {}).get(metric)
            if value is not None:
                out[name] = value
    return out


def _group_inputs(cfg, cells: list[dict], variant: str, metric: str, name: str, controls):
    """The rule's inputs for one set over a group of cells: own AUROC and per-control
    differences per seed (only cells holding the set and all its controls)."""
    branch = branch_of(name)
    ran = [r for r in cells if branch in r and "failed" not in r[branch]]
    values = [cell_values(r, variant, metric) for r in ran]
    ok = [v for v in values if name in v and all(k in v for k in controls)]
    return ran, ok


def set_inputs(cfg: StudyConfig, groups: dict, variant: str, metric: str, name: str) -> dict:
    """The rule for one set in one group of cells (a class, or all for the pooled line)."""
    controls = rule_sets(cfg)[name]
    ran, ok = [], []
    per_class = {}
    for cls, cells in groups.items():
        r, o = _group_inputs(cfg, cells, variant, metric, name, controls)
        ran += r
        ok += o
        per_class[cls] = o
    needed = cfg.cells_needed(len(ran)) if ran else 0
    out: dict[str, Any] = {"cells_run": len(ran), "cells_passed": len(ok), "cells_needed": needed}
    if len(groups) == 1:  # one class: intervals over its seeds
        own = t_interval([v[name] for v in ok], cfg.confidence)
        diffs = {k: t_interval([v[name] - v[k] for v in ok], cfg.confidence) for k in controls}
    else:  # pooled: over the class means (classes are a random effect)
        means = [o for o in per_class.values() if o]
        own = t_interval([np.mean([v[name] for v in o]) for o in means], cfg.confidence)
        diffs = {
            k: t_interval([np.mean([v[name] - v[k] for v in o]) for o in means], cfg.confidence)
            for k in controls
        }
    out.update(own=own, diffs=diffs)
    if not ran or len(ok) < needed:
        out["verdict"] = NO_VERDICT
        out["why"] = (
            f"its stages passed their floors in {len(ok)} of {len(ran)} cells (needs {needed})"
        )
    else:
        out["verdict"] = rule(own, diffs, cfg.chance)
        if out["verdict"] == NO_VERDICT:
            out["why"] = "an interval needs at least two " + (
                "seeds" if len(groups) == 1 else "classes"
            )
    return out


def levels(cfg: StudyConfig, groups: dict, variant: str, metric: str) -> dict[str, dict]:
    """The AUROC of every set (controls, ceilings, the chance set included) per group."""
    every = sorted(
        {n for cells in groups.values() for r in cells for n in cell_values(r, variant, metric)}
    )
    out = {}
    for name in every:
        per_class = [
            [cell_values(r, variant, metric).get(name) for r in cells] for cells in groups.values()
        ]
        per_class = [[v for v in vs if v is not None] for vs in per_class]
        if len(groups) == 1:
            out[name] = t_interval(per_class[0], cfg.confidence)
        else:
            out[name] = t_interval([np.mean(v) for v in per_class if v], cfg.confidence)
    return out


def summarise(cfg: StudyConfig, results: dict[tuple[int, int], dict]) -> dict[str, Any]:
    """Per class and pooled: the rule's inputs and verdict for every set (clean; attacked at
    the largest radius for the study's own backbone; clean for the transfer variant), the
    level of every set, each question's answer, and the floors for a general claim."""
    by_class: dict[str, list[dict]] = {}
    for (cls, _), r in sorted(results.items()):
        by_class.setdefault(str(cls), []).append(r)
    groups = {c: {c: cells} for c, cells in by_class.items()}
    if len(by_class) > 1:
        groups["pooled"] = by_class
    eps = str(float(max(cfg.attack_eps)))
    variants = [("sets", "clean"), ("sets", eps)]
    if cfg.transfer_backbone:
        variants.append(("transfer", "clean"))
    out: dict[str, Any] = {
        "rule": RULE,
        "chance": cfg.chance,
        "confidence": cfg.confidence,
        "groups": {},
    }
    for gname, group in groups.items():
        entry = {}
        for variant, metric in variants:
            sets = {
                n: set_inputs(cfg, group, variant, metric, n)
                for n in measured(cfg, variant, metric)
            }
            answers = {
                q: weakest([sets[n]["verdict"] for n in names if n in sets])
                for q, names in key_sets(cfg).items()
                if any(n in sets for n in names)
            }
            entry[f"{variant} {metric}"] = {
                "sets": sets,
                "answers": answers,
                "levels": levels(cfg, group, variant, metric),
            }
        entry["seeds"] = sorted({r["seed"] for cells in group.values() for r in cells})
        out["groups"][gname] = entry
    n_classes = len(by_class)
    min_seeds = min((len(v) for v in by_class.values()), default=0)
    out["floors"] = {
        "classes": n_classes,
        "seeds_min": min_seeds,
        "general_claim_allowed": n_classes >= 3 and min_seeds >= 5,
    }
    out["fresh_inits"] = fresh_init_check(results)
    out["timing"] = timing(results)
    out["ceilings"] = CEILING
    return out


def fresh_init_check(results: dict) -> dict[str, Any]:
    """Every fresh model's init seed and initial-weights digest against its cell's source
    models' (those that made the sets): how many models, how many differ."""
    sources = ("binary-standard", "binary-robust", "standard", "robust")
    n = differ = 0
    for r in results.values():
        for branch in ("binary", "one_class"):
            models = r.get(branch, {}).get("models", {})
            src = [models[s] for s in sources if s in models]
            for label, m in models.items():
                if label in sources:
                    continue
                n += 1
                differ += all(
                    m["init_seed"] != s["init_seed"] and m["init_digest"] != s["init_digest"]
                    for s in src
                )
    return {"fresh_models": n, "differ_from_sources": differ, "all_differ": n == differ}


def timing(results: dict) -> dict[str, Any]:
    """Wall and CPU seconds of each cell (the invocation that built each branch) and the CPU
    seconds of its stages: training, testing (clean scores and attacks), constructions."""
    cells = {}
    for (cls, seed), r in results.items():
        row = {
            "wall_s": 0.0,
            "cpu_s": 0.0,
            "train_cpu_s": 0.0,
            "test_cpu_s": 0.0,
            "construct_cpu_s": 0.0,
        }
        for branch in ("binary", "one_class"):
            part = r.get(branch, {})
            row["wall_s"] += part.get("seconds_last_invocation") or 0.0
            row["cpu_s"] += part.get("cpu_s_last_invocation") or 0.0
            row["train_cpu_s"] += sum(
                m.get("train_cpu_s") or 0.0 for m in part.get("models", {}).values()
            )
            evals = [*part.get("sets", {}).values(), *part.get("transfer", {}).values()]
            evals += [part[k] for k in ("reference", "robust") if k in part]
            row["test_cpu_s"] += sum(e.get("cpu_s") or 0.0 for e in evals)
            built = [
                *part.get("constructions", {}).values(),
                *part.get("failed_constructions", {}).values(),
            ]
            row["construct_cpu_s"] += sum(m.get("cpu_s") or 0.0 for m in built)
        cells[f"c{cls}-s{seed}"] = {k: round(v, 1) for k, v in row.items()}
    cpu = sorted(v["cpu_s"] for v in cells.values())
    return {"cells": cells, "cpu_s_median": cpu[len(cpu) // 2] if cpu else None}

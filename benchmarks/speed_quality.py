"""Quality kept? The new training defaults (channels-last, ``train.amp: auto``) against plain fp32
contiguous training, paired cell by cell, from the two grids' bench.csv files.

    python benchmarks/speed_quality.py runs/bench/speed-fp32/bench.csv \\
        runs/bench/speed-fast/bench.csv [--runs runs/bench/speed-fp32 runs/bench/speed-fast] \\
        [--headline knn_cos:k=5] [--variant plain] [--margin 1.0]

The test, fixed before the runs (benchmarks/speed-quality-*-grid.yaml):

- a pair is one (recipe, class, seed) cell trained both ways; d = AUROC(new) - AUROC(fp32), in
  AUROC points (x 100), for the headline scorer and variant;
- per recipe, the 95 % paired t-interval of the mean d over its pairs (9: 3 classes x 3 seeds),
  mean +- t(0.975, n - 1) * sd(d) / sqrt(n); the Wilcoxon signed-rank p-value is shown beside;
- the seed spread: the pooled within-class standard deviation of the fp32 grid's AUROC over its
  seeds (sqrt of the mean per-class variance), in points;
- verdict "kept" when the whole interval lies within +-m, m = max(margin, seed spread) (margin
  1 AUROC point by default): any change is smaller than a point and than what a new seed does.
  Otherwise "worse" (interval entirely below -m), "better" (entirely above +m) or "not shown"
  (the interval reaches past +-m: more pairs needed).

With ``--runs``, each cell's results.json tells the precision it trained in (``numerics``):
the table says how many cells of each grid ran in bf16 and channels-last. Training times
(bench.csv's train_time_s) are compared too: the median over pairs of fp32 / new.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from statistics import mean, median, stdev

from scipy import stats
from seed_table import read


def headline_rows(path: Path, headline: str, variant: str) -> dict[tuple, dict]:
    """(recipe, class, seed) -> the headline row of that cell."""
    rows = [r for r in read(path) if r["name"] == headline and r["variant"] == variant]
    return {(r["recipe"], r["normal_class"], r["seed"]): r for r in rows}


def seed_spread(cells: dict[tuple, dict], recipe: str) -> float:
    """Pooled within-class sd of AUROC over seeds, in points (nan without two seeds)."""
    by_class: dict[int, list[float]] = {}
    for (rec, c, _), row in cells.items():
        if rec == recipe:
            by_class.setdefault(c, []).append(100 * row["auroc"])
    variances = [stdev(v) ** 2 for v in by_class.values() if len(v) >= 2]
    return math.sqrt(mean(variances)) if variances else float("nan")


def verdict(lo: float, hi: float, m: float) -> str:
    if -m <= lo and hi <= m:
        return "kept"
    if hi < -m:
        return "worse"
    if lo > m:
        return "better"
    return "not shown"


def compare(old: dict, new: dict, recipe: str, margin: float) -> dict:
    """The paired statistics of one recipe."""
    keys = sorted(k for k in old if k[0] == recipe and k in new)
    d = [100 * (new[k]["auroc"] - old[k]["auroc"]) for k in keys]
    n = len(d)
    out: dict = {"recipe": recipe, "pairs": n, "d": dict(zip(keys, d, strict=True))}
    if n < 2:
        return {**out, "verdict": "too few pairs"}
    sd = stdev(d)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    spread = seed_spread(old, recipe)
    m = max(margin, spread) if math.isfinite(spread) else margin
    lo, hi = mean(d) - half, mean(d) + half
    wilcoxon = stats.wilcoxon(d).pvalue if any(d) else 1.0
    speed = [
        float(old[k]["train_time_s"]) / float(new[k]["train_time_s"])
        for k in keys
        if old[k].get("train_time_s") and new[k].get("train_time_s")
    ]
    return {
        **out,
        "mean_old": mean(100 * old[k]["auroc"] for k in keys),
        "mean_new": mean(100 * new[k]["auroc"] for k in keys),
        "mean_d": mean(d),
        "sd_d": sd,
        "ci": (lo, hi),
        "wilcoxon_p": float(wilcoxon),
        "seed_sd": spread,
        "m": m,
        "verdict": verdict(lo, hi, m),
        "train_speedup": median(speed) if speed else None,
    }


def numerics_counts(run_root: Path) -> Counter:
    """(amp, channels_last) of every finished cell under a grid's output folder."""
    counts: Counter = Counter()
    for path in sorted(run_root.glob("*/*/results.json")):
        numerics = json.loads(path.read_text()).get("numerics") or {}
        counts[(numerics.get("amp", "?"), numerics.get("channels_last", "?"))] += 1
    return counts


def report(results: list[dict], args) -> str:
    lines = [
        f"Headline {args.headline} ({args.variant}); d = new - fp32 in AUROC points; "
        f"verdict 'kept' when the 95 % paired t-interval lies within +-m, m = max({args.margin:g}, "
        "seed sd).",
        "",
        "| recipe | pairs | fp32 | new | mean d | sd d | 95 % interval | Wilcoxon p | seed sd "
        "| m | verdict | training fp32 / new |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in results:
        if "ci" not in r:
            lines.append(f"| {r['recipe']} | {r['pairs']} | | | | | | | | | {r['verdict']} | |")
            continue
        speed = f"x{r['train_speedup']:.2f}" if r["train_speedup"] else ""
        lines.append(
            f"| {r['recipe']} | {r['pairs']} | {r['mean_old']:.2f} | {r['mean_new']:.2f} "
            f"| {r['mean_d']:+.2f} | {r['sd_d']:.2f} | [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] "
            f"| {r['wilcoxon_p']:.3f} | {r['seed_sd']:.2f} | {r['m']:.2f} | **{r['verdict']}** "
            f"| {speed} |"
        )
    lines += ["", "Pairs (class, seed): d in points"]
    for r in results:
        cells = ", ".join(f"c{c} s{s} {d:+.2f}" for (_, c, s), d in r["d"].items())
        lines.append(f"- {r['recipe']}: {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32", type=Path, help="bench.csv of speed-quality-fp32-grid.yaml")
    p.add_argument("new", type=Path, help="bench.csv of speed-quality-fast-grid.yaml")
    p.add_argument("--headline", default="knn_cos:k=5")
    p.add_argument("--variant", default="plain")
    p.add_argument("--margin", type=float, default=1.0, help="AUROC points")
    p.add_argument("--runs", type=Path, nargs=2, metavar=("FP32_DIR", "NEW_DIR"))
    args = p.parse_args(argv)
    old = headline_rows(args.fp32, args.headline, args.variant)
    new = headline_rows(args.new, args.headline, args.variant)
    recipes = sorted({k[0] for k in old} & {k[0] for k in new})
    results = [compare(old, new, recipe, args.margin) for recipe in recipes]
    print(report(results, args))
    if args.runs:
        for name, root in zip(("fp32", "new"), args.runs, strict=True):
            counts = ", ".join(f"{n} x amp {a}, channels-last {c}" for (a, c), n in counts_of(root))
            print(f"\nCells of the {name} grid ({root}): {counts}")
    return results


def counts_of(root: Path) -> list[tuple[tuple, int]]:
    return sorted(numerics_counts(root).items(), key=lambda kv: str(kv[0]))


if __name__ == "__main__":
    main()

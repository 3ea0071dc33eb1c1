"""Seed, variant and paired-test tables from a quality grid's bench.csv.

    python benchmarks/seed_table.py runs/bench/fmnist-cpu-seeds/bench.csv [more bench.csv ...] \
        [--headline knn_cos:k=5] [--variant plain] [--reference fmnist-cpu] \
        [--recipes fmnist-cpu fmnist-cpu-ntxent ...] [--classes 7 2 6] \
        [--floor benchmarks/results/pixel-floor/fmnist.json]

Several bench.csv files are read as one grid (e.g. seed 0 from an earlier grid, seeds 1 and 2
from a later one); a (recipe, class, seed) cell found in several files is taken whole from the
first that has it, so that its variants and scorers all come from one training run (a cell trained
again is another draw, and a later file's ensemble must not be paired with an earlier plain).
A grid that changed its recipes with `set:` (say 8 epochs) names them as the recipe did; give its
file as `bench.csv#-8ep` to read its recipes as fmnist-cpu-8ep etc.

1. Per class and recipe: mean ± standard deviation of AUROC over the seeds, for the headline
   scorer and variant (fixed before the run), with the raw-pixel floor as a column and each
   recipe's margin over it; the overall row is the mean over classes, ± the standard deviation
   over seeds of the per-seed class means.
2. Paired tests of the reference recipe against each other recipe over the (class, seed)
   pairs both finished: mean difference, the Wilcoxon signed-rank test and the paired t-test
   (two-sided). A claim "A ahead of B" needs p < 0.05 here.
3. Every scorer x variant the grid evaluated: mean AUROC per recipe, over the (class, seed)
   cells that have every variant.
4. Paired tests of each variant against `plain`, per recipe and scorer, over the (class, seed)
   cells scored both ways (the same checkpoints): "variant A beats plain" needs p < 0.05 too.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

from scipy import stats


def _scorer_name(row: dict) -> str:
    """The row's scorer label (bench.csv's `label`; files without it: scorer and k)."""
    if row.get("label"):
        return row["label"]
    return f"{row['scorer']}:k={row['k']}" if row["k"] else row["scorer"]


def read(path: Path) -> list[dict]:
    """The finished rows of a bench.csv, AUROC as a float."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "done" and r["auroc"]]
    for r in rows:
        r["auroc"] = float(r["auroc"])
        r["normal_class"] = int(r["normal_class"])
        r["seed"] = int(r["seed"])
        r["name"] = _scorer_name(r)
    return rows


def read_all(
    paths: list[Path], recipes: list[str] | None = None, classes: list[int] | None = None
) -> list[dict]:
    """The finished rows of several bench.csv files (only the given recipes and classes, when
    given), each (recipe, class, seed) cell whole from the first file that has it; a path
    written `bench.csv#SUFFIX` has SUFFIX appended to its recipe names."""
    source: dict[tuple, int] = {}  # cell -> the index of the file it is read from
    seen, rows = set(), []
    for i, path in enumerate(paths):
        path, _, suffix = str(path).partition("#")
        for r in read(Path(path)):
            r["recipe"] += suffix
            cell = (r["recipe"], r.get("dataset"), r["normal_class"], r["seed"])
            key = (*cell, r["name"], r["variant"])
            unwanted = (recipes and r["recipe"] not in recipes) or (
                classes is not None and r["normal_class"] not in classes
            )
            if unwanted or key in seen or source.setdefault(cell, i) != i:
                continue
            seen.add(key)
            rows.append(r)
    if recipes:  # tables show the recipes in the order asked for
        rows.sort(key=lambda r: recipes.index(r["recipe"]))
    return rows


def _mean_sd(values: list[float]) -> str:
    """'mean ± sd' in %, or the mean alone for a single value."""
    if len(values) < 2:
        return f"{100 * mean(values):.1f}"
    return f"{100 * mean(values):.1f} ± {100 * stdev(values):.1f}"


def seed_table(rows: list[dict], headline: str, variant: str, floor: dict | None) -> str:
    # recipe -> class -> seed -> AUROC
    auroc: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    names: dict[int, str] = {}
    for r in rows:
        if r["name"] == headline and r["variant"] == variant:
            auroc[r["recipe"]][r["normal_class"]][r["seed"]] = r["auroc"]
            names[r["normal_class"]] = r["class_name"]
    recipes = list(auroc)
    classes = sorted(names)
    pixel = (floor or {}).get("auroc", {})
    head = " | ".join(recipes)
    lines = [
        f"| class | {head} | pixels | " + " | ".join(f"{r} - pixels" for r in recipes) + " |",
        "|---|" + "---:|" * (2 * len(recipes) + 1),
    ]
    for c in classes:
        cells, margins = [], []
        for r in recipes:
            v = list(auroc[r][c].values())
            cells.append(f"{_mean_sd(v)} (n={len(v)})" if v else "–")
            p = pixel.get(names[c])
            margins.append(f"{100 * (mean(v) - p):+.1f}" if v and p is not None else "–")
        p = pixel.get(names[c])
        lines.append(
            f"| {c} {names[c]} | " + " | ".join(cells) + " | "
            + ("–" if p is None else f"{100 * p:.1f}") + " | " + " | ".join(margins) + " |"
        )  # fmt: skip
    overall = []
    for r in recipes:
        seeds = sorted({s for c in classes for s in auroc[r][c]})
        # per seed, the class mean over the classes that seed finished for every class
        per_seed = [
            mean(auroc[r][c][s] for c in classes)
            for s in seeds
            if all(s in auroc[r][c] for c in classes)
        ]
        overall.append(f"**{_mean_sd(per_seed)}** (seeds: {len(per_seed)})" if per_seed else "–")
    # the floor's mean over the classes of this table, not the whole dataset's
    shown = [pixel[names[c]] for c in classes if names[c] in pixel]
    floor_mean = mean(shown) if len(shown) == len(classes) else None
    lines.append(
        f"| mean ({len(classes)} classes) | " + " | ".join(overall) + " | "
        + ("–" if floor_mean is None else f"{100 * floor_mean:.1f}") + " |"
        + " |" * len(recipes)
    )  # fmt: skip
    return "\n".join(lines)


def paired_tests(rows: list[dict], headline: str, variant: str, reference: str) -> str:
    pairs: dict[str, dict[tuple[int, int], float]] = defaultdict(dict)
    for r in rows:
        if r["name"] == headline and r["variant"] == variant:
            pairs[r["recipe"]][(r["normal_class"], r["seed"])] = r["auroc"]
    if reference not in pairs:
        raise SystemExit(f"no rows of the reference recipe {reference!r} for {headline} {variant}")
    lines = [
        f"| {reference} vs | pairs (class x seed) | mean difference | wins | Wilcoxon p | "
        "paired t p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for other in pairs:
        if other == reference:
            continue
        keys = sorted(set(pairs[reference]) & set(pairs[other]))
        diff = [pairs[reference][k] - pairs[other][k] for k in keys]
        lines.append(_wilcoxon_row(other, diff))
    return "\n".join(lines)


def variant_table(rows: list[dict]) -> str:
    """Mean AUROC per recipe, scorer and variant over the (class, seed) cells that have every
    variant the grid scored, so that variants are compared on the same cells."""
    variants = sorted({r["variant"] for r in rows})
    have: dict[tuple[str, str], set] = defaultdict(set)  # (recipe, variant) -> (class, seed)
    for r in rows:
        have[(r["recipe"], r["variant"])].add((r["normal_class"], r["seed"]))
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    common = {rec: set.intersection(*(have[(rec, v)] for v in variants)) for rec in recipes}
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r["normal_class"], r["seed"]) in common[r["recipe"]]:
            cells[(r["name"], r["variant"])][r["recipe"]].append(r["auroc"])
    lines = [
        "| scorer | variant | " + " | ".join(recipes) + " |",
        "|---|---|" + "---:|" * len(recipes),
    ]
    for (name, variant), per in sorted(cells.items()):
        vals = [f"{100 * mean(per[r]):.1f} (n={len(per[r])})" if per[r] else "–" for r in recipes]
        lines.append(f"| {name} | {variant} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _wilcoxon_row(label: str, diff: list[float]) -> str:
    """A paired-test row: pairs, mean difference, wins, Wilcoxon and paired t p (two-sided)."""
    if len(diff) < 2:
        return f"| {label} | {len(diff)} | – | – | – | – |"
    wilcoxon = stats.wilcoxon(diff).pvalue if any(diff) else 1.0
    t = stats.ttest_1samp(diff, 0.0).pvalue
    wins = sum(d > 0 for d in diff)
    return (
        f"| {label} | {len(diff)} | {100 * mean(diff):+.2f} | {wins}/{len(diff)} | "
        f"{wilcoxon:.3g} | {t:.3g} |"
    )


def variant_tests(rows: list[dict], baseline: str = "plain") -> str:
    """Each variant against ``baseline`` on the same (class, seed) cells, per recipe and scorer."""
    # (recipe, scorer, variant) -> (class, seed) -> AUROC
    auroc: dict[tuple[str, str, str], dict[tuple[int, int], float]] = defaultdict(dict)
    for r in rows:
        auroc[(r["recipe"], r["name"], r["variant"])][(r["normal_class"], r["seed"])] = r["auroc"]
    lines = [
        f"| recipe, scorer, variant - {baseline} | pairs (class x seed) | mean difference | wins | "
        "Wilcoxon p | paired t p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (recipe, name, variant), cells in auroc.items():
        base = auroc.get((recipe, name, baseline))
        if variant == baseline or not base:
            continue
        keys = sorted(set(cells) & set(base))
        diff = [cells[k] - base[k] for k in keys]
        lines.append(_wilcoxon_row(f"{recipe}, {name}, {variant}", diff))
    return "\n".join(lines)


def table_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every quality-table script shares: its bench.csv files and what to compare."""
    parser.add_argument("csv", type=Path, nargs="+")
    parser.add_argument("--headline", default="knn_cos:k=5")
    parser.add_argument("--variant", default="plain")
    parser.add_argument("--reference", default="fmnist-cpu")
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="only these classes")
    parser.add_argument("--floor", type=read_floor, default=None, help="pixel_floor.py's JSON")


def read_floor(path: str) -> dict:
    """pixel_floor.py's JSON: kNN on raw pixels, AUROC per class name."""
    return json.loads(Path(path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    table_arguments(parser)
    parser.add_argument("--recipes", nargs="*", default=None, help="only these recipes")
    args = parser.parse_args()
    rows = read_all(args.csv, args.recipes, args.classes)
    print(f"Headline: {args.headline}, variant {args.variant} (AUROC %, mean ± sd over seeds)\n")
    print(seed_table(rows, args.headline, args.variant, args.floor))
    print(f"\nPaired tests, {args.reference} against each recipe (two-sided)\n")
    print(paired_tests(rows, args.headline, args.variant, args.reference))
    print(
        "\nEvery scorer and variant (mean AUROC % over the class x seed cells with every variant)\n"
    )
    print(variant_table(rows))
    print("\nEach variant against plain on the same cells (two-sided)\n")
    print(variant_tests(rows))


if __name__ == "__main__":
    main()

"""One-factor-at-a-time ablation table from one or more grids' bench.csv.

    python benchmarks/ablation_table.py runs/bench/fmnist-cpu-ablation/bench.csv \
        [more bench.csv ...] [--reference fmnist-cpu] [--headline knn_cos:k=5] \
        [--variant plain] [--budget 600] [--sharing 2] [--also mahalanobis] \
        [--floor benchmarks/results/pixel-floor/fmnist.json] [--classes 7 2 6]

One row per recipe (setting): the headline AUROC per class, their mean, the difference to the
reference recipe on the same classes, and the wall time of its cells (training + evaluation as
the grid ran them, --sharing cells at a time on the machine). The time a class costs on the
whole machine is the cell's wall time divided by --sharing (the grid's throughput); a setting
whose slowest class costs more than --budget seconds is marked out of budget however good its
AUROC. --also adds the class mean of other scorers; --floor adds kNN on raw pixels as the last
row, the floor a learned setting must clear on each class.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from statistics import mean

from seed_table import read_all, table_arguments


def ablation_table(
    rows: list[dict],
    reference: str,
    headline: str,
    variant: str,
    budget: float,
    also: list[str],
    sharing: int = 2,
    floor: dict | None = None,
) -> str:
    auroc: dict[str, dict[int, float]] = defaultdict(dict)  # recipe -> class -> headline AUROC
    other: dict[tuple[str, str], list[float]] = defaultdict(list)  # (recipe, scorer) -> AUROCs
    wall: dict[str, dict[int, float]] = defaultdict(dict)
    names: dict[int, str] = {}
    for r in rows:
        if r["variant"] != variant:
            continue
        if r["name"] == headline:
            auroc[r["recipe"]][r["normal_class"]] = r["auroc"]
            wall[r["recipe"]][r["normal_class"]] = float(r["wall_time_s"])
            names[r["normal_class"]] = r["class_name"]
        if r["name"] in also:
            other[(r["recipe"], r["name"])].append(r["auroc"])
    if reference not in auroc:
        raise SystemExit(f"no {headline} {variant} rows of the reference recipe {reference!r}")
    classes = sorted(names)
    head = " | ".join(f"{c} {names[c]}" for c in classes)
    extra = "".join(f" | {s} mean" for s in also)
    lines = [
        f"| setting | {head} | mean | vs {reference} | wall time per cell (s) | "
        f"per class on the machine (s) | within {budget:.0f} s{extra} |",
        "|---|" + "---:|" * (len(classes) + 4) + "---|" + "---:|" * len(also),
    ]
    ref = auroc[reference]
    for recipe in auroc:
        per = auroc[recipe]
        cells = [f"{100 * per[c]:.1f}" if c in per else "–" for c in classes]
        shared = [c for c in per if c in ref]
        delta = mean(per[c] - ref[c] for c in shared) if shared else None
        times = list(wall[recipe].values())
        complete = len(per) == len(classes)
        per_class = max(times) / sharing
        within = "yes" if per_class <= budget else "**no**"
        extra_cells = "".join(
            f" | {100 * mean(other[(recipe, s)]):.1f}" if other[(recipe, s)] else " | –"
            for s in also
        )
        lines.append(
            f"| {recipe} | " + " | ".join(cells)
            + f" | {100 * mean(per.values()):.1f}{'' if complete else ' (partial)'}"
            + (" | –" if recipe == reference or delta is None else f" | {100 * delta:+.1f}")
            + f" | {mean(times):.0f} (max {max(times):.0f}) | {per_class:.0f} | {within}"
            + f"{extra_cells} |"
        )  # fmt: skip
    if floor:
        pixels = {c: floor["auroc"][names[c]] for c in classes}
        delta = mean(pixels[c] - ref[c] for c in classes if c in ref)
        lines.append(
            f"| pixels ({floor['scorer']}) | "
            + " | ".join(f"{100 * pixels[c]:.1f}" for c in classes)
            + f" | {100 * mean(pixels.values()):.1f} | {100 * delta:+.1f} | – | – | –"
            + " | –" * len(also)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    table_arguments(parser)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds per class")
    parser.add_argument("--sharing", type=int, default=2, help="cells the grid ran at once")
    parser.add_argument("--also", nargs="*", default=[], help="other scorers' class means")
    args = parser.parse_args()
    rows = read_all(args.csv, classes=args.classes)
    print(f"Headline: {args.headline}, variant {args.variant} (AUROC %)\n")
    table = ablation_table(
        rows,
        args.reference,
        args.headline,
        args.variant,
        args.budget,
        args.also,
        args.sharing,
        args.floor,
    )
    print(table)


if __name__ == "__main__":
    main()

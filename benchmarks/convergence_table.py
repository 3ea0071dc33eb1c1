"""Convergence table from a grid's learning curves: optimiser steps to reach a share of the
final AUROC, per recipe and class.

    python benchmarks/convergence_table.py runs/bench/fmnist-cpu-convergence [--share 0.95]

Reads every cell's results.json (``learning_curve``: points with epoch, step and kNN-cosine
AUROC on a fixed test subsample). Two targets per curve, each against the curve's own last point:
- "95 % of final": the first step whose AUROC >= share x final (the issue's definition; with
  AUROCs near 0.9 it sits close to chance-level progress, so it is reached early);
- "95 % of the gain": the first step whose AUROC >= 0.5 + share x (final - 0.5), i.e. 95 % of
  the way from chance to the final value, which separates fast and slow curves.
A curve that already meets a target at its first point is reported as "<= first step" (and
counts as that step in the medians); the AUROC at the first point shows how far each method
got before the curve could tell them apart.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, median


def read_curves(grid_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """recipe -> cell name -> learning-curve points, for every evaluated cell of the grid."""
    curves: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for path in sorted(grid_dir.glob("*/*/results.json")):
        points = json.loads(path.read_text()).get("learning_curve") or []
        if points and "step" in points[0]:
            curves[path.parent.parent.name][path.parent.name] = points
    return curves


def first_step(points: list[dict], target: float) -> tuple[int, bool]:
    """(step, at_first_point) of the first point with AUROC >= target; the last if none is."""
    for i, p in enumerate(points):
        if p["auroc"] >= target:
            return p["step"], i == 0
    return points[-1]["step"], False


def steps_to(points: list[dict], share: float) -> dict[str, object]:
    final = points[-1]["auroc"]
    of_final, early_final = first_step(points, share * final)
    of_gain, early_gain = first_step(points, 0.5 + share * (final - 0.5))
    return {
        "first": points[0]["auroc"],
        "first_step": points[0]["step"],
        "final": final,
        "of_final": of_final,
        "of_final_first": early_final,
        "of_gain": of_gain,
        "of_gain_first": early_gain,
        "total": points[-1]["step"],
    }


def _steps(n: int, at_first: bool) -> str:
    return f"<= {n}" if at_first else str(n)


def convergence_table(curves: dict[str, dict[str, list[dict]]], share: float) -> str:
    pct = f"{100 * share:.0f} %"
    lines = [
        f"| recipe | cell | AUROC at the first point (step) | final AUROC (curve) | "
        f"steps to {pct} of final | steps to {pct} of the gain over chance | steps in all |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for recipe, cells in curves.items():
        stats = {cell: steps_to(points, share) for cell, points in sorted(cells.items())}
        for cell, s in stats.items():
            lines.append(
                f"| {recipe} | {cell} | {100 * s['first']:.1f} ({s['first_step']}) | "
                f"{100 * s['final']:.1f} | "
                f"{_steps(s['of_final'], s['of_final_first'])} | "
                f"{_steps(s['of_gain'], s['of_gain_first'])} | {s['total']} |"
            )
        gains = [s["of_gain"] for s in stats.values()]
        summary.append(
            f"| {recipe} | {len(stats)} | {100 * mean(s['first'] for s in stats.values()):.1f} | "
            f"{100 * mean(s['final'] for s in stats.values()):.1f} | "
            f"{median(s['of_final'] for s in stats.values()):.0f} | {median(gains):.0f} |"
        )
    lines += [
        "",
        f"| recipe | cells | mean AUROC at the first point | mean final AUROC | "
        f"median steps to {pct} of final | median steps to {pct} of the gain |",
        "|---|---:|---:|---:|---:|---:|",
        *summary,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid_dir", type=Path)
    parser.add_argument("--share", type=float, default=0.95)
    args = parser.parse_args()
    curves = read_curves(args.grid_dir)
    if not curves:
        raise SystemExit(f"no learning curves with steps under {args.grid_dir}/*/*/results.json")
    print(convergence_table(curves, args.share))


if __name__ == "__main__":
    main()

"""A grid's tables: bench.csv (one row per result, or the status of a cell without results),
bench.md (the headline AUROC per class, every scorer, wall times, learning curves, failures)
and the plots (bench.png, bench_curves.png).

A result is named by its scorer's canonical spec (`ScorerSpec.label`, e.g. ``kde:scale=5``):
the ``label`` column, the tables' rows and the headline all use it; ``params`` holds every
parameter of the scorer (JSON), ``k`` the kNN neighbours as earlier files had it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from firmad.bench.grid import Cell, GridConfig
from firmad.errors import FirmadError
from firmad.io import atomic_write_json, atomic_write_text
from firmad.methods import NTXent
from firmad.report import plot_learning_curve
from firmad.run import CELL_ERROR, RunDir
from firmad.scoring import ScorerSpec

RESULT_FIELDS = (
    "scorer", "label", "params", "k", "variant", "auroc", "aupr_anomaly", "aupr_normal", "fpr95",
)  # fmt: skip
CSV_FIELDS = [
    "recipe",
    "method",
    "dataset",
    "normal_class",
    "class_name",
    "seed",
    *RESULT_FIELDS,
    "train_time_s",
    "wall_time_s",
    "status",
    "error",
]


def collect_rows(cells: list[Cell], running: set[str] | frozenset = frozenset()) -> list[dict]:
    """One row per result of a done cell; one row with the status of every other cell:
    ``running``, ``failed`` (error.json), ``interrupted`` (a checkpoint, no results: it resumes)
    or ``pending`` (nothing to resume)."""
    rows = []
    for cell in cells:
        base = {
            "recipe": cell.label,
            "dataset": cell.dataset,
            "normal_class": cell.normal_class,
            "seed": cell.seed,
        }
        results = RunDir(cell.run_dir).results
        error = cell.run_dir / CELL_ERROR
        if results.exists():
            data = json.loads(results.read_text())
            names = data.get("normal_class_names") or [""]
            for r in data["results"]:
                rows.append(
                    {
                        **base,
                        "method": data["method"],
                        "class_name": names[0],
                        "train_time_s": data.get("train_time_s"),
                        "wall_time_s": data.get("wall_time_s"),
                        "status": "done",
                        "error": "",
                        **_result_fields(r),
                    }
                )
        elif cell.key in running:
            rows.append({**base, "status": "running"})
        elif error.exists():
            rows.append(
                {
                    **base,
                    "status": "failed",
                    "error": json.loads(error.read_text()).get("error", ""),
                }
            )
        else:
            try:
                state = RunDir(cell.run_dir).state
            except FirmadError as err:
                rows.append({**base, "status": "failed", "error": str(err).splitlines()[0]})
                continue
            status = "interrupted" if state in ("partial", "finished") else "pending"
            rows.append({**base, "status": status})
    return rows


def _result_fields(result: dict[str, Any]) -> dict[str, Any]:
    """A result row's columns: its spec's label and every parameter (rows of results.json
    written before the spec get them from their scorer and k), variant and metrics."""
    spec = ScorerSpec.from_row(result)
    return {
        **{key: result.get(key) for key in RESULT_FIELDS},
        "scorer": spec.name,
        "label": spec.label,
        "params": spec.kwargs,
        "k": spec.kwargs.get("k"),
    }


def headline_label(spec: str) -> str:
    """A grid's headline scorer ("knn_rbf:k=3,bw=5") as its canonical label, the label of the
    rows it names ("knn_rbf:k=3,bw=5" for rows whose bw is 5.0)."""
    return ScorerSpec.parse(spec).label


def _headline_rows(grid: GridConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The done rows of the grid's headline scorer and variant."""
    label = headline_label(grid.headline)
    return [
        r
        for r in rows
        if r["status"] == "done" and r["label"] == label and r["variant"] == grid.variant
    ]


def bench_csv(rows: list[dict[str, Any]]) -> str:
    """bench.csv's text: one line a row, every column of `CSV_FIELDS`, parameters as JSON."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        params = row.get("params")
        writer.writerow({**row, "params": "" if params is None else json.dumps(params)})
    return buf.getvalue()


def summarise(
    grid: GridConfig,
    cells: list[Cell],
    out_dir: Path,
    statuses: list[dict[str, Any]] | None = None,
    running: set[str] | frozenset = frozenset(),
) -> dict[str, Any]:
    rows = collect_rows(cells, running)
    atomic_write_text(out_dir / "bench.csv", bench_csv(rows))
    markdown = bench_markdown(grid, cells, rows)
    atomic_write_text(out_dir / "bench.md", markdown)
    plot_bench(out_dir, grid, cells, rows)
    return {
        "csv": out_dir / "bench.csv",
        "md": out_dir / "bench.md",
        "markdown": markdown,
        "statuses": statuses or [],
        "rows": rows,
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.1f}" + (f" ± {arr.std(ddof=1):.1f}" if len(arr) > 1 else "")


def bench_markdown(grid: GridConfig, cells: list[Cell], rows: list[dict[str, Any]]) -> str:
    """bench.md: the cell counts, per dataset the headline table and every scorer's means,
    wall times, learning curves and the failed cells."""
    recipes = list(dict.fromkeys(c.label for c in cells))
    lines = [f"# Benchmark grid: {grid.name}", "", _counts_line(cells, rows), ""]
    for dataset in dict.fromkeys(c.dataset for c in cells):
        classes = list(dict.fromkeys(c.normal_class for c in cells if c.dataset == dataset))
        lines += _headline_table(grid, dataset, classes, recipes, rows)
        lines += _scorer_table(dataset, classes, recipes, rows)
    lines += _time_table(_headline_rows(grid, rows), recipes)
    lines += curves_markdown(grid, cells)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [
            f"- {r['recipe']} {r['dataset']} class {r['normal_class']} seed {r['seed']}: "
            f"{r['error']}"
            for r in failed
        ]
        lines.append("")
    return "\n".join(lines)


def _counts_line(cells: list[Cell], rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r["status"] == "done"]
    n_done = len({(r["recipe"], r["dataset"], r["normal_class"], r["seed"]) for r in done})
    n_failed = sum(r["status"] == "failed" for r in rows)
    count = {s: sum(r["status"] == s for r in rows) for s in ("running", "interrupted", "pending")}
    others = ", ".join(f"{n} {s}" for s, n in count.items() if n or s == "pending")
    line = (
        f"Cells: {len(cells)} planned, {n_done} done, {n_failed} failed, {others}. "
        "Results from the last checkpoint."
    )
    if count["interrupted"]:
        line += " Interrupted cells continue from their checkpoint when the grid runs again."
    return line


def _headline_table(grid, dataset, classes, recipes, rows) -> list[str]:
    """AUROC of the headline scorer per class and recipe, mean ± std over seeds."""
    head = [r for r in _headline_rows(grid, rows) if r["dataset"] == dataset]
    label = headline_label(grid.headline)
    lines = [
        f"## {dataset}: AUROC (%) with {label} ({grid.variant}), mean ± std over seeds",
        "",
        "| class | " + " | ".join(recipes) + " |",
        "|---|" + "---|" * len(recipes),
    ]
    per_recipe_means: dict[str, list[float]] = {r: [] for r in recipes}
    for c in classes:
        name = next((r["class_name"] for r in head if r["normal_class"] == c), "")
        vals = {}
        for rec in recipes:
            v = [r["auroc"] for r in head if r["recipe"] == rec and r["normal_class"] == c]
            vals[rec] = v
            if v:
                per_recipe_means[rec].append(float(np.mean(v)))
        lines.append(
            f"| {c} {name} | " + " | ".join(_bold_best(vals, rec) for rec in recipes) + " |"
        )
    lines.append("| **mean** | " + _means_row(per_recipe_means, recipes, len(classes)) + " |")
    return [*lines, ""]


def _scorer_table(dataset, classes, recipes, rows) -> list[str]:
    """Every scorer and variant: the mean AUROC over classes per recipe."""
    done = [r for r in rows if r["status"] == "done" and r["dataset"] == dataset]
    scorers = list(dict.fromkeys((r["label"], r["variant"]) for r in done))
    if not scorers:
        return []
    lines = [f"### {dataset}: mean AUROC (%) over classes, every scorer", ""]
    lines.append("| scorer | variant | " + " | ".join(recipes) + " |")
    lines.append("|---|---|" + "---|" * len(recipes))
    for label, variant in scorers:
        vals = {}
        for rec in recipes:
            per_class: dict[Any, list[float]] = {}
            for r in done:
                if r["recipe"] == rec and r["variant"] == variant and r["label"] == label:
                    per_class.setdefault(r["normal_class"], []).append(r["auroc"])
            vals[rec] = [float(np.mean(v)) for v in per_class.values()]
        lines.append(f"| {label} | {variant} | {_means_row(vals, recipes, len(classes))} |")
    return [*lines, ""]


def _time_table(head: list[dict[str, Any]], recipes: list[str]) -> list[str]:
    if not head:
        return []
    lines = ["## Wall time per cell (s)", "", "| recipe | mean | max |", "|---|---|---|"]
    for rec in recipes:
        t = [r["wall_time_s"] for r in head if r["recipe"] == rec and r["wall_time_s"]]
        if t:
            lines.append(f"| {rec} | {np.mean(t):.0f} | {np.max(t):.0f} |")
    return [*lines, ""]


def _means_row(per_class: dict[str, list[float]], recipes: list[str], n_classes: int) -> str:
    """Mean over classes per recipe; the best complete one bold, incomplete ones marked (n/N)
    and never compared."""
    complete = {r: float(np.mean(v)) for r, v in per_class.items() if len(v) == n_classes}
    best = max(complete.values()) if len(complete) > 1 else None
    texts = []
    for rec in recipes:
        v = per_class.get(rec, [])
        if not v:
            texts.append("–")
        elif rec in complete:
            text = f"{100 * complete[rec]:.1f}"
            texts.append(f"**{text}**" if complete[rec] == best else text)
        else:
            texts.append(f"{100 * np.mean(v):.1f} ({len(v)}/{n_classes} classes)")
    return " | ".join(texts)


def _bold_best(vals: dict[str, list[float]], key: str) -> str:
    text = _mean_std(vals[key])
    means = {k: np.mean(v) for k, v in vals.items() if v}
    if len(means) > 1 and vals[key] and np.mean(vals[key]) == max(means.values()):
        return f"**{text}**"
    return text


def plot_bench(out_dir: Path, grid: GridConfig, cells: list[Cell], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = _headline_rows(grid, rows)
    if not head:
        return
    recipes = list(dict.fromkeys(c.label for c in cells))
    classes = list(dict.fromkeys((c.dataset, c.normal_class) for c in cells))
    fig, ax = plt.subplots(figsize=(max(6, len(classes) * 0.9), 4))
    width = 0.8 / len(recipes)
    for i, rec in enumerate(recipes):
        ys = []
        for dataset, c in classes:
            v = [
                r["auroc"]
                for r in head
                if r["recipe"] == rec and r["dataset"] == dataset and r["normal_class"] == c
            ]
            ys.append(100 * np.mean(v) if v else np.nan)
        ax.bar(np.arange(len(classes)) + i * width, ys, width, label=rec)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2)
    ax.set_xticklabels([str(c) for _, c in classes])
    ax.set_xlabel("normal class")
    ax.set_ylabel(f"AUROC (%), {headline_label(grid.headline)}")
    lo = np.nanmin([100 * r["auroc"] for r in head])
    ax.set_ylim(max(0, lo - 5), 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=120)
    plt.close(fig)
    plot_curves(out_dir, grid, cells)


def learning_curves(cells: list[Cell]) -> dict[str, tuple[list[float], list[float]]]:
    """Mean learning curve per recipe over its cells (points at the same epochs are averaged)."""
    points: dict[str, dict[float, list[float]]] = {}
    for cell in cells:
        path = RunDir(cell.run_dir).results
        if not path.exists():
            continue
        for point in json.loads(path.read_text()).get("learning_curve", []):
            per_epoch = points.setdefault(cell.label, {})
            per_epoch.setdefault(point["epoch"], []).append(point["auroc"])
    return {
        rec: (sorted(pts), [float(np.mean(pts[e])) for e in sorted(pts)])
        for rec, pts in points.items()
    }


def epochs_to_reach(
    curves: dict[str, tuple[list[float], list[float]]], reference: str, share: float = 0.95
) -> dict[str, float | None]:
    """First epoch at which each mean curve reaches `share` of the reference's final AUROC."""
    if reference not in curves or not curves[reference][1]:
        return {}
    target = share * curves[reference][1][-1]
    return {
        rec: next((e for e, a in zip(epochs, aurocs, strict=True) if a >= target), None)
        for rec, (epochs, aurocs) in curves.items()
    }


def curve_reference(grid: GridConfig, cells: list[Cell]) -> str | None:
    """The grid's ``curve_reference``, else the first recipe whose runs trained NT-Xent."""
    if grid.curve_reference:
        return grid.curve_reference
    for cell in cells:
        path = RunDir(cell.run_dir).results
        if path.exists() and json.loads(path.read_text()).get("method") == NTXent.name:
            return cell.label
    return None


def plot_curves(out_dir: Path, grid: GridConfig, cells: list[Cell]) -> None:
    """Mean learning curves of all recipes in one plot, marked where each reaches the target."""
    curves = learning_curves(cells)
    if not curves:
        return
    reference = curve_reference(grid, cells)
    reached = epochs_to_reach(curves, reference) if reference else {}
    marks = {f"{rec} reaches 95% of {reference}": e for rec, e in reached.items() if e is not None}
    plot_learning_curve(out_dir / "bench_curves.png", curves, marks=marks)
    atomic_write_json(
        out_dir / "bench_curves.json",
        {"curves": curves, "reference": reference, "epoch_to_95pct_of_reference": reached},
    )


def curves_markdown(grid: GridConfig, cells: list[Cell]) -> list[str]:
    curves = learning_curves(cells)
    reference = curve_reference(grid, cells)
    if not curves or not reference or reference not in curves:
        return []
    reached = epochs_to_reach(curves, reference)
    final = curves[reference][1][-1]
    lines = [
        "## Learning curves (diagnostic: kNN-cosine k=5 AUROC on a test subsample)",
        "",
        f"Target: 95 % of {reference}'s final mean curve AUROC ({100 * final:.1f} %) = "
        f"{95 * final:.1f} %. Plot: bench_curves.png.",
        "",
        "| recipe | final curve AUROC | first epoch at target |",
        "|---|---|---|",
    ]
    for rec, (_, aurocs) in curves.items():
        e = reached.get(rec)
        first = e if e is not None else "not reached"
        lines.append(f"| {rec} | {100 * aurocs[-1]:.1f} | {first} |")
    return [*lines, ""]
